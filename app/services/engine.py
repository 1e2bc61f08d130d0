"""The batched decode engine: every reply being generated shares one forward pass per token.

A single engine thread owns the model. Each loop iteration it
1. reads the prompts of the requests that arrived: each alone, PREFILL_CHUNK_TOKENS a pass, taking turns between
   them, for about PREFILL_SLICE_SECONDS (so that a long prompt delays the running replies' next token, and the
   start of a request that arrives meanwhile, by that much rather than by its whole prefill); a prompt read to its
   end has its first token sampled and sent at once, and its KV cache merged into the running batch;
2. drops the rows whose caller cancelled;
3. runs one decode step for all rows together: one `model(...)` call on a `[rows, 1]` batch of their last tokens,
   then samples each row's next token with that row's own settings, and retires the rows that are done.

The running batch is one KV cache whose per-layer key/value tensors hold every row, left-padded to a common
length, with an attention mask that hides the padding and explicit position ids so that padding never shifts a
row's positions. Left padding means every row appends its next token in the same column, so one forward serves
them all. The cache's buffers (`SpareRoomLayer`) keep room for more columns and rows: each step writes its new
column in place instead of copying the whole cache as `DynamicCache` does, a joining row is written into the next
free row (behind padding up to the batch's length; a prompt longer than that moves every row behind more), a
leaving row's place is taken by the last row, and columns that only hold padding for the rows still present are
dropped by moving the buffers' start.

With a prefix cache (app/services/prefix_cache.py), a new request's prefill starts from the stored keys and values
of the longest prefix of its prompt that an earlier request fed (the history of a conversation's previous turns), and
each request that leaves the batch stores its own for the next one. A turn that continues its previous turn's entry
whole appends to that entry's buffers in place instead of copying them. When the engine has been idle for
READ_AHEAD_AFTER_SECONDS since a reply ended (the user reads it and types), it reads that conversation's next turn's
opening ahead (for ChatML `<|im_end|>\n<|im_start|>user\n`, the same after every reply) into the stored entry: the
next turn then reads only the user's message and the reply's opening, 5 of the 18 tokens of a short follow-up
question fewer, each attending over the whole history.

The cost of a decode step grows far slower than its number of rows, since the weights are read once per step for
all of them (on the 2-core CPU this was built on: ~35 ms for one row, ~65 ms for eight), which is where the
throughput of concurrent replies comes from. Prefilling each new request alone keeps a lone request's computation
identical to `model.generate`, and lets a request join at any step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from app.services.kv_cache import KeyValues, SpareRoomLayer, holds_other_rows, spare_room_cache, transformers_cache
from app.services.llama_forward import LlamaForward
from app.services.prefix_cache import PrefixCache
from app.services.sampling import GENERATE_DEFAULT_TOP_K, Sampler, next_tokens

logger = logging.getLogger(__name__)


# A prompt is read this many tokens at a time. Each pass's activations then stay small (the default model's widest,
# gate and up together, 768 KiB at 64 tokens), so they come from the heap that the passes before freed instead of
# from fresh mappings paid in page faults (app/serving.py keeps blocks of 1 MiB and more mapped): a 1,674-token
# message's first token came in 1.52 instead of 2.2 s through the API on an AMD EPYC with AVX-512, as fast as the
# same engine without the server's thresholds. 32 tokens a pass took 1.8 s, 256 1.75 s.
PREFILL_CHUNK_TOKENS = 64
# A finished reply's next turn opening is read ahead once the engine has had nothing to do for this long: a client
# that sends the next turn at once (a script, a benchmark) finds the engine free instead of behind that pass.
READ_AHEAD_AFTER_SECONDS = 0.25
# The engine reads prompts for about this long between two decode steps of the running replies (and two looks for
# newly arrived requests).
PREFILL_SLICE_SECONDS = 0.05


@dataclass(frozen=True)
class Finished:
    """The last event of a request: why it ended and how many tokens it produced."""

    reason: str  # stop | length | cancelled
    completion_tokens: int


# What the engine hands a request's sink, in order: token ids, then one Finished, or an exception if the model failed.
EngineEvent = int | Finished | BaseException
Sink = Callable[[EngineEvent], None]
# A cache holding a copy of some keys and values, with room for more: the kind the model's forward appends to.
RoomCacheMaker = Callable[[KeyValues], Any]


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    cancelled: threading.Event
    sink: Sink
    generated: list[int] = field(default_factory=list)

    @property
    def next_input(self) -> int:
        """The token the next decode step feeds: the last one sampled, or the prompt's last where none was yet (a
        request that joined the batch with only that token of its prompt left to read)."""
        return self.generated[-1] if self.generated else self.prompt_ids[-1]

    @property
    def cached_tokens(self) -> int:
        """Real (unpadded) tokens of this request in the KV cache: all but `next_input`, not yet fed."""
        return len(self.prompt_ids) + len(self.generated) - 1

    def send(self, event: EngineEvent) -> None:
        """Hand an event to the caller; a caller that has gone away (its event loop closed) counts as cancelled."""
        try:
            self.sink(event)
        except Exception:  # e.g. RuntimeError from a closed event loop
            logger.debug("a generation's consumer is gone; cancelling it", exc_info=True)
            self.cancelled.set()


@dataclass(eq=False)
class _Prefill:
    """A request whose prompt is being read: the cache of the tokens read so far."""

    request: _Request
    cache: Any
    read: int  # prompt tokens in `cache`


class _Batch:
    """The running rows and their shared, left-padded KV cache and attention mask."""

    def __init__(self, room_cache: RoomCacheMaker) -> None:
        self.rows: list[_Request] = []
        self.cache: Any = None  # a RoomCache for Chipi's forward, a transformers Cache for transformers' own
        self._room_cache = room_cache
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [rows, columns]: 1 for a real token, 0 for padding

    def clear(self) -> None:
        self.rows, self.cache, self.mask = [], None, torch.zeros(0, 0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, request: _Request, prefilled: Any) -> None:
        """Merge a freshly prefilled request (a one-row cache) into the batch as its last row, left-padding the
        shorter side."""
        new = _key_values(prefilled)
        tokens = new[0][0].shape[2]
        row_mask = torch.ones(1, tokens, dtype=torch.long, device=new[0][0].device)
        if self.cache is None:
            self.rows, self.mask = [request], row_mask
            if all(isinstance(layer, SpareRoomLayer) for layer in prefilled.layers):
                self.cache = prefilled  # already has room to grow: no need to copy it
            else:
                self.cache = self._room_cache(new)
            return
        width = max(self.mask.shape[1], tokens)
        if width > self.mask.shape[1]:  # a prompt longer than the batch: every row gets padding in front
            for layer in self.cache.layers:
                layer.widen(width)
        for layer, (keys, values) in zip(self.cache.layers, new, strict=True):
            layer.add_row(keys, values)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(row_mask, width, dim=1)])
        self.rows.append(request)

    def keep(self, keep: list[bool]) -> None:
        """Drop the rows marked False (the last rows take their places), then the leading columns that are padding
        in every remaining row."""
        if all(keep):
            return
        if not any(keep) or self.cache is None:
            self.clear()
            return
        kept = [i for i, (_, kept) in enumerate(zip(self.rows, keep, strict=True)) if kept]
        order = list(range(len(kept)))
        # each dropped row among the first len(kept) is replaced by a kept row from beyond them
        for hole, last in zip([i for i in order if not keep[i]], [i for i in kept if i >= len(kept)], strict=True):
            order[hole] = last
        self.rows = [self.rows[i] for i in order]
        self.mask = self.mask[order]
        first_real = int(self.mask.any(dim=0).long().argmax().item())  # every row has a real token somewhere
        self.mask = self.mask[:, first_real:]
        for layer in self.cache.layers:
            layer.keep_rows(order)
            if first_real:
                layer.drop_leading(first_real)

    def row_key_values(self, index: int) -> KeyValues:
        """Row `index`'s keys and values, padding included (its real tokens are the last columns)."""
        assert self.cache is not None
        return [(keys[index : index + 1], values[index : index + 1]) for keys, values in _key_values(self.cache)]


