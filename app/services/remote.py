"""RemoteModelService: generation on an OpenAI-compatible server instead of a local model.

vLLM, text-generation-inference, llama.cpp's server, Ollama and Chipi's own /v1 all speak the streaming chat
completions API. Chipi keeps the conversations, titles and persistence; the remote server only generates.
Stopping a reply closes the HTTP stream, which those servers take as an abort.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.domain.errors import ModelUnavailableError
from app.domain.generation import ChatTurn, GenerationFinished, GenerationOutput, GenerationParams, Prompt, TextDelta
from app.domain.reasoning import CLOSE_TAG, OPEN_TAG
from app.domain.rules import trim_history
from app.settings import Settings

logger = logging.getLogger(__name__)

# Without the remote model's tokenizer, history is trimmed by an estimate: English text runs at about four
# characters per token; three keeps a margin for other languages and the chat template's own tokens.
CHARS_PER_TOKEN = 3
CANCEL_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class RemotePrompt(Prompt):
    """The chat messages to send; `token_ids` stays empty, the server tokenizes."""

    messages: list[dict[str, str]] = field(default_factory=list)
    thinking: bool = False


class RemoteModelService:
    """The ModelService interface over a remote OpenAI-compatible chat completions endpoint."""

    splits_reasoning = True  # inline <think> tags are split; `reasoning_content` deltas are wrapped in them

    def __init__(self, client: httpx.AsyncClient, *, base_url: str, model: str, context_window: int) -> None:
        self._client = client
        self.base_url = base_url
        self.name = model
        self.context_window = context_window

    @classmethod
    async def connect(cls, settings: Settings) -> RemoteModelService:
        """Open the client; without CHIPI_REMOTE_MODEL, use the first model the server lists."""
        base_url = settings.remote_base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {settings.remote_api_key}"} if settings.remote_api_key else {}
        timeout = httpx.Timeout(connect=10, read=settings.remote_timeout_seconds, write=30, pool=30)
        client = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout)
        model = settings.remote_model
        if not model:
            try:
                response = await client.get("/models")
                response.raise_for_status()
                model = response.json()["data"][0]["id"]
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
                await client.aclose()
                raise ModelUnavailableError(f"cannot list the models of {base_url}: {exc}") from exc
        logger.info("generating with %s at %s", model, base_url)
        return cls(client, base_url=base_url, model=model, context_window=settings.context_window or 8192)

    @property
    def device(self) -> str:
        return f"remote {self.base_url}"

    async def aclose(self) -> None:
        await self._client.aclose()

    def build_prompt(
        self, system_prompt: str | None, turns: Sequence[ChatTurn], max_new_tokens: int, *, thinking: bool = False
    ) -> RemotePrompt:
        """The messages for `turns`, dropping the oldest turns until they (by estimate) leave room for the reply."""
        budget_chars = (self.context_window - max_new_tokens) * CHARS_PER_TOKEN - len(system_prompt or "")

        def fits(candidate: Sequence[ChatTurn]) -> bool:
            return sum(len(turn.content) for turn in candidate) <= budget_chars

        kept = trim_history(turns, fits, can_start=lambda turn: turn.role == "user")
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages += [{"role": turn.role, "content": turn.content} for turn in kept]
        return RemotePrompt(token_ids=[], turns_used=len(kept), messages=messages, thinking=thinking)

    async def stream(
        self, prompt: Prompt, params: GenerationParams, cancelled: threading.Event
    ) -> AsyncIterator[GenerationOutput]:
        """Text deltas as the server streams them, then one GenerationFinished; `cancelled` closes the stream."""
        assert isinstance(prompt, RemotePrompt)
        body: dict[str, Any] = {
            "model": self.name,
            "messages": prompt.messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": prompt.thinking},  # vLLM / SGLang; others ignore it
        }
        if params.seed is not None:
            body["seed"] = params.seed
        finish_reason, deltas, thinking = "stop", 0, False
        usage: dict[str, Any] = {}
        try:
            async with self._client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    raise ModelUnavailableError(f"the remote engine answered {response.status_code}: {detail}")
                async for chunk in _chunks(response, cancelled):
                    if "error" in chunk:
                        raise ModelUnavailableError(f"the remote engine failed: {chunk['error']}")
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        reasoning, content = delta.get("reasoning_content"), delta.get("content")
                        if reasoning:
                            yield TextDelta(reasoning if thinking else OPEN_TAG + reasoning)
                            thinking, deltas = True, deltas + 1
                        if content:
                            yield TextDelta(CLOSE_TAG + content if thinking else content)
                            thinking, deltas = False, deltas + 1
                        finish_reason = choice.get("finish_reason") or finish_reason
        except httpx.HTTPError as exc:
            raise ModelUnavailableError(f"the remote engine at {self.base_url} is unreachable: {exc}") from exc
        if cancelled.is_set():
            finish_reason = "cancelled"
        elif finish_reason != "length":
            finish_reason = "stop"  # engines also say "eos", "stop_sequence" ...
        yield GenerationFinished(
            finish_reason=finish_reason,
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", deltas)),
        )


async def _chunks(response: httpx.Response, cancelled: threading.Event) -> AsyncIterator[dict[str, Any]]:
    """The JSON chunks of an SSE chat completion stream, until `[DONE]`, its end, or `cancelled`."""
    lines = response.aiter_lines()
    while True:
        next_line = asyncio.ensure_future(anext(lines))
        while not next_line.done():
            if cancelled.is_set():
                next_line.cancel()
                return  # leaving the `stream` block closes the connection: the server aborts the generation
            await asyncio.wait({next_line}, timeout=CANCEL_POLL_SECONDS)
        try:
            line = next_line.result()
        except StopAsyncIteration:
            return
        if not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
