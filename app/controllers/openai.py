"""The OpenAI-compatible API under /v1: chat completions (streaming and not) and models.

Stateless like OpenAI's: the model sees exactly the request's messages. The extension field `chipi_session_id`
also stores the last user message and the reply in that Chipi conversation.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from litestar import Controller, get, post

from app.controllers.auth import KEY_REQUIRED
from app.controllers.openapi import COMPLETION_STREAM_EVENT, openai_error_responses, success_content
from app.controllers.sse import event_stream, sse_event
from app.domain.errors import InvalidInputError, ModelUnavailableError, NotFoundError
from app.domain.generation import ChatTurn
from app.domain.openai import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessageOut,
    Choice,
    ChunkChoice,
    ChunkDelta,
    CompletionUsage,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorBody,
)
from app.domain.reasoning import Piece
from app.services.chat import TIME_LIMIT_REASON, ChatService, Generation, ReplyFailed, ReplyFinished, ReplyOptions

_STARTED = int(time.time())


def served_model_id(chat: ChatService) -> str:
    """The model's id in /v1: a local folder's name, or the hub id as configured."""
    name = chat.model.name
    return Path(name).name if Path(name).exists() else name


def _turns(request: ChatCompletionRequest) -> tuple[str | None, list[ChatTurn]]:
    """System (and developer) messages become the system prompt; the rest are the turns."""
    system = [m.text() for m in request.messages if m.role in ("system", "developer")]
    turns = [ChatTurn(m.role, m.text()) for m in request.messages if m.role in ("user", "assistant")]
    return "\n\n".join(system) or None, turns


def _options(request: ChatCompletionRequest) -> ReplyOptions:
    if request.n != 1:
        raise InvalidInputError("only n=1 is supported", field="n")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    if len(stop) > 4:
        raise InvalidInputError("at most 4 stop sequences", field="stop")
    return ReplyOptions(
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=stop,
        seed=request.seed,
    )


def _finish_reason(reason: str) -> str:
    # OpenAI has no "cancelled"; a reply cut off by the server's time limit is cut off like one by max_tokens
    return "length" if reason in ("length", TIME_LIMIT_REASON) else "stop"


def _usage(event: ReplyFinished) -> CompletionUsage:
    prompt, completion = event.usage.prompt_tokens, event.usage.completion_tokens
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _collect(generation: Generation, model: str, request: ChatCompletionRequest) -> ChatCompletion:
    content: list[str] = []
    reasoning: list[str] = []
    async for _, event in generation.follow():
        if isinstance(event, Piece):
            (content if event.kind == "content" else reasoning if event.kind == "reasoning" else []).append(event.text)
        elif isinstance(event, ReplyFailed):
            raise ModelUnavailableError(event.detail)
        else:
            message = ChatMessageOut(
                role="assistant", content="".join(content), reasoning_content="".join(reasoning) or None
            )
            return ChatCompletion(
                id=f"chatcmpl-{generation.id}",
                created=int(time.time()),
                model=model,
                choices=[Choice(index=0, message=message, finish_reason=_finish_reason(event.finish_reason))],
                usage=_usage(event),
                chipi_session_id=request.chipi_session_id,
            )
    raise ModelUnavailableError("the reply ended without finishing")


async def _chunks(generation: Generation, model: str, include_usage: bool) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(delta: ChunkDelta, finish_reason: str | None = None) -> bytes:
        body = ChatCompletionChunk(
            id=f"chatcmpl-{generation.id}",
            created=created,
            model=model,
            choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
        )
        return sse_event(msgspec.json.encode(body).decode())

    yield chunk(ChunkDelta(role="assistant", content=""))
    async for _, event in generation.follow():
        if isinstance(event, Piece):
            if event.kind == "content":
                yield chunk(ChunkDelta(content=event.text))
            elif event.kind == "reasoning":
                yield chunk(ChunkDelta(reasoning_content=event.text))
        elif isinstance(event, ReplyFinished):
            yield chunk(ChunkDelta(), _finish_reason(event.finish_reason))
            if include_usage:
                usage = ChatCompletionChunk(
                    id=f"chatcmpl-{generation.id}", created=created, model=model, choices=[], usage=_usage(event)
                )
                yield sse_event(msgspec.json.encode(usage).decode())
        else:
            error = OpenAIErrorBody(OpenAIError(message=event.detail, type="server_error", param=None, code=event.code))
            yield sse_event(msgspec.json.encode(error).decode())
    yield sse_event("[DONE]")


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]
    security = KEY_REQUIRED

    @get(
        "/models",
        operation_id="listModels",
        summary="The model this server serves",
        responses=openai_error_responses(401),
    )
    async def list_models(self, chat: ChatService) -> ModelList:
        return ModelList(data=[ModelCard(id=served_model_id(chat), created=_STARTED)])

    @post(
        "/chat/completions",
        operation_id="createChatCompletion",
        summary="OpenAI-compatible chat completion; with `stream`, server-sent chunks ending in `[DONE]`",
        status_code=200,
        responses=openai_error_responses(400, 401, 404, 409, 413),
        operation_class=success_content(("text/event-stream", COMPLETION_STREAM_EVENT), keep_inferred=True),
    )
    async def create_chat_completion(
        self, chat: ChatService, owner: str, data: ChatCompletionRequest
    ) -> ChatCompletion:
        model = served_model_id(chat)
        if data.model not in (model, chat.model.name):
            raise NotFoundError(f"model {data.model!r} is not served here; this server serves {model!r}", field="model")
        system_prompt, turns = _turns(data)
        generation = await chat.start_completion(owner, system_prompt, turns, _options(data), data.chipi_session_id)
        if data.stream:
            include_usage = bool(data.stream_options and data.stream_options.include_usage)
            stream: Any = event_stream(_chunks(generation, model, include_usage))
            return stream  # type: ignore[no-any-return]  # a streamed response instead of the body
        return await _collect(generation, model, data)