def _key_values(cache: Any) -> KeyValues:
    """Every layer's keys and values; only plain full-attention layers can be padded and merged like this."""
    pairs: KeyValues = []
    for layer in cache.layers:
        if not _full_attention(layer) or layer.keys is None or layer.values is None:
            raise TypeError("batched decoding needs a model whose every layer keeps a full key/value cache")
        pairs.append((layer.keys, layer.values))
    return pairs


def _full_attention(layer: Any) -> bool:
    if isinstance(layer, SpareRoomLayer):
        return True
    from transformers.cache_utils import DynamicLayer  # a transformers cache: transformers' forward has loaded it

    return isinstance(layer, DynamicLayer) and not layer.is_sliding


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`tensor` with zeros put in front along `dim` until it is `width` long."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeEngine:
    """Runs every submitted request on one thread, decoding all running requests together, one token per step."""

    def __init__(
        self,
        model: Any,
        eos_ids: set[int],
        prefix_cache: PrefixCache | None = None,
        *,
        next_turn_opening: Sequence[int] = (),
        context_window: int | None = None,
    ) -> None:
        """`next_turn_opening`: what the chat template puts after a reply's end token and before the next user
        message (tokenizer.next_turn_opening), read ahead when a reply ends (see _remember) while the conversation
        stays within `context_window` tokens."""
        self._model = model
        self._eos_ids = eos_ids
        self._prefix_cache = prefix_cache
        self._next_turn_opening = list(next_turn_opening)
        self._context_window = context_window
        self._to_read_ahead: list[tuple[list[int], KeyValues, list[int]]] = []  # on the engine thread only
        config = model.generation_config
        self._top_k = config.top_k if config.top_k is not None else GENERATE_DEFAULT_TOP_K
        self._repetition_penalty: float | None = config.repetition_penalty
        self._inbox: deque[_Request] = deque()
        self._prefills: deque[_Prefill] = deque()  # on the engine thread only
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._batch = _Batch(spare_room_cache if isinstance(model, LlamaForward) else transformers_cache)

    def submit(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        cancelled: threading.Event,
        sink: Sink,
    ) -> None:
        """Queue a request; it joins the running batch at the next step. Its events go to `sink`, from the engine
        thread, so `sink` must be quick and thread-safe (e.g. `loop.call_soon_threadsafe`)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self._model.device).manual_seed(seed)
        sampler = Sampler(temperature, top_p, self._top_k, self._repetition_penalty, generator)
        request = _Request(list(prompt_ids), max_new_tokens, sampler, cancelled, sink)
        with self._wake:
            if self._closing:
                raise RuntimeError("the model is shutting down")
            self._inbox.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="chipi-decode", daemon=True)
                self._thread.start()
            self._wake.notify()

    def close(self) -> None:
        """Stop the engine: requests still queued or running finish as cancelled."""
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    # -- the engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    # Idle: sleep until a request comes (or, with a reply to read ahead for, until quiet). Busy: only
                    # pick up what arrived, never wait.
                    while not self._inbox and not self._prefills and not self._batch and not self._closing:
                        if not self._to_read_ahead:
                            self._wake.wait()
                        elif not self._wake.wait(READ_AHEAD_AFTER_SECONDS):
                            break
                    if self._closing:
                        break
                    arrived = list(self._inbox)
                    self._inbox.clear()
                try:
                    self._store_read_ahead(quiet=not arrived and not self._prefills and not self._batch)
                    for request in arrived:
                        self._admit(request)
                    self._read_prompts()
                    self._drop_cancelled()
                    if self._batch:
                        self._step()
                except Exception as exc:  # a bug here must not leave every caller waiting forever
                    logger.exception("the decode engine failed; failing the running generations")
                    self._fail(self._batch.rows, exc)
            self._store_read_ahead(quiet=False)
            with self._wake:
                leftover = list(self._inbox) + [prefill.request for prefill in self._prefills] + self._batch.rows
                self._inbox.clear()
            self._prefills.clear()
            self._batch.clear()
            for request in leftover:
                self._finish(request, "cancelled")

    def _admit(self, request: _Request) -> None:
        """Queue a new request's prompt to be read, from the longest prefix the prefix cache holds."""
        if request.cancelled.is_set():
            self._finish(request, "cancelled")
            return
        if request.max_new_tokens <= 0:
            self._finish(request, "length")
            return
        try:
            self._prefills.append(_Prefill(request, *self._prompt_cache(request.prompt_ids)))
        except Exception as exc:
            logger.exception("prefill failed")
            self._fail([request], exc)

    def _read_prompts(self) -> None:
        """Read the queued prompts a pass at a time, each in turn, for about PREFILL_SLICE_SECONDS."""
        deadline = time.monotonic() + PREFILL_SLICE_SECONDS
        while self._prefills and time.monotonic() < deadline:
            prefill = self._prefills.popleft()
            request = prefill.request
            if request.cancelled.is_set():
                self._finish(request, "cancelled")
                self._remember_read(prefill)
                continue
            try:
                if self._batch and prefill.read == len(request.prompt_ids) - 1 >= 1:
                    # Only the prompt's last token is left to read (the rest came from the prefix cache): the batch's
                    # next step feeds it and samples the first token, instead of a pass of its own that every running
                    # row would wait for.
                    self._batch.add(request, prefill.cache)
                    continue
                logits = self._read_pass(prefill)
                if logits is None:
                    self._prefills.append(prefill)  # more to read: after the others' next pass
                    continue
                token = request.sampler.next_token(logits[0], request.prompt_ids)
                if self._accept(request, token):
                    self._remember(request, _key_values(prefill.cache), sole_user=True)
                else:
                    self._batch.add(request, prefill.cache)
            except Exception as exc:
                logger.exception("prefill failed")
                self._fail([request], exc)

    def _read_pass(self, prefill: _Prefill) -> torch.Tensor | None:
        """Feed the next PREFILL_CHUNK_TOKENS of the prompt; the last token's logits once the prompt is all read."""
        prompt_ids = prefill.request.prompt_ids
        start, end = prefill.read, min(prefill.read + PREFILL_CHUNK_TOKENS, len(prompt_ids))
        device = self._model.device
        logits = self._logits(
            input_ids=torch.tensor([prompt_ids[start:end]], device=device),
            attention_mask=torch.ones(1, end, dtype=torch.long, device=device),
            position_ids=torch.arange(start, end, device=device).unsqueeze(0),
            cache=prefill.cache,
        )
        prefill.read = end
        return logits if end == len(prompt_ids) else None

    def _prompt_cache(self, prompt_ids: list[int]) -> tuple[Any, int]:
        """Where a prompt's keys and values go, and how many of its tokens it holds already: the longest prefix the
        prefix cache has (the entry itself where the prompt continues it whole, else a copy made once, with room to
        append the rest of the prompt in place), or an empty cache. Chipi's forward keeps them in its cache dtype
        (LlamaForward.keep_keys_values_in) and appends to a taken entry's buffers; transformers' own forward
        concatenates them in the model's dtype, so it copies every hit."""
        chipi_forward = isinstance(self._model, LlamaForward)
        hit = self._prefix_cache.lookup(prompt_ids, take=chipi_forward) if self._prefix_cache is not None else None
        if hit is not None:
            return self._cache_holding(hit.key_values, in_place=hit.taken), hit.length
        if chipi_forward:
            return self._model.new_cache(), 0
        from transformers.cache_utils import DynamicCache  # transformers' forward runs this model: it is loaded

        return DynamicCache(), 0

    def _drop_cancelled(self) -> None:
        keep = [not row.cancelled.is_set() for row in self._batch.rows]
        for index, (row, kept) in enumerate(zip(self._batch.rows, keep, strict=True)):
            if not kept:
                self._finish(row, "cancelled")
                self._remember(row, self._batch.row_key_values(index), sole_user=len(keep) == 1)
        self._batch.keep(keep)

    def _step(self) -> None:
        """One forward pass for every running row, then one new token per row."""
        batch = self._batch
        assert batch.cache is not None  # a batch with rows has their cache
        device = batch.mask.device
        rows = batch.rows
        batch.mask = torch.cat([batch.mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], dim=1)
        try:
            logits = self._logits(
                input_ids=torch.tensor([[row.next_input] for row in rows], device=device),
                attention_mask=batch.mask,
                position_ids=torch.tensor([[row.cached_tokens] for row in rows], device=device),
                cache=batch.cache,
            )
            tokens = next_tokens(
                [row.sampler for row in rows], logits, lambda i: rows[i].prompt_ids + rows[i].generated
            )
        except Exception as exc:
            logger.exception("decode step failed; failing the %d running generations", len(rows))
            self._fail(rows, exc)
            return
        done = [self._accept(row, token) for row, token in zip(rows, tokens, strict=True)]
        for index, row in enumerate(rows):
            if done[index]:
                self._remember(row, batch.row_key_values(index), sole_user=len(rows) == 1)
        batch.keep([not ended for ended in done])

    def _logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Each row's next-token logits, `[rows, vocab]`, having appended the fed tokens' keys and values to `cache`."""
        if isinstance(self._model, LlamaForward):
            logits: torch.Tensor = self._model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache
            )
            return logits
        output = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return cast(torch.Tensor, output.logits[:, -1])

    def _cache_holding(self, key_values: KeyValues, *, in_place: bool) -> Any:
        """A cache for the model's forward that holds `key_values` (where they are, with `in_place`, if they are the
        first columns of rooms: Chipi's forward only) and appends what is fed after them."""
        if isinstance(self._model, LlamaForward):
            return spare_room_cache(key_values, self._model.cache_dtype, in_place=in_place)
        return transformers_cache(key_values)

    def _remember(self, request: _Request, key_values: KeyValues, *, sole_user: bool) -> None:
        """Offer the keys and values of every token `request` fed (its prompt and reply) to the prefix cache.

        `sole_user`: nothing will read or write these buffers any more (the request's own cache, or the last row of
        a batch about to be cleared), so the cache keeps them as they are, unless they hold room for other rows (the
        last row of a batch that had several). Otherwise it gets a copy: it must not pin the batch's buffers (every
        row's), nor see them change. Copying a long conversation's keys and values (about 60 MB at 1,300 tokens)
        delayed the next turn, which arrives as this one ends.

        A reply with a next turn to read ahead for (_next_turn_ahead) is stored at the engine's next loop, read ahead
        if the engine is quiet by then (_store_read_ahead)."""
        if self._prefix_cache is None:
            return
        fed = (request.prompt_ids + request.generated)[: request.cached_tokens]
        own = [(keys[:, :, -len(fed) :], values[:, :, -len(fed) :]) for keys, values in key_values]
        if not sole_user or holds_other_rows(own[0][0]):
            own = [(keys.clone(), values.clone()) for keys, values in own]
        ahead = self._next_turn_ahead(request)
        if ahead:
            self._to_read_ahead.append((fed, own, ahead))
        else:
            self._prefix_cache.store(fed, own)

    def _store_read_ahead(self, *, quiet: bool) -> None:
        """Store the replies kept for reading ahead, before any prompt looks them up: read ahead if the engine is
        `quiet` (idle since they ended) and stays so, as they were fed otherwise."""
        if self._prefix_cache is None:  # nothing is kept without one (_remember)
            return
        for fed, own, ahead in self._to_read_ahead:
            if quiet and not self._inbox:  # an unlocked read: at worst, an arrival waits for one short pass
                fed, own = self._read_ahead(fed, own, ahead)
            self._prefix_cache.store(fed, own)
        self._to_read_ahead.clear()

    def _next_turn_ahead(self, request: _Request) -> list[int]:
        """What the next prompt of a just-finished request's conversation will hold after the tokens it fed, before
        the user's next message: the reply's last token (sampled, never fed) and the rest of the next turn's
        opening, which starts with the reply's end token. Empty (nothing read ahead) unless the reply ended with that
        token or at its length limit and the longer conversation fits the context window (beyond it, the next prompt
        drops turns and shares no prefix)."""
        opening, generated = self._next_turn_opening, request.generated
        if not opening or not generated:
            return []
        if generated[-1] == opening[0]:
            ahead = opening
        elif len(generated) >= request.max_new_tokens and generated[-1] not in self._eos_ids:
            ahead = [generated[-1], *opening]
        else:
            return []
        if self._context_window is not None and request.cached_tokens + len(ahead) > self._context_window:
            return []
        return ahead

    def _read_ahead(self, fed: list[int], own: KeyValues, ahead: list[int]) -> tuple[list[int], KeyValues]:
        """`fed` and their keys and values `own` (the engine's to write into), extended by `ahead`: the
        conversation's next prompt continues them when the user's message comes, and reads only that message and the
        reply's opening. A failed pass stores what was fed before it."""
        cache = self._cache_holding(own, in_place=True)
        device = self._model.device
        try:
            self._logits(
                input_ids=torch.tensor([ahead], device=device),
                attention_mask=torch.ones(1, len(fed) + len(ahead), dtype=torch.long, device=device),
                position_ids=torch.arange(len(fed), len(fed) + len(ahead), device=device).unsqueeze(0),
                cache=cache,
            )
        except Exception:
            logger.exception("reading the next turn's opening ahead failed; storing the reply as it was fed")
            return fed, own
        return fed + ahead, _key_values(cache)

    def _remember_read(self, prefill: _Prefill) -> None:
        """Offer the prompt tokens read so far to the prefix cache, for a request stopped while its prompt was read:
        the message sent again (or the conversation's next turn) starts from them, and the entry the request may have
        taken over is not lost. Nothing else uses the prefill's cache."""
        if self._prefix_cache is not None and prefill.read:
            self._prefix_cache.store(prefill.request.prompt_ids[: prefill.read], _key_values(prefill.cache))

    def _accept(self, request: _Request, token: int) -> bool:
        """Record and send a request's new token; True when that ended the request."""
        request.generated.append(token)
        request.send(token)
        if token in self._eos_ids:
            self._finish(request, "stop")
        elif len(request.generated) >= request.max_new_tokens:
            self._finish(request, "length")
        else:
            return False
        return True

    def _finish(self, request: _Request, reason: str) -> None:
        request.send(Finished(reason, len(request.generated)))

    def _fail(self, requests: list[_Request], error: Exception) -> None:
        """End `requests` with `error` (their callers raise it) and take them out of the batch."""
        failed = set(requests)
        self._batch.keep([row not in failed for row in self._batch.rows])
        for request in requests:
            request.send(error)
