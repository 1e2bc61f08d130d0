"""ChatService: runs a reply from the stored history through the model and stores it as it streams.

A reply is a `Generation`: it belongs to the service, not to the request that started it, so a stream never
holds a request's database session open. Its events are kept in order and any number of clients follow them;
when the last client following a stream goes away, the model is stopped and the partial reply kept as cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import UUID

from advanced_alchemy.config import SQLAlchemyAsyncConfig

from app.domain.errors import ConflictError, InvalidInputError
from app.domain.models import Message, MessageStatus, Role
from app.domain.rules import clean_prompt
from app.domain.schemas import StreamDone, StreamError, Usage
from app.services.conversations import ConversationService
from app.services.model import ChatTurn, GenerationFinished, GenerationParams, ModelService, Prompt, TextDelta
from app.settings import Settings

logger = logging.getLogger(__name__)

ChatEvent = TextDelta | StreamDone | StreamError


@dataclass(frozen=True)
class ReplyOptions:
    """Per-request generation options; None means the configured default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    thinking: bool = False


class Generation:
    """One reply being generated: the events so far, and the clients following them."""

    def __init__(self, conversation_id: UUID, user_message: Message, reply: Message) -> None:
        self.conversation_id = conversation_id
        self.user_message = user_message
        self.reply = reply
        self.events: list[ChatEvent] = []
        self.cancelled = threading.Event()
        self.finished = asyncio.Event()
        self._changed = asyncio.Event()
        self._followers = 0

    def publish(self, event: ChatEvent) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def cancel(self) -> None:
        """Stop the model after the token it is computing; the reply is then stored as cancelled."""
        self.cancelled.set()

    async def follow(self) -> AsyncIterator[tuple[int, ChatEvent]]:
        """Every event with its sequence number (from 1), as it comes, until done or error."""
        self._followers += 1
        sent = 0
        try:
            while True:
                changed = self._changed
                while sent < len(self.events):
                    event = self.events[sent]
                    sent += 1
                    yield sent, event
                    if not isinstance(event, TextDelta):
                        return
                await changed.wait()
        finally:
            self._followers -= 1
            if self._followers == 0 and not self.finished.is_set():
                self.cancel()  # nobody is left to read the reply: stop computing it


