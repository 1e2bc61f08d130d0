"""Keys and values of recent prompts, so the next turn of a conversation prefills only what is new.

A chat's prompt at turn N+1 is its prompt at turn N, the reply, and the new user message. Without reuse, every turn
re-reads the whole history: time to first token grows with the conversation. When a request finishes, the engine
stores the keys and values of every token it fed (prompt and reply); a new prompt starts from the entry sharing its
longest token prefix and prefills only the rest. Matching on token ids (not text) makes reuse exact: where the chat
template renders the history differently from what the model generated, the shared prefix simply ends there.
A prompt that continues an entry whole (the next turn of that conversation) takes it over: the request appends to
the entry's own buffers, with no copy of the history, and stores the longer entry when it ends.

Entries are evicted least recently used first once their total size passes the budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from app.services.kv_cache import KeyValues  # an entry's are one row's: [1, kv_heads, tokens, head_dim] per layer


@dataclass(frozen=True)
class PrefixHit:
    """The first `length` tokens of a prompt, already computed."""

    length: int
    key_values: KeyValues  # views of the stored entry, cut to `length`: never write into them, unless `taken`
    taken: bool = False  # the entry left the cache with this hit: its buffers are the caller's to write after `length`


def _bytes(key_values: KeyValues) -> int:
    """The memory an entry keeps alive: the whole buffers its tensors view (an entry may be views of a finished
    request's cache, with room for tokens that never came)."""
    return sum(keys.untyped_storage().nbytes() + values.untyped_storage().nbytes() for keys, values in key_values)


def _shared_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    length = min(a.shape[0], b.shape[0])
    differs = (a[:length] != b[:length]).nonzero()
    return int(differs[0].item()) if differs.numel() else length


class PrefixCache:
    """An LRU store of (token ids, keys and values) within a byte budget. Used from the engine thread only."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[int, tuple[torch.Tensor, KeyValues]] = OrderedDict()
        self._next_key = 0
        self._size = 0

    @property
    def size_bytes(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt_ids: list[int], *, take: bool = False) -> PrefixHit | None:
        """The longest stored prefix of `prompt_ids`, leaving at least its last token to be fed (for its logits).

        With `take`, an entry the prompt continues whole (the next turn of its conversation) leaves the cache with the
        hit, so that its keys and values need no copy: the entry the request stores when it ends would have replaced
        it anyway. An entry shared only in part (another branch, or another conversation's opening) stays."""
        if not self._entries or len(prompt_ids) < 2:
            return None
        prompt = torch.tensor(prompt_ids)
        best_key, best_length = None, 0
        for key, (tokens, _) in self._entries.items():
            length = min(_shared_prefix(tokens, prompt), len(prompt_ids) - 1)
            if length > best_length:
                best_key, best_length = key, length
        if best_key is None:
            return None
        tokens, key_values = self._entries[best_key]
        taken = take and best_length == tokens.shape[0]
        if taken:
            self._drop(best_key)
        else:
            self._entries.move_to_end(best_key)
        return PrefixHit(best_length, [(k[:, :, :best_length], v[:, :, :best_length]) for k, v in key_values], taken)

    def store(self, token_ids: list[int], key_values: KeyValues) -> None:
        """Keep `key_values` (owned by the cache from now on: nothing may write into their buffers) for `token_ids`;
        entries it extends are dropped."""
        size = _bytes(key_values)
        if not token_ids or size > self.budget_bytes:
            return
        tokens = torch.tensor(token_ids)
        for key, (stored, _) in list(self._entries.items()):
            if stored.shape[0] <= tokens.shape[0] and _shared_prefix(stored, tokens) == stored.shape[0]:
                self._drop(key)  # the new entry answers every lookup the old one did, and more
        self._entries[self._next_key] = (tokens, key_values)
        self._next_key += 1
        self._size += size
        while self._size > self.budget_bytes:
            self._drop(next(iter(self._entries)))

    def clear(self) -> None:
        self._entries.clear()
        self._size = 0

    def _drop(self, key: int) -> None:
        _, key_values = self._entries.pop(key)
        self._size -= _bytes(key_values)
