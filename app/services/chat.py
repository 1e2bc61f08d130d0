"""ChatService: runs replies from the stored history through the model and stores them as they stream.

A reply is a `Generation`. It belongs to the service, not to the request that started it, so a stream never
holds a request's database session open, and a dropped connection is not a stop: its events are kept in order,
any number of clients follow them (a reconnecting one resumes after the last event it saw), and only when nobody
has followed it for the grace period is the model stopped and the partial reply kept as cancelled.

Every call names the `owner` it acts for. A conversation of another owner is unknown to it (404), whether a reply
runs there or not: its ownership is checked in the database before anything about a running reply is revealed,
and a reply remembers its owner for those who come back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar
from uuid import UUID, uuid4

from advanced_alchemy.config import SQLAlchemyAsyncConfig

from app.db import database_unavailable
from app.domain.errors import BusyError, ConflictError, InvalidInputError, NotFoundError, ShuttingDownError
from app.domain.generation import ChatTurn, GenerationFinished, GenerationOutput, GenerationParams, Prompt
from app.domain.models import Conversation, Message, MessageStatus, Role
from app.domain.reasoning import Piece, ReasoningSplitter
from app.domain.rules import clean_prompt
from app.domain.schemas import Usage
from app.domain.stop_sequences import StopSequences
from app.observability import record_first_token, record_generated_tokens
from app.repositories.conversations import write_reply_text
from app.services.conversations import ConversationService, Edit, NewMessage, PlannedTurn, TurnRequest
from app.services.titles import TitleService
from app.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")

STOP_WAIT_SECONDS = 5.0  # a stopped reply ends after one token; this bounds a last write to a database that hangs
SHUTDOWN_RETRY_AFTER_SECONDS = 5
# The finish_reason of a reply cut off by CHIPI_MAX_GENERATION_SECONDS.
TIME_LIMIT_REASON = "time"


@dataclass(frozen=True)
class ReplyFinished:
    """The last event of a reply that ended (finish_reason stop, length, time or cancelled) and was stored."""

    usage: Usage
    finish_reason: str


@dataclass(frozen=True)
class ReplyFailed:
    """The last event of a reply the model or the server could not finish."""

    code: str
    detail: str


ChatEvent = Piece | ReplyFinished | ReplyFailed


@dataclass(frozen=True)
class ReplyOptions:
    """Per-request generation options; None means the configured default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    thinking: bool = False
    stop: tuple[str, ...] = ()
    seed: int | None = None


def joined_pieces(events: Sequence[ChatEvent], start: int, end: int) -> Iterator[tuple[int, ChatEvent]]:
    """events[start:end], each with its number (counting from 1), where runs of content or reasoning pieces become
    one piece of their joined text, numbered as the last of the run (the `<think>` tags stay events of their own)."""
    index = start
    while index < end:
        event = events[index]
        index += 1
        if isinstance(event, Piece) and event.kind in ("content", "reasoning"):
            texts = [event.text]
            while index < end and isinstance(following := events[index], Piece) and following.kind == event.kind:
                texts.append(following.text)
                index += 1
            if len(texts) > 1:
                event = Piece(event.kind, "".join(texts))
        yield index, event


