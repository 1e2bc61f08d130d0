"""ConversationService: the rules for conversations and their messages, over one database session."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService

from app.domain.errors import NotFoundError
from app.domain.models import Conversation, Message, MessageStatus, Role, TitleSource
from app.domain.rules import DEFAULT_TITLE, auto_title
from app.repositories.conversations import ConversationRepository, MessageRepository


class ConversationService(SQLAlchemyAsyncRepositoryService[Conversation, ConversationRepository]):
    repository_type = ConversationRepository

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages = MessageRepository(session=self.repository.session, auto_commit=False)

    async def start_conversation(self, *, title: str | None, system_prompt: str | None, model: str) -> Conversation:
        """A new, empty conversation; a given title is manual and never replaced by an automatic one."""
        return await self.create(
            Conversation(
                title=title or DEFAULT_TITLE,
                title_source=(TitleSource.MANUAL if title else TitleSource.DEFAULT).value,
                system_prompt=system_prompt or None,
                model=model,
            ),
            auto_commit=True,
        )

    async def list_recent(self, *, limit: int, offset: int) -> tuple[Sequence[Conversation], int]:
        return await self.repository.list_recent(limit=limit, offset=offset)

    async def get_conversation(self, conversation_id: UUID) -> Conversation:
        conversation = await self.repository.get_one_or_none(id=conversation_id)
        if conversation is None:
            raise NotFoundError(f"conversation {conversation_id} not found", field="session_id")
        return conversation

    async def get_with_messages(self, conversation_id: UUID) -> tuple[Conversation, list[Message]]:
        """A conversation and its active branch, oldest message first."""
        conversation = await self.get_conversation(conversation_id)
        return conversation, await self.active_branch(conversation_id)

    async def active_branch(self, conversation_id: UUID) -> list[Message]:
        """The path from the root to the newest message, following `parent_id`."""
        messages = await self.messages.list_for_conversation(conversation_id)
        if not messages:
            return []
        by_id = {message.id: message for message in messages}
        branch: list[Message] = []
        current: Message | None = messages[-1]
        while current is not None:
            branch.append(current)
            current = by_id.get(current.parent_id) if current.parent_id else None
        branch.reverse()
        return branch

    async def rename(self, conversation_id: UUID, title: str) -> Conversation:
        conversation = await self.get_conversation(conversation_id)
        conversation.title = title
        conversation.title_source = TitleSource.MANUAL.value
        return await self.update(conversation, auto_commit=True)

    async def delete_conversation(self, conversation_id: UUID) -> None:
        await self.get_conversation(conversation_id)
        await self.delete(conversation_id, auto_commit=True)

    async def add_exchange(
        self, conversation: Conversation, parent: Message | None, content: str
    ) -> tuple[Message, Message]:
        """Store the user's message and an empty `streaming` assistant reply to it, in one transaction.

        The first user message names a conversation that still has its default title.
        """
        user_message = Message(
            conversation_id=conversation.id,
            parent_id=parent.id if parent else None,
            role=Role.USER.value,
            content=content,
            status=MessageStatus.COMPLETE.value,
        )
        await self.messages.add(user_message)
        reply = Message(
            conversation_id=conversation.id,
            parent_id=user_message.id,
            role=Role.ASSISTANT.value,
            content="",
            status=MessageStatus.STREAMING.value,
        )
        await self.messages.add(reply)
        if conversation.title_source == TitleSource.DEFAULT.value:
            conversation.title = auto_title(content)
            conversation.title_source = TitleSource.AUTO.value
        conversation.updated_at = datetime.now(UTC)
        await self.repository.session.commit()
        return user_message, reply

    async def save_reply(
        self,
        reply_id: UUID,
        *,
        content: str,
        status: MessageStatus,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        finish_reason: str | None = None,
    ) -> Message | None:
        """Write the reply's text so far (or its final state); None if the conversation was deleted meanwhile."""
        reply = await self.messages.get_one_or_none(id=reply_id)
        if reply is None:
            return None
        reply.content = content
        reply.status = status.value
        if prompt_tokens is not None:
            reply.prompt_tokens = prompt_tokens
        if completion_tokens is not None:
            reply.completion_tokens = completion_tokens
        if finish_reason is not None:
            reply.finish_reason = finish_reason
        await self.messages.update(reply)
        if status != MessageStatus.STREAMING:
            conversation = await self.repository.get_one_or_none(id=reply.conversation_id)
            if conversation is not None:
                conversation.updated_at = datetime.now(UTC)
        await self.repository.session.commit()
        return reply

    async def finish_interrupted_replies(self) -> int:
        """Mark replies a dead process left `streaming` as `error`; run once at start-up."""
        count = await self.messages.mark_interrupted()
        await self.repository.session.commit()
        return count
