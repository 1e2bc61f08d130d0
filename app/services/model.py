"""ModelService: the language model, loaded once per process, generating off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

from app.domain.errors import ModelUnavailableError
from app.domain.generation import ChatTurn, GenerationFinished, GenerationOutput, GenerationParams, Prompt, TextDelta
from app.domain.reasoning import CLOSE_TAG, OPEN_TAG
from app.domain.rules import trim_history
from app.services import cpu_layers, llama_forward
from app.services.converted import ConvertedModel
from app.services.engine import DecodeEngine, EngineEvent, Finished
from app.services.llama_forward import LlamaForward
from app.services.own_thread import call_in_own_thread
from app.services.prefix_cache import PrefixCache
from app.services.tokenizer import ChatTokenizer, load_tokenizer, next_turn_opening
from app.settings import Settings

logger = logging.getLogger(__name__)


class _IncrementalDecoder:
    """Turns a reply's token ids, fed as they come, into exact text deltas.

    Each feed decodes a short window: the ids since the last delta, after the few ids that produced it. The text of
    those few ids alone is cut off the front, so tokenizers that merge spaces or split a character across tokens
    come out right, and the cost per token stays flat however long the reply grows. A trailing replacement
    character waits for its next token.
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._context = 0  # where the window starts: the ids of the last delta
        self._sent = 0  # where the ids not yet turned into text start

    def feed(self, token_ids: Sequence[int]) -> str:
        """The text the reply gained with `token_ids` ("" when there is none yet)."""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._context : self._sent])
        text = self._decode(self._ids[self._context :])
        if text.endswith("\ufffd") or len(text) <= len(before):
            return ""
        self._context, self._sent = self._sent, len(self._ids)
        return text[len(before) :]

    @property
    def token_ids(self) -> list[int]:
        """Every id fed so far."""
        return self._ids

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)


class _Handover:
    """One request's engine events, from the engine thread to the event loop.

    The engine appends; the loop takes everything waiting at once. The engine wakes the loop only when it waits for
    events, or during a pause only for the last one: a consumer that pauses between deltas costs the loop one wake
    per pause instead of one per token (`call_soon_threadsafe` writes to the loop's wake-up pipe each time).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._events: list[EngineEvent] = []
        self._waiter: asyncio.Future[None] | None = None
        self._tokens_wake = True  # False while the consumer pauses: only a request's last event wakes it then

    def put(self, event: EngineEvent) -> None:  # the engine's sink, on its thread
        if self._loop.is_closed():  # the consumer is gone: the engine counts the request as cancelled
            raise RuntimeError("the event loop of this request's consumer is closed")
        with self._lock:
            self._events.append(event)
            waiter = self._waiter
            if waiter is None or (not self._tokens_wake and isinstance(event, int)):
                return
            self._waiter = None
        self._loop.call_soon_threadsafe(_resolve, waiter)

    async def take(self) -> list[EngineEvent]:
        """Every event waiting, waiting for one if there is none."""
        while True:
            with self._lock:
                if self._events:
                    events, self._events = self._events, []
                    return events
                self._waiter, self._tokens_wake = self._loop.create_future(), True
                waiter = self._waiter
            await waiter

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the request's last event comes first."""
        with self._lock:
            if self._events and not isinstance(self._events[-1], int):
                return
            self._waiter, self._tokens_wake = self._loop.create_future(), False
            waiter = self._waiter
        timer = self._loop.call_later(seconds, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            with self._lock:
                if self._waiter is waiter:
                    self._waiter = None


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _resolve_dtype(setting: str) -> torch.dtype:
    """CHIPI_DTYPE as a torch dtype: `auto` is bfloat16 on a GPU, else float32 (float16 decodes faster on the CPU
    but reads long prompts slower; the README's Benchmark has the figures)."""
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


def _load_weights(source: str, settings: Settings, device_map: str) -> Any:
    dtype = _resolve_dtype(settings.dtype)
    converted = ConvertedModel.for_settings(source, settings, dtype)
    if converted is not None and (forward := converted.load()) is not None:
        return forward
    from transformers import AutoModelForCausalLM  # here: a converted model's start does without its imports

    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device_map)
    model.eval()
    if model.device.type == "cpu":
        if llama_forward.supports(model):
            layers = cpu_layers.float32_layers(settings.quantize, settings.activation_bits)
            lean = LlamaForward.from_transformers(model, layers)
            cpu_layers.own_remaining_parameters(lean)
            if converted is not None:
                converted.save(lean)
            return lean
        return cpu_layers.prepare_for_cpu(model, quantize=settings.quantize)
    if settings.quantize in ("int8", "int4"):
        raise ModelUnavailableError(f"CHIPI_QUANTIZE={settings.quantize} runs on the CPU only, not on {model.device}")
    return model


