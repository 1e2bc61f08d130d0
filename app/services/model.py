"""ModelService: the language model, loaded once per process, generating off the event loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from app.domain.errors import ModelUnavailableError
from app.domain.reasoning import CLOSE_TAG, OPEN_TAG
from app.domain.rules import trim_history
from app.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """Token ids ready for the model, and how many of the offered turns survived trimming."""

    token_ids: list[int]
    turns_used: int


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None  # makes sampling repeatable


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class GenerationFinished:
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int


GenerationOutput = TextDelta | GenerationFinished


class _IncrementalDecoder(BaseStreamer):
    """Turns the token ids `generate` produces into exact text deltas.

    The generated ids are decoded whole each step and only the new suffix is emitted, so multi-token characters
    and tokenizers that merge spaces come out right; a trailing replacement character waits for its next token.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, emit: Callable[[GenerationOutput], None]) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._ids: list[int] = []
        self._sent = 0
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self._ids.extend(value.reshape(-1).tolist())
        text = str(self._tokenizer.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))
        if text.endswith("\ufffd") or len(text) <= self._sent:
            return
        self._emit(TextDelta(text[self._sent :]))
        self._sent = len(text)

    def end(self) -> None:
        pass


class _StopWhenCancelled(StoppingCriteria):
    def __init__(self, cancelled: threading.Event) -> None:
        self._cancelled = cancelled

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


_END = object()


def _resolve_dtype(setting: str) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[setting]


class ModelService:
    """One causal language model with its tokenizer and chat template, shared by every request.

    Generation runs on a single worker thread so the event loop stays free; the model is loaded with accelerate's
    `device_map`, so it lands on the GPU where there is one and on the CPU otherwise.
    """

    def __init__(self, model: Any, tokenizer: PreTrainedTokenizerBase, *, name: str, context_window: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_window = context_window
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chipi-generate")
        eos = model.generation_config.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            self._eos_ids.add(tokenizer.eos_token_id)
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self._eos_ids), 0)

    @classmethod
    def load(cls, settings: Settings) -> ModelService:
        """Load the configured model: a local folder, or a Hugging Face hub id the user chose."""
        source = settings.model
        if not Path(source).exists() and (source.startswith((".", "/")) or settings.default_model_requested):
            raise ModelUnavailableError(f"model folder {source} does not exist; run `chipi fetch-models` first")
        started = time.perf_counter()
        device_map = "auto" if settings.device == "auto" else settings.device
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=_resolve_dtype(settings.dtype), device_map=device_map
        )
        model.eval()  # type: ignore[no-untyped-call]
        context_window = settings.context_window or int(getattr(model.config, "max_position_embeddings", 2048))
        logger.info(
            "loaded model %s on %s (%s) in %.1fs", source, model.device, model.dtype, time.perf_counter() - started
        )
        return cls(model, tokenizer, name=source, context_window=context_window)

    @property
    def device(self) -> str:
        return str(self.model.device)

    @property
    def splits_reasoning(self) -> bool:
        """True for models that think in <think>...</think> (their tokenizer has both tags)."""
        vocabulary = self.tokenizer.get_vocab()
        return OPEN_TAG in vocabulary and CLOSE_TAG in vocabulary

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

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
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False, enable_thinking=thinking
        )
        return list(ids)

    async def stream(
        self, prompt: Prompt, params: GenerationParams, cancelled: threading.Event
    ) -> AsyncIterator[GenerationOutput]:
        """Text deltas as the model produces them, then one GenerationFinished.

        Setting `cancelled` stops the model after the token it is computing; so does closing this iterator.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[object] = asyncio.Queue()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(outputs.put_nowait, item)

        work = loop.run_in_executor(self._executor, self._generate, prompt, params, cancelled, emit)
        try:
            while (item := await outputs.get()) is not _END:
                yield item  # type: ignore[misc]
            await work  # re-raises what went wrong in the worker
        finally:
            cancelled.set()

    def _generate(
        self,
        prompt: Prompt,
        params: GenerationParams,
        cancelled: threading.Event,
        emit: Callable[[object], None],
    ) -> None:
        try:
            if cancelled.is_set():  # cancelled while queued behind another generation
                emit(GenerationFinished("cancelled", len(prompt.token_ids), 0))
                return
            input_ids = torch.tensor([prompt.token_ids], device=self.model.device)
            sampling: dict[str, Any] = {"do_sample": False}
            if params.temperature > 0:
                sampling = {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p}
                if params.seed is not None:
                    torch.manual_seed(params.seed)  # generations run one at a time on this thread
            with torch.inference_mode():
                output = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=params.max_new_tokens,
                    pad_token_id=self._pad_id,
                    streamer=_IncrementalDecoder(self.tokenizer, emit),
                    stopping_criteria=[_StopWhenCancelled(cancelled)],
                    **sampling,
                )
            new_ids = output[0, input_ids.shape[1] :].tolist()
            if cancelled.is_set():
                finish_reason = "cancelled"
            elif new_ids and new_ids[-1] in self._eos_ids:
                finish_reason = "stop"
            else:
                finish_reason = "length"
            emit(GenerationFinished(finish_reason, len(prompt.token_ids), len(new_ids)))
        finally:
            emit(_END)