class Generation:
    """One reply being generated: its events so far, and the clients following them.

    A reply in a conversation has its stored user message and reply rows; a stateless `/v1` completion has none.
    """

    def __init__(
        self,
        owner: str,
        conversation_id: UUID | None,
        user_message: Message | None,
        reply: Message | None,
        grace_seconds: float,
        *,
        event_interval_seconds: float = 0.0,
        resumable: bool = True,
    ) -> None:
        self.owner = owner
        self.conversation_id = conversation_id
        self.user_message = user_message
        self.reply = reply
        self.id = str(reply.id) if reply is not None else uuid4().hex
        self.events: list[ChatEvent] = []
        self.cancelled = threading.Event()  # read by the model's thread
        # Resolved when the reply has ended and is stored. A future rather than an Event: a follower's pause waits on
        # it with asyncio.wait, which needs no task and raises nothing when the pause runs out.
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()
        self._followers = 0
        self._grace_seconds = grace_seconds
        self._event_interval_seconds = event_interval_seconds
        self._resumable = resumable
        self._grace_timer: asyncio.TimerHandle | None = None
        self._arm_grace_timer()  # a client that never attaches counts as one that left

    def event_id(self, seq: int) -> str:
        """An id naming the reply and the event's place in it, so a reconnecting client can resume."""
        return f"{self.id}:{seq}"

    def publish(self, event: ChatEvent) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = asyncio.Event()

    def cancel(self) -> None:
        """Stop the model after the token it is computing; the reply is then stored as cancelled."""
        self.cancelled.set()

    async def follow(self, after: int = 0) -> AsyncIterator[tuple[int, ChatEvent]]:
        """Every event after sequence number `after` (events count from 1), as it comes, until done or error, each
        with its number. Text that comes within the event interval of the last event sent is sent together: pieces
        of the same kind in a row are joined into one, numbered as the last of them."""
        self._followers += 1
        self._disarm_grace_timer()
        sent = after
        try:
            while True:
                changed = self._changed
                if sent == len(self.events):
                    await changed.wait()
                    continue
                upto = len(self.events)
                for seq, event in joined_pieces(self.events, sent, upto):
                    yield seq, event
                    if isinstance(event, ReplyFinished | ReplyFailed):
                        return
                sent = upto
                if self._event_interval_seconds and not self.finished.done():
                    # the interval, cut short by the reply's end (a server that stops waits only for that)
                    await asyncio.wait((self.finished,), timeout=self._event_interval_seconds)
        finally:
            self._followers -= 1
            if self._followers == 0:
                if self._resumable:
                    self._arm_grace_timer()
                else:
                    self.cancel()  # nobody can come back for it

    def _arm_grace_timer(self) -> None:
        if not self.finished.done() and self._grace_timer is None:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(self._grace_seconds, self._stop_if_unwatched)

    def _disarm_grace_timer(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def _stop_if_unwatched(self) -> None:
        self._grace_timer = None
        if self._followers == 0:
            self.cancel()  # nobody came back for the reply: stop computing it

    def settle(self) -> None:
        self._disarm_grace_timer()
        if not self.finished.done():
            self.finished.set_result(None)


class LanguageModel(Protocol):
    """What ChatService needs of a model: the local ModelService or the RemoteModelService."""

    name: str
    context_window: int

    @property
    def device(self) -> str: ...

    @property
    def splits_reasoning(self) -> bool: ...

    def build_prompt(
        self, system_prompt: str | None, turns: Sequence[ChatTurn], max_new_tokens: int, *, thinking: bool = False
    ) -> Prompt: ...

    def stream(
        self, prompt: Prompt, params: GenerationParams, cancelled: threading.Event
    ) -> AsyncIterator[GenerationOutput]: ...

    async def aclose(self) -> None: ...


class ChatService:
    """Starts replies, tracks the running ones (one per conversation, a capped number in all), stores them."""

    def __init__(self, model: LanguageModel, db_config: SQLAlchemyAsyncConfig, settings: Settings) -> None:
        self.model = model
        self._db_config = db_config
        self._settings = settings
        self._running: dict[UUID, Generation | None] = {}  # None: reserved while the reply is being set up
        self._recent: dict[UUID, Generation] = {}  # finished replies, kept for clients that reconnect late
        self._tasks: dict[asyncio.Task[None], Generation] = {}  # every reply being generated, stored or not
        self._draining = False
        self._slots = asyncio.Semaphore(settings.max_concurrent_generations)
        self._sweeper: asyncio.Task[None] | None = None
        self._waiting = 0
        self._splits_reasoning = model.splits_reasoning
        self._titles = TitleService(model, db_config) if settings.model_titles else None
        self.limits = settings.conversation_limits

    @property
    def active_generations(self) -> int:
        """Replies being generated now, in conversations or for stateless /v1 completions."""
        return len(self._tasks)

    @property
    def queued_generations(self) -> int:
        return self._waiting

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
        # Text is sent to clients at most once per event interval anyway; a reply with stop sequences takes each
        # token as it comes, so that a stop ends it at once.
        interval = 0.0 if options.stop else self._settings.stream_event_interval_seconds
        return GenerationParams(
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=options.seed,
            delta_interval_seconds=interval,
        )

    def _checked(self, request: TurnRequest) -> TurnRequest:
        max_chars = self._settings.max_prompt_chars
        if isinstance(request, NewMessage):
            return NewMessage(clean_prompt(request.content, max_chars=max_chars))
        if isinstance(request, Edit):
            return Edit(request.message_id, clean_prompt(request.content, max_chars=max_chars))
        return request

    async def _take_slot(self) -> None:
        """Wait for one of the capped generation slots, in a bounded queue for a bounded time."""
        retry_after = max(1, math.ceil(self._settings.queue_timeout_seconds))
        if self._draining:
            raise ShuttingDownError(retry_after_seconds=SHUTDOWN_RETRY_AFTER_SECONDS)
        if not self._slots.locked():
            await self._slots.acquire()
            return
        if self._waiting >= self._settings.max_queued_generations:
            raise BusyError("too many replies are waiting for the model; try again shortly", 429, retry_after)
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout=self._settings.queue_timeout_seconds)
        except TimeoutError:
            raise BusyError("the model is busy with other replies; try again shortly", 503, retry_after) from None
        finally:
            self._waiting -= 1

    async def start_reply(
        self, owner: str, conversation_id: UUID, request: TurnRequest, options: ReplyOptions
    ) -> Generation:
        """Store the turn's user message and start generating the reply from the active branch's history."""
        request = self._checked(request)
        params = self._params(options)

        async def prepare(conversations: ConversationService) -> tuple[Prompt, Message, Message]:
            turn = await conversations.plan_turn(owner, conversation_id, request)
            turn.check_size(self.limits)
            prompt = self._prompt_for(turn, params, options)
            return prompt, *await conversations.store_turn(turn)

        return await self._launch(owner, conversation_id, prepare, params, options)

    async def start_completion(
        self,
        owner: str,
        system_prompt: str | None,
        turns: list[ChatTurn],
        options: ReplyOptions,
        store_in: UUID | None,
    ) -> Generation:
        """A reply to the given turns (the OpenAI API is stateless); with `store_in`, the last user message and
        the reply are also stored in that conversation."""
        if not turns or turns[-1].role != Role.USER:
            raise InvalidInputError("the last message must be a user message", field="messages")
        content = clean_prompt(turns[-1].content, max_chars=self._settings.max_prompt_chars, field="messages")
        # The request is the whole conversation the model sees: it gets the limits of a stored one.
        self.limits.check(len(turns), len(system_prompt or "") + sum(len(t.content) for t in turns), field="messages")
        params = self._params(options)
        prompt = self.model.build_prompt(system_prompt, turns, params.max_new_tokens, thinking=options.thinking)
        if store_in is None:
            await self._take_slot()
            generation = Generation(
                owner,
                None,
                None,
                None,
                self._settings.disconnect_grace_seconds,
                event_interval_seconds=self._settings.stream_event_interval_seconds,
                resumable=False,
            )
            return self._spawn(generation, prompt, params, options)

        async def prepare(conversations: ConversationService) -> tuple[Prompt, Message, Message]:
            turn = await conversations.plan_turn(owner, store_in, NewMessage(content))
            turn.check_size(self.limits)
            return prompt, *await conversations.store_turn(turn)

        return await self._launch(owner, store_in, prepare, params, options)

    async def _launch(
        self,
        owner: str,
        conversation_id: UUID,
        prepare: Callable[[ConversationService], Awaitable[tuple[Prompt, Message, Message]]],
        params: GenerationParams,
        options: ReplyOptions,
    ) -> Generation:
        """Reserve the conversation (409 if busy) and a slot, store the turn with `prepare`, start generating."""
        await self.check_conversation(owner, conversation_id)  # another owner's conversation: 404, never 409
        if conversation_id in self._running:
            raise ConflictError("a reply is already being generated in this conversation", field="session_id")
        self._running[conversation_id] = None
        slot_taken = False
        try:
            await self._take_slot()
            slot_taken = True
            async with ConversationService.new(config=self._db_config) as conversations:
                prompt, user_message, reply = await prepare(conversations)
        except BaseException:
            del self._running[conversation_id]
            if slot_taken:
                self._slots.release()
            raise
        generation = Generation(
            owner,
            conversation_id,
            user_message,
            reply,
            self._settings.disconnect_grace_seconds,
            event_interval_seconds=self._settings.stream_event_interval_seconds,
        )
        self._running[conversation_id] = generation
        self._recent.pop(conversation_id, None)
        return self._spawn(generation, prompt, params, options)

    def _spawn(
        self, generation: Generation, prompt: Prompt, params: GenerationParams, options: ReplyOptions
    ) -> Generation:
        task = asyncio.create_task(self._generate(generation, prompt, params, options.stop))
        self._tasks[task] = generation
        task.add_done_callback(self._forget_task)
        return generation

    def _prompt_for(self, turn: PlannedTurn, params: GenerationParams, options: ReplyOptions) -> Prompt:
        history = [ChatTurn(m.role, m.content) for m in turn.history if m.role != Role.SYSTEM and m.content]
        return self.model.build_prompt(
            turn.conversation.system_prompt or self._settings.system_prompt or None,
            [*history, ChatTurn(Role.USER.value, turn.content)],
            params.max_new_tokens,
            thinking=options.thinking,
        )

    async def reply(
        self, owner: str, conversation_id: UUID, request: TurnRequest, options: ReplyOptions
    ) -> tuple[Message, Message]:
        """Store the turn, generate the whole reply, and return the user message and the reply as stored."""
        generation = await self.start_reply(owner, conversation_id, request, options)
        async for _ in generation.follow():  # following (not just waiting) keeps the grace timer off
            pass
        assert generation.user_message is not None and generation.reply is not None  # a conversation's reply
        async with ConversationService.new(config=self._db_config) as conversations:
            reply = await conversations.get_message(generation.reply.id)
        return generation.user_message, reply

    async def open_stream(
        self,
        owner: str,
        conversation_id: UUID,
        prompt: str | None,
        options: ReplyOptions,
        last_event_id: str | None,
    ) -> tuple[Generation, int]:
        """What an SSE client gets: a resumed reply (Last-Event-ID), the running one (no prompt), or a new one."""
        if last_event_id:
            reply_id, _, seq = last_event_id.rpartition(":")
            if not seq.isdigit():
                raise InvalidInputError("Last-Event-ID must be an id this stream sent", field="Last-Event-ID")
            return self.watch(owner, conversation_id, after=int(seq), reply_id=reply_id)
        if prompt is None and conversation_id in self._running:
            return self.watch(owner, conversation_id)
        return await self.start_reply(owner, conversation_id, NewMessage(prompt or ""), options), 0

    async def check_conversation(self, owner: str, conversation_id: UUID) -> None:
        """Raise NotFoundError unless the conversation exists and belongs to `owner`."""
        async with ConversationService.new(config=self._db_config) as conversations:
            await conversations.get_conversation(owner, conversation_id)

    def watch(
        self, owner: str, conversation_id: UUID, *, after: int = 0, reply_id: str | None = None
    ) -> tuple[Generation, int]:
        """The owner's reply running in a conversation (or just finished), and where a client resumes following it.

        A client that saw events up to `after` (SSE's Last-Event-ID, the WebSocket's `resume`) gets every later
        event exactly once; `reply_id`, when given, must name that reply.
        """
        generation = self._running.get(conversation_id) or self._recent.get(conversation_id)
        if generation is None or generation.owner != owner or (reply_id is not None and reply_id != generation.id):
            raise NotFoundError(
                "no reply is streaming here any more; read it from the conversation", field="session_id"
            )
        return generation, max(0, after)

    async def stop(self, owner: str, conversation_id: UUID) -> Message | None:
        """Stop the running reply and wait until it is stored as cancelled; None when nothing was running."""
        await self.check_conversation(owner, conversation_id)
        generation = self._running.get(conversation_id)
        if generation is None:
            return None
        generation.cancel()
        await asyncio.shield(generation.finished)  # shielded: a stop request that goes away must not cancel it
        return generation.reply

    async def switch_branch(
        self, owner: str, conversation_id: UUID, message_id: UUID
    ) -> tuple[Conversation, list[Message]]:
        """Make another branch active; refused while a reply is being generated on the current one."""
        await self.check_conversation(owner, conversation_id)
        if conversation_id in self._running:
            raise ConflictError("wait for the running reply (or stop it) before switching branches")
        async with ConversationService.new(config=self._db_config) as conversations:
            return await conversations.switch_branch(owner, conversation_id, message_id)

    async def _generate(
        self, generation: Generation, prompt: Prompt, params: GenerationParams, stop: tuple[str, ...]
    ) -> None:
        splitter = ReasoningSplitter() if self._splits_reasoning else None
        stops = StopSequences(stop)
        content: list[str] = []
        reasoning: list[str] = []
        write_failing = False  # the last write of the text so far did not reach the database
        ended: tuple[MessageStatus, GenerationFinished] | None = None  # how the model's part ended

        def take(pieces: list[Piece]) -> None:
            for piece in pieces:
                if piece.kind == "content":
                    piece = Piece("content", stops.feed(piece.text))
                    if stops.hit:
                        generation.cancel()  # a stop sequence ends the reply like the end-of-turn token
                    if not piece.text:
                        continue
                    content.append(piece.text)
                elif piece.kind == "reasoning":
                    reasoning.append(piece.text)
                generation.publish(piece)

        async def save(
            status: MessageStatus, finished: GenerationFinished | None = None, reason: str = "", *, retry: bool = True
        ) -> None:
            nonlocal write_failing
            if generation.reply is None:
                return  # a stateless completion: nothing is stored
            text, thoughts = "".join(content), "".join(reasoning) or None
            if status == MessageStatus.STREAMING:
                try:
                    stored = await self._save_partial(generation, text, thoughts)
                except Exception as exc:
                    if not database_unavailable(exc):
                        raise
                    # The text stays in memory and the model goes on; the next write (or the last) catches up.
                    if not write_failing:
                        logger.warning("database unavailable; the reply so far is kept in memory: %s", exc)
                    write_failing = True
                    return
                write_failing = False
            else:

                def write() -> Awaitable[Message | None]:
                    return self._save(generation, text, thoughts, status, finished, reason)

                stored = await (self._retry_while_unavailable(write) if retry else write()) is not None
            if not stored:  # the conversation was deleted under the reply
                generation.cancel()

        out_of_time = False

        def stop_for_time() -> None:
            nonlocal out_of_time
            out_of_time = True
            generation.cancel()

        time_limit = self._settings.max_generation_seconds
        timer = asyncio.get_running_loop().call_later(time_limit, stop_for_time) if time_limit > 0 else None
        flushed_at = started_at = time.monotonic()
        first_token = True
        try:
            finished = GenerationFinished("error", len(prompt.token_ids), 0)
            async for output in self.model.stream(prompt, params, generation.cancelled):
                if isinstance(output, GenerationFinished):
                    finished = output
                    record_generated_tokens(output.completion_tokens)
                    continue
                if first_token:
                    record_first_token(time.monotonic() - started_at)
                    first_token = False
                take(splitter.feed(output.text) if splitter else [Piece("content", output.text)])
                if time.monotonic() - flushed_at >= self._settings.stream_flush_seconds:
                    await save(MessageStatus.STREAMING)
                    flushed_at = time.monotonic()
            take([*(splitter.flush() if splitter else []), Piece("content", stops.flush())])
            if stops.hit:
                finished = GenerationFinished("stop", finished.prompt_tokens, finished.completion_tokens)
            elif out_of_time and finished.finish_reason == "cancelled":
                # cut off by CHIPI_MAX_GENERATION_SECONDS: a complete reply, like one cut off by max_tokens
                finished = GenerationFinished(TIME_LIMIT_REASON, finished.prompt_tokens, finished.completion_tokens)
            cancelled = finished.finish_reason == "cancelled"
            ended = (MessageStatus.CANCELLED if cancelled else MessageStatus.COMPLETE), finished
            await save(*ended)
            usage = Usage(prompt_tokens=finished.prompt_tokens, completion_tokens=finished.completion_tokens)
            generation.publish(ReplyFinished(usage=usage, finish_reason=finished.finish_reason))
            if not cancelled:
                self._propose_title(generation)
        except asyncio.CancelledError:  # the server is shutting down
            generation.cancel()
            with contextlib.suppress(Exception):  # one try: a reply left `streaming` is swept up at the next start
                if ended is not None:  # the model had finished; its last write was waiting for the database
                    await save(*ended, retry=False)
                else:
                    await save(MessageStatus.CANCELLED, reason="cancelled", retry=False)
            generation.publish(ReplyFailed(code="shutting_down", detail="the server stopped before the reply ended"))
            raise
        except Exception as exc:
            generation.cancel()
            if database_unavailable(exc):
                # Stays `streaming` with the text last written, until the stale-stream sweep marks it `error`.
                logger.error("could not store the reply in conversation %s: %s", generation.conversation_id, exc)
                detail = "the database is unavailable; the reply was not stored"
                generation.publish(ReplyFailed(code="database_unavailable", detail=detail))
                return
            logger.exception("generation failed in conversation %s", generation.conversation_id)
            with contextlib.suppress(Exception):
                await save(MessageStatus.ERROR, reason="error", retry=False)
            generation.publish(ReplyFailed(code="generation_failed", detail="the model failed to generate a reply"))
        finally:
            if timer is not None:
                timer.cancel()
            self._slots.release()
            generation.settle()
            if generation.conversation_id is not None:
                self._running.pop(generation.conversation_id, None)
                self._keep_for_late_clients(generation.conversation_id, generation)

    def _propose_title(self, generation: Generation) -> None:
        """After a conversation's first reply (to a user message at the root), let the model name it."""
        user_message = generation.user_message
        if self._titles is None or generation.conversation_id is None or user_message is None:
            return
        if user_message.parent_id is None:
            self._titles.propose_after_first_reply(generation.conversation_id, user_message.content)

    def _keep_for_late_clients(self, conversation_id: UUID, generation: Generation) -> None:
        self._recent[conversation_id] = generation

        def forget() -> None:
            if self._recent.get(conversation_id) is generation:
                del self._recent[conversation_id]

        asyncio.get_running_loop().call_later(self._settings.disconnect_grace_seconds, forget)

    async def _retry_while_unavailable(self, write: Callable[[], Awaitable[T]]) -> T:
        """Run a write; while the database is unreachable, try again (the reply waits in memory) for up to
        CHIPI_DATABASE_RETRY_SECONDS, then give up with the last error."""
        deadline = time.monotonic() + self._settings.database_retry_seconds
        delay = 0.2
        while True:
            try:
                return await write()
            except Exception as exc:
                if not database_unavailable(exc) or time.monotonic() + delay > deadline:
                    raise
                logger.warning("database unavailable, retrying a reply's final write in %.1fs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _save_partial(self, generation: Generation, content: str, reasoning: str | None) -> bool:
        """Write the text so far of a reply still streaming; False if it was deleted."""
        assert generation.reply is not None
        return await write_reply_text(self._db_config.get_engine(), generation.reply.id, content, reasoning)

    async def _save(
        self,
        generation: Generation,
        content: str,
        reasoning: str | None,
        status: MessageStatus,
        finished: GenerationFinished | None,
        reason: str,
    ) -> Message | None:
        """Write the reply in a short session of its own."""
        assert generation.reply is not None
        async with ConversationService.new(config=self._db_config) as conversations:
            stored = await conversations.save_reply(
                generation.reply.id,
                content=content,
                reasoning=reasoning,
                status=status,
                prompt_tokens=finished.prompt_tokens if finished else None,
                completion_tokens=finished.completion_tokens if finished else None,
                finish_reason=finished.finish_reason if finished else reason or None,
            )
        if stored is not None:
            generation.reply = stored
        return stored

    def start(self) -> None:
        """Begin sweeping up replies that a dead process (this one before a restart, or another) left streaming."""
        self._sweeper = asyncio.create_task(self._sweep_interrupted_replies())

    async def _sweep_interrupted_replies(self) -> None:
        stale_seconds = self._settings.stale_stream_seconds
        while True:
            try:
                async with ConversationService.new(config=self._db_config) as conversations:
                    if count := await conversations.finish_interrupted_replies(stale_seconds):
                        logger.warning("marked %d reply(ies) left streaming by a stopped process as error", count)
            except Exception as exc:  # the database may be down for a while; try again next round
                if database_unavailable(exc):
                    logger.warning("sweeping interrupted replies failed (database unavailable): %s", exc)
                else:
                    logger.exception("sweeping interrupted replies failed")
            await asyncio.sleep(stale_seconds / 2)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def drain(self, grace_seconds: float) -> None:
        """A graceful stop: refuse new replies, give the running ones up to `grace_seconds` to finish, then stop
        the rest; each is stored (complete, or cancelled with its text so far) and its clients get its last event."""
        self._draining = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_seconds)
        await self._stop_all()

    async def _stop_all(self) -> None:
        """Stop every running reply after the token it is computing and wait until each is stored; a reply whose
        last write still waits for the database after STOP_WAIT_SECONDS is abandoned (the stale sweep marks it)."""
        for generation in self._tasks.values():
            generation.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=STOP_WAIT_SECONDS)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    async def shutdown(self) -> None:
        """Stop every running reply and wait until each is stored as cancelled."""
        self._draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._titles is not None:
            await self._titles.aclose()
        await self._stop_all()