class ModelService:
    """One causal language model with its tokenizer and chat template, shared by every request.

    Generation runs on the batched decode engine's own thread (app/services/engine.py), so the event loop stays free
    and replies generated at the same time share the model's forward passes. The model is loaded with accelerate's
    `device_map`, so it lands on the GPU where there is one and on the CPU otherwise.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: ChatTokenizer,
        *,
        name: str,
        context_window: int,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_window = context_window
        # True for models that think in <think>...</think> (their tokenizer has both tags). Looked up here, as the
        # model loads: building the vocabulary takes tens of milliseconds, and every model title asks (on the loop).
        vocabulary = tokenizer.vocabulary()
        self.splits_reasoning = OPEN_TAG in vocabulary and CLOSE_TAG in vocabulary
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._engine = DecodeEngine(
            model,
            eos_ids,
            prefix_cache,
            next_turn_opening=next_turn_opening(tokenizer),
            context_window=context_window,
        )

    @classmethod
    def load(cls, settings: Settings) -> ModelService:
        """Load the configured model: a local folder, or a Hugging Face hub id the user chose."""
        source = settings.model
        if not Path(source).exists() and (source.startswith((".", "/")) or settings.default_model_requested):
            raise ModelUnavailableError(f"model folder {source} does not exist; run `chipi fetch-models` first")
        started = time.perf_counter()
        device_map = "auto" if settings.device == "auto" else settings.device
        tokenizer = load_tokenizer(source)
        # Loading runs parallel PyTorch work; in a thread that then ends, so this caller's thread keeps no OpenMP team
        # that would slow the decode engine's (see app/services/own_thread.py).
        model = call_in_own_thread(_load_weights, source, settings, device_map)
        if isinstance(model, LlamaForward):
            model.keep_keys_values_in(settings.kv_cache_dtype)
        context_window = settings.context_window or int(getattr(model.config, "max_position_embeddings", 2048))
        logger.info(
            "loaded model %s on %s (%s, quantization %s) in %.1fs",
            source,
            model.device,
            model.dtype,
            settings.quantize,
            time.perf_counter() - started,
        )
        return cls(
            model,
            tokenizer,
            name=source,
            context_window=context_window,
            prefix_cache_bytes=settings.prefix_cache_mb * 2**20,
        )

    @property
    def device(self) -> str:
        return str(self.model.device)

    def close(self) -> None:
        self._engine.close()

    async def aclose(self) -> None:
        """Stop the engine thread without blocking the event loop (what the app's shutdown calls)."""
        await asyncio.to_thread(self.close)

    def build_prompt(
        self, system_prompt: str | None, turns: Sequence[ChatTurn], max_new_tokens: int, *, thinking: bool = False
    ) -> Prompt:
        """The chat-templated prompt for `turns`, dropping the oldest turns until it leaves room for the reply.

        `thinking` reaches templates that know `enable_thinking` (Qwen3 style); other templates ignore it.
        """
        budget = self.context_window - max_new_tokens
        encoded: dict[int, list[int]] = {}

        def fits(candidate: Sequence[ChatTurn]) -> bool:
            encoded[len(candidate)] = self._encode(system_prompt, candidate, thinking)
            return len(encoded[len(candidate)]) <= budget

        kept = trim_history(turns, fits, can_start=lambda turn: turn.role == "user")
        return Prompt(token_ids=encoded[len(kept)], turns_used=len(kept))

    def _encode(self, system_prompt: str | None, turns: Sequence[ChatTurn], thinking: bool) -> list[int]:
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": turn.role, "content": turn.content} for turn in turns]
        return self.tokenizer.encode_chat(messages, thinking=thinking)

    async def stream(
        self, prompt: Prompt, params: GenerationParams, cancelled: threading.Event
    ) -> AsyncIterator[GenerationOutput]:
        """Text deltas as the model produces them, then one GenerationFinished.

        The request joins the engine's running batch at its next step. Setting `cancelled` takes it out of the batch
        before the next step; so does closing this iterator.
        """
        handover = _Handover()
        self._engine.submit(
            prompt.token_ids,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            cancelled=cancelled,
            sink=handover.put,
        )
        decoder = _IncrementalDecoder(self.tokenizer)
        try:
            while True:
                # Everything that came since the last delta: a consumer that paused or fell behind decodes once.
                token_ids: list[int] = []
                end: Finished | BaseException | None = None
                for event in await handover.take():
                    if not isinstance(event, int):
                        end = event
                        break
                    token_ids.append(event)
                text = decoder.feed(token_ids) if token_ids else ""
                if text:
                    yield TextDelta(text)
                if isinstance(end, BaseException):
                    raise end
                if end is not None:
                    reply_ids = decoder.token_ids[:-1] if end.reason == "stop" else decoder.token_ids  # no stop token
                    self.tokenizer.remember_reply(prompt.token_ids, reply_ids)
                    yield GenerationFinished(end.reason, len(prompt.token_ids), end.completion_tokens)
                    return
                if text and params.delta_interval_seconds:
                    await handover.pause(params.delta_interval_seconds)
        finally:
            cancelled.set()
