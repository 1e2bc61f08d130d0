"""ORM models: a conversation and its messages (a tree through `parent_id`)."""

from __future__ import annotations

import enum
from uuid import UUID

from advanced_alchemy.base import UUIDv7AuditBase
from sqlalchemy import ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column


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
    __table_args__ = (Index("ix_conversation_updated_at", "updated_at"),)

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
