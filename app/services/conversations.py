"""ConversationService: the rules for conversations and their message trees, over one database session.

Every method that takes an `owner` reads or changes only that owner's conversations: another owner's conversation
is as absent as an unknown one (NotFoundError, a 404). The others act by id on behalf of a reply already admitted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

import msgspec
from advanced_alchemy.service import SQLAlchemyAsyncRepositoryService
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from uuid_utils.compat import uuid7

from app.domain.branches import active_path, newest_leaf_under, path_to
from app.domain.errors import InvalidInputError, NotFoundError
from app.domain.models import Conversation, Message, MessageStatus, Role, StoredMessage, TitleSource
from app.domain.rules import DEFAULT_TITLE, ConversationLimits, auto_title
from app.domain.transfer import (
    ConversationExport,
    MessageExport,
    export_conversation,
    import_order,
    render_markdown,
)
from app.repositories.conversations import ConversationRepository, MessageRepository


@dataclass(frozen=True)
class NewMessage:
    """Reply to a new user message at the end of the active branch."""

    content: str


@dataclass(frozen=True)
class Regenerate:
    """Another reply to the user message that `message_id` (an assistant reply) answered; None: the latest."""

    message_id: UUID | None = None


@dataclass(frozen=True)
class Edit:
    """A new version of the user message `message_id`, as a new branch, and a reply to it."""

    message_id: UUID
    content: str


TurnRequest = NewMessage | Regenerate | Edit

ExportFormat = Literal["json", "markdown"]
EXPORT_BATCH = 50  # conversations read per short session while a bulk export streams


@dataclass(frozen=True)
class ExportedFile:
    content: bytes
    media_type: str
    filename: str


@dataclass
class PlannedTurn:
    """What a turn will store, and the history the model will see before the user's message."""

    conversation: Conversation
    history: list[Message]
    content: str
    user_message: Message | None  # an existing user message (regenerate), or None to store a new one
    parent_id: UUID | None  # the new user message's parent
    stored_messages: int = 0  # what the conversation holds now, every branch counted
    stored_chars: int = 0

    def check_size(self, limits: ConversationLimits) -> None:
        """413 unless the conversation has room for the turn's messages (its new user message, if any, and the
        reply) and the user message's text. The reply's own text is not known yet: it may take the conversation past
        the character limit, and the next write is then refused."""
        new_user_message = self.user_message is None
        limits.check(
            self.stored_messages + 1 + int(new_user_message),
            self.stored_chars + (len(self.content) if new_user_message else 0),
            field="content",
        )


def stored_chars(messages: Sequence[Message] | Sequence[MessageExport]) -> int:
    """Characters of text the messages hold (their content and reasoning)."""
    return sum(len(message.content) + len(message.reasoning or "") for message in messages)


