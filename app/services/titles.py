"""TitleService: after a conversation's first reply, the model proposes a short title, in the background.

It never delays or fails the reply: it starts once the reply is stored and its `done` event is out, and any
failure leaves the first-message title in place. It talks to the model directly rather than through ChatService's
capped slots, so a title never takes a user's place in the queue (the engine batches it with the running replies),
and a semaphore of its own keeps a burst of first replies from flooding the engine with titles.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING
from uuid import UUID

from advanced_alchemy.config import SQLAlchemyAsyncConfig

from app.domain.generation import ChatTurn, GenerationParams, TextDelta
from app.domain.models import Role, TitleSource
from app.domain.reasoning import ReasoningSplitter
from app.domain.rules import clean_model_title
from app.services.conversations import ConversationService

if TYPE_CHECKING:
    from app.services.chat import LanguageModel

logger = logging.getLogger(__name__)

TITLE_SYSTEM_PROMPT = "You name conversations. Answer with a title of three to six words, nothing else."
TITLE_MAX_TOKENS = 20
TITLE_PROMPT_CHARS = 600  # of the first message: enough to name it, small enough to fit any context window
CONCURRENT_TITLES = 2


class TitleService:
    def __init__(self, model: LanguageModel, db_config: SQLAlchemyAsyncConfig) -> None:
        self._model = model
        self._db_config = db_config
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(CONCURRENT_TITLES)

    def propose_after_first_reply(self, conversation_id: UUID, first_message: str) -> None:
        """Start naming the conversation from its first message; returns at once."""
        task = asyncio.create_task(self._name(conversation_id, first_message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _name(self, conversation_id: UUID, first_message: str) -> None:
        try:
            async with ConversationService.new(config=self._db_config) as conversations:
                conversation = await conversations.repository.get_one_or_none(id=conversation_id)
            if conversation is None or conversation.title_source != TitleSource.AUTO.value:
                return  # deleted, named by the user, or named by the model already
            async with self._slots:
                title = clean_model_title(await self.generate(first_message))
            if title is None:
                logger.info("the model proposed no usable title for %s; the first-message title stays", conversation_id)
                return
            async with ConversationService.new(config=self._db_config) as conversations:
                await conversations.set_model_title(conversation_id, title)
        except asyncio.CancelledError:
            raise
        except Exception:  # a title is a nicety: the first-message title stays
            logger.exception("proposing a title for conversation %s failed", conversation_id)

    async def generate(self, first_message: str) -> str:
        """The model's raw answer (greedy, a few tokens) to "name a conversation that starts with this"."""
        question = f"Question: {first_message[:TITLE_PROMPT_CHARS]}\n\nTitle:"
        prompt = self._model.build_prompt(
            TITLE_SYSTEM_PROMPT, [ChatTurn(Role.USER.value, question)], TITLE_MAX_TOKENS, thinking=False
        )
        params = GenerationParams(max_new_tokens=TITLE_MAX_TOKENS, temperature=0.0, top_p=1.0)
        splitter = ReasoningSplitter() if self._model.splits_reasoning else None
        text: list[str] = []
        async for output in self._model.stream(prompt, params, threading.Event()):
            if not isinstance(output, TextDelta):
                continue
            if splitter is None:
                text.append(output.text)
            else:  # a reasoning model's thinking is not part of the title
                text.extend(piece.text for piece in splitter.feed(output.text) if piece.kind == "content")
        if splitter is not None:
            text.extend(piece.text for piece in splitter.flush() if piece.kind == "content")
        return "".join(text)

    async def aclose(self) -> None:
        """Cancel the titles still being generated (at shutdown)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
