"""The decode batch's cache: rows join, leave and grow in place, and each row reads what it was given."""

from __future__ import annotations

import torch

from app.services.kv_cache import SpareRoomLayer

HEADS, HEAD_DIM = 3, 8


def tokens(count: int, seed: int) -> torch.Tensor:
    """One row of `count` tokens' keys (or values), `[1, heads, count, head_dim]`, distinct for each seed."""
    return torch.randn(1, HEADS, count, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


def right_aligned(row: torch.Tensor, width: int) -> torch.Tensor:
    """`row` behind zeros up to `width` columns: what a left-padded row of the batch holds."""
    return torch.cat([row.new_zeros(1, HEADS, width - row.shape[2], HEAD_DIM), row], dim=2)


def test_rows_join_leave_and_widen_in_place_and_read_what_they_were_given() -> None:
    rows = [tokens(5, 0)]
    layer = SpareRoomLayer(rows[0], rows[0] + 1)

    def check() -> None:
        width = layer.length
        assert torch.equal(layer.keys, torch.cat([right_aligned(row, width) for row in rows]))
        assert torch.equal(layer.values, torch.cat([right_aligned(row + 1, width) for row in rows]))

    for seed, count in ((1, 3), (2, 5), (3, 1)):  # shorter rows join behind padding, the buffers grow rows
        rows.append(tokens(count, seed))
        layer.add_row(rows[-1], rows[-1] + 1)
        check()
    new = [tokens(1, 10 + i) for i in range(4)]  # a decode step: one more column for every row
    layer.update(torch.cat(new), torch.cat(new) + 1)
    rows = [torch.cat([row, column], dim=2) for row, column in zip(rows, new, strict=True)]
    check()

    buffer = layer.keys.data_ptr()
    layer.keep_rows([0, 3, 2])  # row 1 leaves, the last row takes its place
    rows = [rows[0], rows[3], rows[2]]
    check()
    layer.add_row(tokens(2, 20), tokens(2, 20) + 1)  # into the place the leaving row freed: its padding is zeros
    rows.append(tokens(2, 20))
    check()
    assert layer.keys.data_ptr() == buffer  # neither copied the batch

    layer.widen(9)  # a prompt longer than the batch joins: every row moves behind more padding
    rows.append(tokens(9, 30))
    layer.add_row(rows[-1], rows[-1] + 1)
    check()

    layer.keep_rows([0, 1, 2, 3])  # the longest row leaves: its columns are padding for every other row
    rows = rows[:4]
    layer.drop_leading(9 - 7)
    check()
    assert layer.length == 7 and layer.keys.shape == (4, HEADS, 7, HEAD_DIM)
