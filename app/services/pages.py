"""ConversationPages: what the web UI shows most often, a page of the conversation list and a conversation, read
without an ORM session (see app/repositories/reads.py). Every method reads only `owner`'s conversations: another
owner's conversation is as absent as an unknown one (a 404)."""

from __future__ import annotations

from uuid import UUID

from app.domain.branches import active_path
from app.domain.rules import search_terms
from app.domain.schemas import ConversationDetail, ConversationList
from app.repositories.reads import ConversationReads
from app.services.conversations import conversation_not_found


class ConversationPages:
    def __init__(self, reads: ConversationReads) -> None:
        self.reads = reads

    async def conversations(self, owner: str, q: str | None, *, limit: int, offset: int) -> ConversationList:
        """The owner's newest conversations, or with a (non-blank) `q` those matching it, best match first."""
        if q is None or not q.strip():
            items, total = await self.reads.recent(owner, limit=limit, offset=offset)
        else:
            items, total = await self.reads.search(owner, search_terms(q), limit=limit, offset=offset)
        return ConversationList(items, total=total, limit=limit, offset=offset)

    async def conversation(self, owner: str, conversation_id: UUID, *, tree: bool) -> ConversationDetail:
        """A conversation and its active branch (or, with `tree`, every message of every branch), oldest first."""
        found = await self.reads.conversation(owner, conversation_id)
        if found is None:
            raise conversation_not_found(conversation_id)
        conversation, messages = found
        return ConversationDetail(
            conversation, messages if tree else active_path(messages, conversation.active_message_id)
        )
