"""WebSocket frames: JSON objects named by their `type` field, one msgspec Struct each.

Client to server: `message`, `regenerate`, `stop`, `resume`. Server to client: `user_message`, `token`,
`reasoning`, `done`, `error`, `heartbeat`. `seq` numbers a reply's events from 1; a client that reconnects sends
`resume` with the last `seq` it saw and receives every later event exactly once.
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


ClientFrame = MessageFrame | RegenerateFrame | StopFrame | ResumeFrame


class _ServerFrame(msgspec.Struct, tag_field="type", kw_only=True):
    pass


class UserMessageFrame(_ServerFrame, tag="user_message"):
    message: MessageOut


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


class ErrorFrame(_ServerFrame, tag="error"):
    code: str
    detail: str


class HeartbeatFrame(_ServerFrame, tag="heartbeat"):
    pass


ServerFrame = UserMessageFrame | TokenFrame | ReasoningFrame | DoneFrame | ErrorFrame | HeartbeatFrame
