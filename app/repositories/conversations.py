"""Queries over conversations and messages."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from uuid import UUID

from advanced_alchemy.filters import LimitOffset
from advanced_alchemy.repository import SQLAlchemyAsyncRepository
from sqlalchemy import select, update

from app.domain.models import Conversation, Message, MessageStatus


class ConversationRepository(SQLAlchemyAsyncRepository[Conversation]):
    model_type = Conversation

    async def list_recent(self, *, limit: int, offset: int) -> tuple[Sequence[Conversation], int]:
        """A page of conversations, most recently updated first, and the total count."""
        return await self.list_and_count(
            LimitOffset(limit=limit, offset=offset),
            order_by=[(Conversation.updated_at, True), (Conversation.id, True)],
        )


class MessageRepository(SQLAlchemyAsyncRepository[Message]):
    model_type = Message

    async def list_for_conversation(self, conversation_id: UUID) -> Sequence[Message]:
        """Every message of a conversation, oldest first (ids are UUIDv7, so they break timestamp ties in order)."""
        result = await self.session.execute(
            select(Message).where(Message.conversation_id == conversation_id).order_by(Message.created_at, Message.id)
        )
        return result.scalars().all()

    async def mark_interrupted(self, stale_before: datetime) -> int:
        """Finish replies left `streaming` (not written since `stale_before`) by a process that died."""
        result = await self.session.execute(
            update(Message)
            .where(Message.status == MessageStatus.STREAMING.value, Message.updated_at < stale_before)
            .values(status=MessageStatus.ERROR.value, finish_reason="interrupted")
        )
        return int(result.rowcount or 0)  # type: ignore[attr-defined]
