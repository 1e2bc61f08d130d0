"""ORM models: a conversation and its messages (a tree through `parent_id`), and the API keys of owners."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Protocol
from uuid import UUID

from advanced_alchemy.base import UUIDv7AuditBase
from advanced_alchemy.types import DateTimeUTC
from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.domain.auth import LOCAL_OWNER, MAX_KEY_NAME_CHARS, MAX_OWNER_CHARS


class TitleSource(enum.StrEnum):
    DEFAULT = "default"  # the placeholder, before the first message
    AUTO = "auto"  # the first user message's first 100 characters
    MODEL = "model"  # proposed by the model after the first reply
    MANUAL = "manual"  # set by the user: never replaced


class Role(enum.StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class MessageStatus(enum.StrEnum):
    COMPLETE = "complete"
    STREAMING = "streaming"
    CANCELLED = "cancelled"
    ERROR = "error"


class Conversation(UUIDv7AuditBase):
    __tablename__ = "conversation"
    __table_args__ = (
        Index("ix_conversation_updated_at", "updated_at"),
        Index("ix_conversation_owner_updated_at", "owner", "updated_at"),  # an owner's list, newest first
    )

    # Whose conversation it is: the owner of the API key that created it (LOCAL_OWNER while authentication is off).
    owner: Mapped[str] = mapped_column(String(MAX_OWNER_CHARS), default=LOCAL_OWNER, server_default=LOCAL_OWNER)
    title: Mapped[str] = mapped_column(String(255))
    title_source: Mapped[str] = mapped_column(String(16), default=TitleSource.DEFAULT.value)
    system_prompt: Mapped[str | None] = mapped_column(Text, default=None)
    model: Mapped[str] = mapped_column(String(255))
    # The leaf of the active branch; no foreign key, so a deleted message simply falls back to the newest one.
    active_message_id: Mapped[UUID | None] = mapped_column(default=None)


class Message(UUIDv7AuditBase):
    __tablename__ = "message"

    conversation_id: Mapped[UUID] = mapped_column(ForeignKey("conversation.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[UUID | None] = mapped_column(ForeignKey("message.id", ondelete="CASCADE"), default=None)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    reasoning: Mapped[str | None] = mapped_column(Text, default=None)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.COMPLETE.value)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    finish_reason: Mapped[str | None] = mapped_column(String(32), default=None)


class StoredMessage(Protocol):
    """A message as read for display or export: a Message, or a plain row of its table (cheaper to load)."""

    @property
    def id(self) -> UUID: ...
    @property
    def parent_id(self) -> UUID | None: ...
    @property
    def role(self) -> str: ...
    @property
    def content(self) -> str: ...
    @property
    def reasoning(self) -> str | None: ...
    @property
    def status(self) -> str: ...
    @property
    def prompt_tokens(self) -> int | None: ...
    @property
    def completion_tokens(self) -> int | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...


class ApiKey(UUIDv7AuditBase):
    """An owner's API key; only its SHA-256 is stored. A revoked key stays (so authentication stays on)."""

    __tablename__ = "api_key"

    owner: Mapped[str] = mapped_column(String(MAX_OWNER_CHARS), index=True)
    name: Mapped[str | None] = mapped_column(String(MAX_KEY_NAME_CHARS), default=None)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, to tell keys apart in a list
    revoked_at: Mapped[datetime | None] = mapped_column(DateTimeUTC(timezone=True), default=None)
