"""The decode batch's key/value cache: per layer, buffers with room for the tokens still to come."""

from __future__ import annotations

import functools
from typing import Any

import torch

# Room a layer keeps for tokens still to come, in columns. A full buffer is copied into a larger one.
SPARE_COLUMNS = 128

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values, [rows, kv_heads, columns, head_dim]


class SpareRoomLayer:
    """A full-attention cache layer that writes each new token into room it keeps, instead of concatenating.

    transformers' `DynamicLayer.update` concatenates, so every step copies the whole cache into newly allocated
    memory; at 8 rows on a CPU that copy (and the page faults of the fresh allocation) took as long as the model's
    matmuls. Here `keys` and `values` are views of larger buffers and a step writes one column in place; a full buffer
    moves into a larger one.

    A decode batch's rows join and leave in place too (`add_row`, `widen`, `keep_rows`, `drop_leading`): the buffers
    keep room for half as many rows again, a joining row is written into the next, a leaving one's place is taken by
    the last row, and columns that became padding for every row are dropped by moving the view's start. Rebuilding
    the batch's tensors instead copied every row's keys and values twice at each join or leave: 14-35 ms (two to
    three decode steps) for 8 rows of 300 tokens, 150-200 ms at 2,000, a stall of every running reply whenever one
    started or ended.
    """

    keys: torch.Tensor  # views of the rooms: the `length` tokens held, of the rows in the batch
    values: torch.Tensor

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype | None = None, *, in_place: bool = False
    ) -> None:
        """Holds a copy of `keys` and `values`, in `dtype` if given (what every later token is stored in too).

        `in_place`: where they are the first columns of rooms nobody else writes into any more (a finished
        request's, which the prefix cache handed over), holds them where they are and writes the tokens that follow
        into those rooms' spare columns: a conversation's next turn does not copy the keys and values of its whole
        history (16 MB at 700 tokens). Tensors that are not such views are copied."""
        super().__init__()  # transformers' DynamicLayer, in the subclass its own forward gets (transformers_cache)
        self.device = keys.device  # this and is_initialized: DynamicLayer's fields, which transformers' forward reads
        self.is_initialized = True
        self.rows, self.length = keys.shape[0], keys.shape[2]
        key_room = _room_of(keys) if in_place and dtype in (None, keys.dtype) else None
        value_room = _room_of(values) if key_room is not None else None
        if key_room is not None and value_room is not None:
            # [row capacity, kv_heads, columns, head_dim]: the rows in the batch are the first `rows`
            self._key_buffer, self._value_buffer = key_room, value_room
        else:
            self._key_buffer = self._room_for(keys, dtype=dtype)
            self._value_buffer = self._room_for(values, dtype=dtype)
        self._rows_changed()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        added = key_states.shape[2]
        key_room, value_room = self.reserve(added)
        key_room[:, :, self.length : self.length + added] = key_states
        value_room[:, :, self.length : self.length + added] = value_states
        self.advance(added)
        return self.keys, self.values

    def reserve(self, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The key and value buffers of the rows `[rows, kv_heads, room, head_dim]`, with room for `columns` more
        tokens after the `length` held; the caller writes them there and then calls `advance`."""
        end = self.length + columns
        if end > self._key_buffer.shape[2]:
            self._grow(self.rows + self.rows // 2, end)  # room for rows to join, none kept for rows that left
        return self._key_rooms, self._value_rooms

    def advance(self, columns: int) -> None:
        """Count `columns` more tokens as held (written into the buffers `reserve` returned)."""
        self.length += columns
        self._expose()

    def add_row(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append a row `[1, kv_heads, tokens, head_dim]` as the last row, its tokens in the last columns held (at
        most `length` of them) and zeros before them (padding, which the batch's mask hides)."""
        tokens = keys.shape[2]
        if self.rows == self._key_buffer.shape[0]:  # room for half as many again: most joins copy only their own row
            self._grow(self.rows + max(1, self.rows // 2), self.length)
        for buffer, row in ((self._key_buffer, keys), (self._value_buffer, values)):
            buffer[self.rows, :, : self.length - tokens] = 0
            buffer[self.rows, :, self.length - tokens : self.length] = row[0]
        self.rows += 1
        self._rows_changed()

    def widen(self, length: int) -> None:
        """Hold `length` columns (more than now), every row's tokens shifted to the last ones, zeros before them."""
        key_buffer, value_buffer = self._key_buffer, self._value_buffer
        shift, held = length - self.length, self.length
        self.length = length
        for name, old in (("_key_buffer", key_buffer), ("_value_buffer", value_buffer)):
            room = old.new_empty(old.shape[0], old.shape[1], length + SPARE_COLUMNS, old.shape[3])
            room[: self.rows, :, :shift] = 0
            room[: self.rows, :, shift:length] = old[: self.rows, :, :held]
            setattr(self, name, room)
        self._rows_changed()

    def keep_rows(self, order: list[int]) -> None:
        """Keep the rows `order` names, row i being the former row order[i]; a row named where it is not is copied
        there, so `order` must only move rows to places no later entry reads from."""
        for new, old in enumerate(order):
            if new != old:
                self._key_buffer[new, :, : self.length] = self._key_buffer[old, :, : self.length]
                self._value_buffer[new, :, : self.length] = self._value_buffer[old, :, : self.length]
        self.rows = len(order)
        self._rows_changed()

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` columns of every row (padding for all of them): the view starts later."""
        self._key_buffer = self._key_buffer[:, :, columns:]
        self._value_buffer = self._value_buffer[:, :, columns:]
        self.length -= columns
        self._rows_changed()

    def _grow(self, row_capacity: int, columns: int) -> None:
        """Move the rows held into buffers of `row_capacity` rows and room for `columns` tokens and more."""
        self._key_buffer = self._room_for(self._key_buffer[: self.rows, :, : self.length], columns, row_capacity)
        self._value_buffer = self._room_for(self._value_buffer[: self.rows, :, : self.length], columns, row_capacity)
        self._rows_changed()

    def _rows_changed(self) -> None:
        """The buffers' rows in the batch, kept as views: a decode step asks for them in every layer."""
        self._key_rooms, self._value_rooms = self._key_buffer[: self.rows], self._value_buffer[: self.rows]
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_rooms[:, :, : self.length]
        self.values = self._value_rooms[:, :, : self.length]

    @staticmethod
    def _room_for(
        filled: torch.Tensor, needed: int = 0, row_capacity: int = 0, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        rows, heads, length, head_dim = filled.shape
        columns = max(length, needed) + SPARE_COLUMNS
        room = filled.new_empty(max(rows, row_capacity), heads, columns, head_dim, dtype=dtype)
        room[:rows, :, :length] = filled
        return room


def _room_of(view: torch.Tensor) -> torch.Tensor | None:
    """The buffer `[rows, heads, columns, head_dim]` whose first columns `view` is, as a SpareRoomLayer keeps its
    room; None where `view` is not such a view (a tensor of its own size, or one starting elsewhere in its buffer)."""
    rows, heads, _, head_dim = view.shape
    columns = view.stride(1) // head_dim
    layout = (heads * columns * head_dim, columns * head_dim, head_dim, 1)
    if view.storage_offset() != 0 or view.stride()[1:] != layout[1:] or (rows > 1 and view.stride(0) != layout[0]):
        return None
    if view.untyped_storage().nbytes() < rows * layout[0] * view.element_size():
        return None
    return view.as_strided((rows, heads, columns, head_dim), layout)


def holds_other_rows(view: torch.Tensor) -> bool:
    """Whether the buffer under `view` (rows of a SpareRoomLayer's) also holds room for rows other than its own: a
    decode batch's buffer that had several rows, which a view would keep alive whole."""
    return view.untyped_storage().nbytes() > view.shape[0] * view.stride(0) * view.element_size()


class RoomCache:
    """Per layer, a SpareRoomLayer: the cache Chipi's forward (app/services/llama_forward.py) appends to."""

    def __init__(self, layers: list[SpareRoomLayer]) -> None:
        self.layers = layers

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append to layer `layer_idx`; its keys and values so far."""
        return self.layers[layer_idx].update(key_states, value_states)


def spare_room_cache(key_values: KeyValues, dtype: torch.dtype | None = None, *, in_place: bool = False) -> RoomCache:
    """A cache holding a copy of `key_values` (in `dtype` if given), with room for more tokens after them; with
    `in_place`, holding them where they are if they are the first columns of rooms (see SpareRoomLayer)."""
    return RoomCache([SpareRoomLayer(keys, values, dtype, in_place=in_place) for keys, values in key_values])


def transformers_cache(key_values: KeyValues) -> Any:
    """The same, as a transformers Cache, for a model run by transformers' own forward (which asks its cache layers
    for lengths and mask sizes). transformers is imported here only: a model that needs this has loaded it."""
    from transformers.cache_utils import Cache

    layer = _transformers_layer_class()
    return Cache(layers=[layer(keys, values) for keys, values in key_values])


@functools.cache
def _transformers_layer_class() -> Any:
    from transformers.cache_utils import DynamicLayer

    class TransformersSpareRoomLayer(SpareRoomLayer, DynamicLayer):  # type: ignore[misc,no-untyped-call]
        """A SpareRoomLayer with DynamicLayer's answers to transformers' forward (lengths, mask sizes)."""

    return TransformersSpareRoomLayer
