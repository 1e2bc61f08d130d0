"""Request and response bodies (msgspec Structs): the seed's field names, plus a few more."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import msgspec

from app.domain.models import Conversation, StoredMessage


class Pong(msgspec.Struct):
    response: str


class ComponentHealth(msgspec.Struct):
    """One part the server needs: `ready`, `loading`, `failed` (with the error) or `unreachable`."""

    state: str
    detail: str | None = None


class Health(msgspec.Struct):
    """`status` is `ok` (HTTP 200) when the database answers and every model is loaded, else `unavailable` (503)."""

    status: str
    model: str
    device: str
    active_generations: int
    queued_generations: int
    components: dict[str, ComponentHealth]
    not_ready: list[str]


class ErrorBody(msgspec.Struct):
    """Every error response: Litestar's `status_code` and `detail`, a stable `code`, and the offending field."""

    status_code: int
    detail: str
    code: str
    field: str | None = None


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    title: str | None = None
    system_prompt: str | None = None


class TitleUpdate(msgspec.Struct, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1)]


class GenerationOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Optional per-request generation settings; absent means the server's default."""

    max_tokens: Annotated[int, msgspec.Meta(ge=1, description="At most CHIPI_MAX_NEW_TOKENS")] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None


class MessageCreate(GenerationOptions, kw_only=True):
    content: Annotated[str, msgspec.Meta(min_length=1)]
    role: Literal["user"] = "user"


class RegenerateRequest(GenerationOptions, kw_only=True):
    """Which assistant reply to regenerate; without one, the latest reply of the active branch."""

    message_id: UUID | None = None


class EditRequest(GenerationOptions, kw_only=True):
    content: Annotated[str, msgspec.Meta(min_length=1)]


class BranchSwitch(msgspec.Struct, forbid_unknown_fields=True):
    """Any message of the branch to make active; the branch is followed down to its newest reply."""

    message_id: UUID


class ConversationOut(msgspec.Struct):
    session_id: UUID
    title: str
    title_source: str
    system_prompt: str | None
    model: str
    created_at: datetime
    updated_at: datetime
    active_message_id: UUID | None


class ConversationCreated(ConversationOut):
    message: str


class ConversationImported(ConversationOut):
    message: str
    imported_messages: int


class ConversationList(msgspec.Struct):
    conversations: list[ConversationOut]
    total: int
    limit: int
    offset: int


class MessageOut(msgspec.Struct):
    id: UUID
    role: str
    content: str
    reasoning: str | None
    timestamp: datetime
    status: str
    parent_id: UUID | None
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None


class ConversationDetail(msgspec.Struct):
    conversation: ConversationOut
    messages: list[MessageOut]


class StopResult(msgspec.Struct):
    session_id: UUID
    stopped: bool
    message: str
    assistant_message: MessageOut | None


class ConversationDeleted(msgspec.Struct):
    session_id: UUID
    message: str


class TitleUpdated(msgspec.Struct):
    session_id: UUID
    title: str
    message: str


class MessageExchange(msgspec.Struct):
    """The stored user message and the model's complete reply; `response` is the reply's text."""

    session_id: UUID
    user_message: MessageOut
    assistant_message: MessageOut
    response: str


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class StreamDone(msgspec.Struct):
    """The data of the final `event: done` of a stream."""

    user_message_id: UUID
    assistant_message_id: UUID
    usage: Usage
    finish_reason: str


class StreamError(msgspec.Struct):
    """The data of an `event: error` inside a stream."""

    code: str
    detail: str


C = TypeVar("C", bound=ConversationOut)


def conversation_out(conversation: Conversation, shape: type[C] = ConversationOut, **extra: Any) -> C:  # type: ignore[assignment]
    """The conversation as `shape` (ConversationOut or a Struct extending it with `extra` fields)."""
    return shape(
        session_id=conversation.id,
        title=conversation.title,
        title_source=conversation.title_source,
        system_prompt=conversation.system_prompt,
        model=conversation.model,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        active_message_id=conversation.active_message_id,
        **extra,
    )


def message_out(message: StoredMessage) -> MessageOut:
    return MessageOut(
        id=message.id,
        role=message.role,
        content=message.content,
        reasoning=message.reasoning,
        timestamp=message.created_at,
        status=message.status,
        parent_id=message.parent_id,
        prompt_tokens=message.prompt_tokens,
        completion_tokens=message.completion_tokens,
        finish_reason=message.finish_reason,
    )


# Speech: transcription (speech-to-text), synthesis (text-to-speech) and voice chat.


class TranscriptSegment(msgspec.Struct):
    """A stretch of the recording whisper transcribed as one piece, with its times in seconds."""

    id: int
    start: float
    end: float
    text: str
    avg_logprob: float
    no_speech_prob: float


class Transcription(msgspec.Struct):
    """What was said: the text, its language, the recording's length in seconds, and the timed segments."""

    text: str
    language: str
    duration: float
    segments: list[TranscriptSegment]


class SpeechCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Text to speak (OpenAI's shape; `model` is accepted for its clients and ignored: Piper voices are models)."""

    input: Annotated[str, msgspec.Meta(min_length=1)]
    voice: str | None = None
    response_format: Literal["wav", "pcm"] = "wav"
    speed: Annotated[float, msgspec.Meta(ge=0.25, le=4.0)] = 1.0
    model: str | None = None


class VoiceOut(msgspec.Struct):
    name: str
    language: str | None
    quality: str | None
    sample_rate: int
    default: bool


class VoiceList(msgspec.Struct):
    voices: list[VoiceOut]
    default: str


class VoiceExchange(MessageExchange, kw_only=True):
    """A spoken turn: what was heard, the stored messages, and the reply spoken as a base64 WAV on request."""

    transcript: Transcription
    reply_audio: Annotated[bytes | None, msgspec.Meta(description="The reply spoken: a WAV file, base64")] = None
    reply_audio_format: str | None = None
