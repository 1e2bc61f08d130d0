"""WebSocket frames: JSON objects named by their `type` field, one msgspec Struct each.

Client to server: `message`, `audio`, `regenerate`, `stop`, `resume`. Server to client: `user_message`,
`transcript`, `token`, `reasoning`, `done`, `audio`, `audio_done`, `error`, `heartbeat`. `seq` numbers a reply's
events from 1; a client that reconnects sends `resume` with the last `seq` it saw and receives every later event
exactly once (spoken `audio` frames are not replayed).
"""

from __future__ import annotations

from uuid import UUID

import msgspec

from app.domain.schemas import MessageOut, Usage


class _ClientFrame(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    pass


class MessageFrame(_ClientFrame, tag="message"):
    """Send a user message; the reply streams back on this socket."""

    content: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    thinking: bool = False


class AudioMessageFrame(_ClientFrame, tag="audio"):
    """Send a recorded message as base64 in `data` (WAV, MP3, FLAC, OGG/Opus, WebM/Opus: the container is
    recognised from the data; `format` is an FFmpeg format name, needed only for headerless audio such as `s16le`).

    It is transcribed (a `transcript` frame), stored as the user's message and replied to as a `message` is; with
    `reply_audio` each sentence of the reply also comes spoken, as an `audio` frame, while the text still streams.
    """

    data: bytes
    format: str | None = None
    language: str | None = None
    reply_audio: bool = True
    voice: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    thinking: bool = False


class RegenerateFrame(_ClientFrame, tag="regenerate"):
    """Another reply to the user message an assistant reply answered (default: the latest reply)."""

    message_id: UUID | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None


class StopFrame(_ClientFrame, tag="stop"):
    """Stop the running reply; it is stored as cancelled and a `done` frame follows."""


class ResumeFrame(_ClientFrame, tag="resume"):
    """Receive the running (or just finished) reply's events after `last_seq`, then the live rest."""

    last_seq: int = 0


ClientFrame = MessageFrame | AudioMessageFrame | RegenerateFrame | StopFrame | ResumeFrame


class _ServerFrame(msgspec.Struct, tag_field="type", kw_only=True):
    pass


class UserMessageFrame(_ServerFrame, tag="user_message"):
    message: MessageOut


class TranscriptFrame(_ServerFrame, tag="transcript"):
    """What was heard in an `audio` message; it is the content of the stored user message."""

    text: str
    language: str
    duration: float


class TokenFrame(_ServerFrame, tag="token"):
    text: str
    seq: int


class ReasoningFrame(_ServerFrame, tag="reasoning"):
    text: str
    seq: int


class DoneFrame(_ServerFrame, tag="done"):
    message: MessageOut
    usage: Usage
    finish_reason: str
    seq: int


class AudioFrame(_ServerFrame, tag="audio"):
    """One piece of the reply spoken (a sentence, or a clause of a long one) as a base64 WAV file in `data`,
    sent as soon as the piece is complete in the token stream; `index` counts the reply's pieces from 0."""

    index: int
    text: str
    data: bytes
    format: str = "wav"


class AudioDoneFrame(_ServerFrame, tag="audio_done"):
    """The reply has been spoken in `count` pieces (after `done`: the last sentence ends with the reply)."""

    count: int


class ErrorFrame(_ServerFrame, tag="error"):
    code: str
    detail: str


class HeartbeatFrame(_ServerFrame, tag="heartbeat"):
    pass


ServerFrame = (
    UserMessageFrame
    | TranscriptFrame
    | TokenFrame
    | ReasoningFrame
    | DoneFrame
    | AudioFrame
    | AudioDoneFrame
    | ErrorFrame
    | HeartbeatFrame
)