class ConversationService(SQLAlchemyAsyncRepositoryService[Conversation, ConversationRepository]):
    repository_type = ConversationRepository

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.messages = MessageRepository(session=self.repository.session, auto_commit=False)

    async def start_conversation(
        self, owner: str, *, title: str | None, system_prompt: str | None, model: str
    ) -> Conversation:
        """A new, empty conversation of `owner`; a given title is manual and never replaced by an automatic one."""
        return await self.create(
            Conversation(
                owner=owner,
                title=title or DEFAULT_TITLE,
                title_source=(TitleSource.MANUAL if title else TitleSource.DEFAULT).value,
                system_prompt=system_prompt or None,
                model=model,
            ),
            auto_commit=True,
            auto_refresh=False,  # every column's default is set in Python: nothing to read back
        )

    async def set_model_title(self, conversation_id: UUID, title: str) -> bool:
        """Store the model's title unless the user has named the conversation; True if it was stored."""
        stored = await self.repository.set_model_title(conversation_id, title)
        await self.repository.session.commit()
        return stored

    async def export_file(self, owner: str, conversation_id: UUID, export_format: ExportFormat) -> ExportedFile:
        """The conversation as a lossless JSON export (the whole tree) or as Markdown (the active branch)."""
        conversation, messages = await self.get_with_messages(owner, conversation_id)
        if export_format == "markdown":
            branch = active_path(messages, conversation.active_message_id)
            content = render_markdown(conversation, branch).encode()
            return ExportedFile(content, "text/markdown", f"chipi-{conversation_id}.md")  # Litestar adds the charset
        content = msgspec.json.encode(export_conversation(conversation, messages))
        return ExportedFile(content, "application/json", f"chipi-{conversation_id}.json")

    async def import_conversation(
        self, owner: str, export: ConversationExport, *, max_title_chars: int, limits: ConversationLimits
    ) -> Conversation:
        """Recreate an exported conversation as `owner`'s, under new ids (the conversation's and every message's),
        so importing the same export twice gives two independent copies. Timestamps, statuses and the tree are
        kept. An export larger than a conversation may be is a 413."""
        ordered = import_order(export, max_title_chars=max_title_chars)
        limits.check(len(ordered), stored_chars(ordered), field="messages")
        new_ids = {message.id: uuid7() for message in ordered}  # time-ordered like every id, parents first
        conversation = Conversation(
            owner=owner,
            title=export.title,
            title_source=export.title_source,
            system_prompt=export.system_prompt,
            model=export.model,
            active_message_id=new_ids.get(export.active_message_id) if export.active_message_id else None,
            created_at=export.created_at,
            updated_at=export.updated_at,
        )
        await self.repository.add(conversation, auto_refresh=False)
        await self.messages.add_many(  # one flush for them all, parents before children (the order given)
            [
                Message(
                    id=new_ids[message.id],
                    conversation_id=conversation.id,
                    parent_id=new_ids[message.parent_id] if message.parent_id is not None else None,
                    role=message.role,
                    content=message.content,
                    reasoning=message.reasoning,
                    status=message.status,
                    prompt_tokens=message.prompt_tokens,
                    completion_tokens=message.completion_tokens,
                    finish_reason=message.finish_reason,
                    created_at=message.created_at,
                    updated_at=message.updated_at or message.created_at,
                )
                for message in ordered
            ]
        )
        await self.repository.session.commit()
        return conversation

    async def export_batch(self, owner: str, after: UUID | None, size: int) -> list[ConversationExport]:
        """Up to `size` of the owner's conversations after `after` in creation order, each with its whole tree."""
        conversations = await self.repository.page_after(owner, after, size)
        if not conversations:
            return []
        messages = await self.messages.list_for_conversations([conversation.id for conversation in conversations])
        by_conversation: dict[UUID, list[Message]] = defaultdict(list)
        for message in messages:
            by_conversation[message.conversation_id].append(message)
        return [export_conversation(c, by_conversation[c.id]) for c in conversations]

    @classmethod
    async def export_all_ndjson(cls, engine: AsyncEngine, owner: str) -> AsyncIterator[bytes]:
        """Every conversation of `owner` as one JSON export per line, read in small batches, each in a short
        session of its own, so neither the whole export nor a database session is held while the response
        streams."""
        after: UUID | None = None
        while True:
            async with AsyncSession(engine, expire_on_commit=False) as session:
                batch = await cls(session=session).export_batch(owner, after, EXPORT_BATCH)
            if not batch:
                return
            for export in batch:
                yield msgspec.json.encode(export) + b"\n"
            after = batch[-1].session_id

    async def get_conversation(self, owner: str, conversation_id: UUID) -> Conversation:
        """The owner's conversation; NotFoundError for an unknown id and for another owner's alike."""
        conversation = await self.repository.get_owned(owner, conversation_id)
        if conversation is None:
            raise conversation_not_found(conversation_id)
        return conversation

    async def get_with_messages(self, owner: str, conversation_id: UUID) -> tuple[Conversation, list[StoredMessage]]:
        """A conversation and every message of every branch, oldest first, to export."""
        conversation = await self.get_conversation(owner, conversation_id)
        return conversation, list(await self.messages.read_for_conversation(conversation_id))

    async def rename(self, owner: str, conversation_id: UUID, title: str) -> None:
        """Give the owner's conversation a manual title, which is never replaced by an automatic one."""
        if not await self.repository.update_owned(
            owner, conversation_id, title=title, title_source=TitleSource.MANUAL.value
        ):
            raise conversation_not_found(conversation_id)
        await self.repository.session.commit()

    async def delete_conversation(self, owner: str, conversation_id: UUID) -> None:
        if not await self.repository.delete_owned(owner, conversation_id):
            raise conversation_not_found(conversation_id)
        await self.repository.session.commit()

    async def switch_branch(
        self, owner: str, conversation_id: UUID, message_id: UUID
    ) -> tuple[Conversation, list[Message]]:
        """Make the branch through `message_id` active (down to its newest leaf) and return it."""
        conversation = await self.get_conversation(owner, conversation_id)
        messages = await self.messages.list_for_conversation(conversation_id)
        by_id = {message.id: message for message in messages}
        if message_id not in by_id:
            raise NotFoundError(f"message {message_id} not found in this conversation", field="message_id")
        leaf = newest_leaf_under(messages, by_id[message_id])
        if not await self.repository.update_owned(owner, conversation_id, active_message_id=leaf.id):
            raise conversation_not_found(conversation_id)  # deleted since it was read
        await self.repository.session.commit()
        return conversation, path_to(by_id, leaf)

    async def plan_turn(self, owner: str, conversation_id: UUID, request: TurnRequest) -> PlannedTurn:
        """Work out where a turn goes in the owner's conversation's message tree; nothing is written yet."""
        conversation = await self.get_conversation(owner, conversation_id)
        messages = await self.messages.list_for_conversation(conversation_id)
        size = len(messages), stored_chars(messages)
        by_id = {message.id: message for message in messages}
        if isinstance(request, NewMessage):
            history = active_path(messages, conversation.active_message_id)
            parent_id = history[-1].id if history else None
            return PlannedTurn(conversation, history, request.content, None, parent_id, *size)
        if isinstance(request, Regenerate):
            reply = (
                self._find(by_id, request.message_id)
                if request.message_id
                else self._latest_reply(messages, conversation)
            )
            if reply.role != Role.ASSISTANT or reply.parent_id not in by_id:
                raise InvalidInputError("only an assistant reply can be regenerated", field="message_id")
            user_message = by_id[reply.parent_id]
            history = path_to(by_id, user_message)[:-1]
            return PlannedTurn(conversation, history, user_message.content, user_message, user_message.parent_id, *size)
        edited = self._find(by_id, request.message_id)
        if edited.role != Role.USER:
            raise InvalidInputError("only a user message can be edited", field="message_id")
        parent = by_id.get(edited.parent_id) if edited.parent_id else None
        return PlannedTurn(conversation, path_to(by_id, parent), request.content, None, edited.parent_id, *size)

    @staticmethod
    def _find(by_id: dict[UUID, Message], message_id: UUID) -> Message:
        if message_id not in by_id:
            raise NotFoundError(f"message {message_id} not found in this conversation", field="message_id")
        return by_id[message_id]

    @staticmethod
    def _latest_reply(messages: Sequence[Message], conversation: Conversation) -> Message:
        for message in reversed(active_path(messages, conversation.active_message_id)):
            if message.role == Role.ASSISTANT:
                return message
        raise InvalidInputError("there is no reply to regenerate yet", field="message_id")

    async def store_turn(self, turn: PlannedTurn) -> tuple[Message, Message]:
        """Store the user's message (unless it exists) and an empty `streaming` reply, in one transaction.

        The reply becomes the active leaf. The first user message names a conversation that has no title yet.
        """
        conversation = turn.conversation
        user_message = turn.user_message
        if user_message is None:
            user_message = Message(
                conversation_id=conversation.id,
                parent_id=turn.parent_id,
                role=Role.USER.value,
                content=turn.content,
                status=MessageStatus.COMPLETE.value,
            )
            await self.messages.add(user_message, auto_refresh=False)  # its columns' defaults are set in Python
        reply = Message(
            conversation_id=conversation.id,
            parent_id=user_message.id,
            role=Role.ASSISTANT.value,
            content="",
            status=MessageStatus.STREAMING.value,
        )
        await self.messages.add(reply, auto_refresh=False)
        if conversation.title_source == TitleSource.DEFAULT.value:
            conversation.title = auto_title(turn.content)
            conversation.title_source = TitleSource.AUTO.value
        conversation.active_message_id = reply.id
        conversation.updated_at = datetime.now(UTC)
        await self.repository.session.commit()
        return user_message, reply

    async def save_reply(
        self,
        reply_id: UUID,
        *,
        content: str,
        reasoning: str | None,
        status: MessageStatus,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        finish_reason: str | None = None,
    ) -> Message | None:
        """Write the reply's final state and move its conversation to the top of the list; None if the conversation
        was deleted meanwhile. (The text so far of a reply still streaming: repositories.write_reply_text.)

        Each write is one statement, so a delete landing in between leaves nothing half-done."""
        values: dict[str, object] = {"content": content, "reasoning": reasoning, "status": status.value}
        optional = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "finish_reason": finish_reason,
        }
        values |= {name: value for name, value in optional.items() if value is not None}
        reply = await self.messages.write(reply_id, **values)
        if reply is not None:
            await self.repository.touch(reply.conversation_id)
        await self.repository.session.commit()
        return reply

    async def get_message(self, message_id: UUID) -> Message:
        return await self.messages.get(message_id)

    async def finish_interrupted_replies(self, stale_seconds: float) -> int:
        """Mark replies a dead process left `streaming` as `error`.

        A live reply is written at least every few tokens, so one not written for `stale_seconds` has nobody
        generating it, whichever of the instances sharing the database started it.
        """
        count = await self.messages.mark_interrupted(datetime.now(UTC) - timedelta(seconds=stale_seconds))
        await self.repository.session.commit()
        return count


def conversation_not_found(conversation_id: UUID) -> NotFoundError:
    return NotFoundError(f"conversation {conversation_id} not found", field="session_id")
