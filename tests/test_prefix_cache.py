"""The prefix cache's bookkeeping: longest shared prefix, extension, budget, handing an entry over to the request
that continues it (small tensors, no model)."""

from __future__ import annotations

import torch

from app.services.kv_cache import KeyValues, spare_room_cache
from app.services.prefix_cache import PrefixCache

LAYERS, HEADS, HEAD_DIM = 2, 1, 4
BYTES_PER_TOKEN = LAYERS * 2 * HEADS * HEAD_DIM * 4  # keys and values, float32


def key_values(token_ids: list[int]) -> KeyValues:
    """Fake keys and values whose every column holds its token id, so a hit shows which tokens it covers."""
    column = torch.tensor(token_ids, dtype=torch.float32).view(1, 1, -1, 1).expand(1, HEADS, -1, HEAD_DIM)
    return [(column.clone(), column.clone()) for _ in range(LAYERS)]


def test_a_lookup_returns_the_longest_shared_prefix_and_leaves_the_last_token_to_feed() -> None:
    cache = PrefixCache(budget_bytes=10_000)
    cache.store([1, 2, 3, 4], key_values([1, 2, 3, 4]))
    cache.store([1, 2, 9], key_values([1, 2, 9]))

    hit = cache.lookup([1, 2, 3, 4, 5, 6])
    assert hit is not None and hit.length == 4
    assert hit.key_values[0][0][0, 0, :, 0].tolist() == [1, 2, 3, 4]

    same = cache.lookup([1, 2, 3, 4])  # the whole prompt is cached: its last token is still fed, for its logits
    assert same is not None and same.length == 3

    assert cache.lookup([7, 8, 9]) is None
    assert cache.lookup([1]) is None


def test_an_entry_that_extends_another_replaces_it() -> None:
    cache = PrefixCache(budget_bytes=10_000)
    cache.store([1, 2, 3], key_values([1, 2, 3]))
    cache.store([1, 2, 3, 4, 5], key_values([1, 2, 3, 4, 5]))
    assert len(cache) == 1 and cache.size_bytes == 5 * BYTES_PER_TOKEN


def test_the_least_recently_used_entries_go_first_when_over_budget() -> None:
    cache = PrefixCache(budget_bytes=8 * BYTES_PER_TOKEN)
    cache.store([1, 1, 1], key_values([1, 1, 1]))
    cache.store([2, 2, 2], key_values([2, 2, 2]))
    assert cache.lookup([1, 1, 1, 5]) is not None  # entry 1 is now the most recently used

    cache.store([3, 3, 3], key_values([3, 3, 3]))  # 9 tokens > 8: the least recently used one (2) goes

    assert cache.lookup([2, 2, 2, 5]) is None
    assert cache.lookup([1, 1, 1, 5]) is not None and cache.lookup([3, 3, 3, 5]) is not None
    assert cache.size_bytes <= cache.budget_bytes

    cache.store(list(range(20)), key_values(list(range(20))))  # larger than the whole budget: not kept
    assert cache.lookup(list(range(21))) is None and len(cache) == 2


def test_an_entry_of_views_counts_the_whole_buffers_it_keeps_alive() -> None:
    """A finished request's cache is kept as it is: views of buffers with room for tokens that never came."""
    cache = PrefixCache(budget_bytes=10_000)
    rooms = key_values([1, 2, 3, 0, 0, 0, 0, 0])  # 3 tokens held, room for 5 more
    cache.store([1, 2, 3], [(keys[:, :, :3], values[:, :, :3]) for keys, values in rooms])
    assert cache.size_bytes == 8 * BYTES_PER_TOKEN
    hit = cache.lookup([1, 2, 3, 4])
    assert hit is not None and hit.length == 3 and hit.key_values[0][0][0, 0, :, 0].tolist() == [1, 2, 3]


def test_a_prompt_that_continues_an_entry_whole_takes_it_and_appends_in_its_buffers() -> None:
    """The next turn of a conversation continues its previous turn's entry: the entry leaves the cache with the hit,
    and the new tokens are written into the room after it instead of into a copy of the whole history."""
    cache = PrefixCache(budget_bytes=10_000)
    rooms = key_values([1, 2, 3, 0, 0, 0, 0, 0])  # a finished request's buffers: 3 tokens held, room for 5 more
    cache.store([1, 2, 3], [(keys[:, :, :3], values[:, :, :3]) for keys, values in rooms])

    hit = cache.lookup([1, 2, 3, 4, 5], take=True)
    assert hit is not None and hit.length == 3 and hit.taken
    assert len(cache) == 0 and cache.size_bytes == 0 and cache.lookup([1, 2, 3, 4]) is None

    continued = spare_room_cache(hit.key_values, in_place=True)
    new = torch.full((1, HEADS, 2, HEAD_DIM), 7.0)
    keys, _ = continued.update(new, new, 0)
    assert keys[0, 0, :, 0].tolist() == [1, 2, 3, 7, 7]
    assert keys.data_ptr() == rooms[0][0].data_ptr() and rooms[0][0][0, 0, :, 0].tolist() == [1, 2, 3, 7, 7, 0, 0, 0]


def test_an_entry_shared_in_part_stays_and_is_copied() -> None:
    """Another branch of the conversation (an edited message), or another conversation sharing only its opening,
    reads a copy: the entry stays for the branch it belongs to, its buffers untouched."""
    cache = PrefixCache(budget_bytes=10_000)
    rooms = key_values([1, 2, 3, 0, 0])
    cache.store([1, 2, 3], [(keys[:, :, :3], values[:, :, :3]) for keys, values in rooms])

    hit = cache.lookup([1, 2, 9, 9], take=True)
    assert hit is not None and hit.length == 2 and not hit.taken and len(cache) == 1

    copy = spare_room_cache(hit.key_values, in_place=hit.taken)
    keys, _ = copy.update(torch.full((1, HEADS, 2, HEAD_DIM), 9.0), torch.full((1, HEADS, 2, HEAD_DIM), 9.0), 0)
    assert keys[0, 0, :, 0].tolist() == [1, 2, 9, 9] and keys.data_ptr() != rooms[0][0].data_ptr()
    assert rooms[0][0][0, 0, :, 0].tolist() == [1, 2, 3, 0, 0]


def test_a_taken_entry_without_room_is_copied_with_room_when_it_grows() -> None:
    """An entry of tensors of their own size (a copy of one row of a batch) has no room to write into: the first
    tokens after it move it into a larger buffer, as before, and the entry's own tensors stay as they were."""
    cache = PrefixCache(budget_bytes=10_000)
    entry = key_values([1, 2, 3])
    cache.store([1, 2, 3], entry)
    hit = cache.lookup([1, 2, 3, 4], take=True)
    assert hit is not None and hit.taken

    keys, _ = spare_room_cache(hit.key_values, in_place=True).update(
        torch.full((1, HEADS, 1, HEAD_DIM), 4.0), torch.full((1, HEADS, 1, HEAD_DIM), 4.0), 0
    )
    assert keys[0, 0, :, 0].tolist() == [1, 2, 3, 4] and entry[0][0][0, 0, :, 0].tolist() == [1, 2, 3]
