"""Bodies of the OpenAI-compatible `/v1` API (chat completions and models), as msgspec Structs."""

from __future__ import annotations

from typing import Annotated, Literal
from uuid import UUID

import msgspec

# What a sampling seed can be: a 64-bit integer (torch takes those; msgspec checks bounds up to int64).
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class OpenAIError(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorBody(msgspec.Struct):
    error: OpenAIError


class TextPart(msgspec.Struct):
    type: Literal["text"]
    text: str


class ChatMessageIn(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """OpenAI's chat completion request; fields Chipi does not implement are refused, not ignored."""

    model: str
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Chipi's extension: also store the last user message and the reply in this conversation.
    chipi_session_id: UUID | None = None


class ChatMessageOut(msgspec.Struct):
    role: str
    content: str
    reasoning_content: str | None = None


class Choice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str


class CompletionUsage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    object: str = "chat.completion"
    chipi_session_id: UUID | None = None


class ChunkDelta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: ChunkDelta
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: CompletionUsage | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "chipi"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