class ChatService:
    """Starts replies, tracks the running ones (one per conversation) and stores their outcome."""

    def __init__(self, model: ModelService, db_config: SQLAlchemyAsyncConfig, settings: Settings) -> None:
        self.model = model
        self._db_config = db_config
        self._settings = settings
        self._running: dict[UUID, Generation | None] = {}  # None: reserved while the reply is being set up
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def active_generations(self) -> int:
        return sum(1 for generation in self._running.values() if generation is not None)

    def _params(self, options: ReplyOptions) -> GenerationParams:
        limit = self._settings.max_new_tokens
        max_tokens = options.max_tokens if options.max_tokens is not None else limit
        if not 1 <= max_tokens <= limit:
            raise InvalidInputError(f"max_tokens must be between 1 and {limit}", field="max_tokens")
        temperature = options.temperature if options.temperature is not None else self._settings.temperature
        if not 0 <= temperature <= 2:
            raise InvalidInputError("temperature must be between 0 and 2", field="temperature")
        top_p = options.top_p if options.top_p is not None else self._settings.top_p
        if not 0 < top_p <= 1:
            raise InvalidInputError("top_p must be above 0 and at most 1", field="top_p")
        return GenerationParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)

    async def start_reply(self, conversation_id: UUID, content: str | None, options: ReplyOptions) -> Generation:
        """Store the user's message and start generating the reply to it from the conversation's history."""
        content = clean_prompt(content, max_chars=self._settings.max_prompt_chars)
        params = self._params(options)
        if conversation_id in self._running:
            raise ConflictError("a reply is already being generated in this conversation", field="session_id")
        self._running[conversation_id] = None
        try:
            async with ConversationService.new(config=self._db_config) as conversations:
                conversation = await conversations.get_conversation(conversation_id)
                branch = await conversations.active_branch(conversation_id)
                history = [ChatTurn(m.role, m.content) for m in branch if m.role != Role.SYSTEM and m.content]
                prompt = self.model.build_prompt(
                    conversation.system_prompt or self._settings.system_prompt or None,
                    [*history, ChatTurn(Role.USER.value, content)],
                    params.max_new_tokens,
                    thinking=options.thinking,
                )
                user_message, reply = await conversations.add_exchange(
                    conversation, branch[-1] if branch else None, content
                )
        except BaseException:
            del self._running[conversation_id]
            raise
        generation = Generation(conversation_id, user_message, reply)
        self._running[conversation_id] = generation
        task = asyncio.create_task(self._generate(generation, prompt, params))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return generation

    async def reply(self, conversation_id: UUID, content: str | None, options: ReplyOptions) -> tuple[Message, Message]:
        """Store the user's message, generate the whole reply, and return both as stored."""
        generation = await self.start_reply(conversation_id, content, options)
        await generation.finished.wait()
        async with ConversationService.new(config=self._db_config) as conversations:
            reply = await conversations.messages.get(generation.reply.id)
        return generation.user_message, reply

    async def _generate(self, generation: Generation, prompt: Prompt, params: GenerationParams) -> None:
        parts: list[str] = []
        flushed_at = time.monotonic()
        try:
            finished = GenerationFinished("error", len(prompt.token_ids), 0)
            async for output in self.model.stream(prompt, params, generation.cancelled):
                if isinstance(output, GenerationFinished):
                    finished = output
                    continue
                parts.append(output.text)
                generation.publish(output)
                if time.monotonic() - flushed_at >= self._settings.stream_flush_seconds:
                    await self._save(generation, "".join(parts), MessageStatus.STREAMING)
                    flushed_at = time.monotonic()
            status = MessageStatus.CANCELLED if finished.finish_reason == "cancelled" else MessageStatus.COMPLETE
            await self._save(generation, "".join(parts), status, finished)
            generation.publish(
                StreamDone(
                    user_message_id=generation.user_message.id,
                    assistant_message_id=generation.reply.id,
                    usage=Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens),
                    finish_reason=finished.finish_reason,
                )
            )
        except asyncio.CancelledError:  # the server is shutting down
            generation.cancel()
            await self._save(generation, "".join(parts), MessageStatus.CANCELLED, reason="cancelled")
            generation.publish(StreamError(code="shutting_down", detail="the server stopped before the reply ended"))
            raise
        except Exception:
            logger.exception("generation failed in conversation %s", generation.conversation_id)
            generation.cancel()
            with contextlib.suppress(Exception):
                await self._save(generation, "".join(parts), MessageStatus.ERROR, reason="error")
            generation.publish(StreamError(code="generation_failed", detail="the model failed to generate a reply"))
        finally:
            self._running.pop(generation.conversation_id, None)
            generation.finished.set()

    async def _save(
        self,
        generation: Generation,
        content: str,
        status: MessageStatus,
        finished: GenerationFinished | None = None,
        reason: str | None = None,
    ) -> None:
        """Write the reply in a short session of its own; stop generating if its conversation was deleted."""
        async with ConversationService.new(config=self._db_config) as conversations:
            stored = await conversations.save_reply(
                generation.reply.id,
                content=content,
                status=status,
                prompt_tokens=finished.prompt_tokens if finished else None,
                completion_tokens=finished.completion_tokens if finished else None,
                finish_reason=finished.finish_reason if finished else reason,
            )
        if stored is None:
            generation.cancel()
        else:
            generation.reply = stored

    async def shutdown(self) -> None:
        """Stop every running reply and wait until each is stored as cancelled."""
        for generation in self._running.values():
            if generation is not None:
                generation.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
