"""The seed-compatible conversation API, plus stop, regenerate, edit and branches.

Inputs the seed took as query parameters are also accepted as JSON bodies.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
from litestar import Controller, delete, get, patch, post, put
from litestar.di import Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import Response, Stream
from sqlalchemy.ext.asyncio import AsyncEngine

from app.controllers.auth import KEY_REQUIRED
from app.controllers.openapi import CHAT_STREAM_EVENT, TEXT, error_responses, success_content
from app.controllers.sse import event_stream, sse_event
from app.domain.errors import InvalidInputError
from app.domain.rules import clean_system_prompt, clean_title
from app.domain.schemas import (
    BranchSwitch,
    ConversationCreate,
    ConversationCreated,
    ConversationDeleted,
    ConversationDetail,
    ConversationImported,
    ConversationList,
    EditRequest,
    GenerationOptions,
    MessageCreate,
    MessageExchange,
    RegenerateRequest,
    StopResult,
    StreamDone,
    StreamError,
    TitleUpdate,
    TitleUpdated,
    conversation_out,
    message_out,
)
from app.domain.transfer import ConversationExport
from app.services.chat import ChatService, Generation, ReplyFailed, ReplyFinished, ReplyOptions
from app.services.conversations import ConversationService, Edit, NewMessage, Regenerate
from app.services.pages import ConversationPages
from app.settings import Settings


def _parse_uuid(value: str, field: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidInputError(f"{field} {value!r} is not a valid UUID", field=field) from None


def parse_session_id(
    session_id: Annotated[str, Parameter(description="The conversation's id (a UUID)")],
) -> UUID:
    """The path's conversation id; a malformed one is a 400 (a typed path segment would make it a 404)."""
    return _parse_uuid(session_id, "session_id")


def parse_message_id(message_id: Annotated[str, Parameter(description="A message's id (a UUID)")]) -> UUID:
    return _parse_uuid(message_id, "message_id")


MAX_OFFSET = 2**31 - 1  # the databases' OFFSET takes at most a 64-bit integer; no list is anywhere near this long


def _given(from_body: Any, from_query: Any) -> Any:
    """The JSON body's value when it has one, else the query parameter's."""
    return from_body if from_body is not None else from_query


def _options(body: GenerationOptions | None) -> ReplyOptions:
    return ReplyOptions(body.max_tokens, body.temperature, body.top_p) if body else ReplyOptions()


async def _sse_events(generation: Generation, after: int) -> AsyncIterator[bytes]:
    """The reply as the seed's frontend reads it: unnamed text events (reasoning between `<think>` and
    `</think>` events), then a named `done` or `error` event. Each id lets EventSource resume via Last-Event-ID."""
    async for seq, event in generation.follow(after):
        event_id = generation.event_id(seq)
        if isinstance(event, ReplyFinished):
            assert generation.user_message is not None and generation.reply is not None
            done = StreamDone(generation.user_message.id, generation.reply.id, event.usage, event.finish_reason)
            yield sse_event(msgspec.json.encode(done).decode(), event="done", event_id=event_id)
        elif isinstance(event, ReplyFailed):
            error = StreamError(code=event.code, detail=event.detail)
            yield sse_event(msgspec.json.encode(error).decode(), event="error", event_id=event_id)
        else:
            yield sse_event(event.text, event_id=event_id)


def _exchange(conversation_id: UUID, user_message: Any, reply: Any) -> MessageExchange:
    return MessageExchange(conversation_id, message_out(user_message), message_out(reply), response=reply.content)


class ConversationController(Controller):
    path = "/api/conversations"
    tags = ["conversations"]
    security = KEY_REQUIRED
    dependencies = {"conversation_id": Provide(parse_session_id, sync_to_thread=False)}

    @get(
        "/",
        operation_id="listConversations",
        summary="Conversations, most recently updated first",
        responses=error_responses(400, 401),
    )
    async def list_conversations(
        self,
        pages: ConversationPages,
        owner: str,
        limit: Annotated[int, Parameter(ge=1, le=100, description="Page size")] = 20,
        offset: Annotated[int, Parameter(ge=0, le=MAX_OFFSET, description="Conversations to skip")] = 0,
        q: Annotated[
            str | None,
            Parameter(
                description="Search: conversations whose title or messages contain every word, best match first "
                "(blank: no search)"
            ),
        ] = None,
    ) -> ConversationList:
        return await pages.conversations(owner, q, limit=limit, offset=offset)

    @post(
        "/new",
        operation_id="createConversation",
        summary="Start a conversation",
        responses=error_responses(400, 401, 413),
    )
    async def create_conversation(
        self,
        conversations: ConversationService,
        owner: str,
        settings: Settings,
        data: ConversationCreate | None = None,
        title: Annotated[str | None, Parameter(description="Optional title (or in the body)")] = None,
    ) -> ConversationCreated:
        body = data or ConversationCreate()
        given_title = _given(body.title, title)
        conversation = await conversations.start_conversation(
            owner,
            title=clean_title(given_title, max_chars=settings.max_title_chars) if given_title else None,
            system_prompt=clean_system_prompt(body.system_prompt, max_chars=settings.max_prompt_chars),
            model=settings.model,
        )
        return conversation_out(conversation, ConversationCreated, message="Conversation created")

    @get(
        "/export",
        operation_id="exportAllConversations",
        summary="Every conversation of the caller as NDJSON: one JSON export (as from a single export) per line, "
        "streamed",
        media_type="application/x-ndjson",
        responses=error_responses(401),
    )
    async def export_all(self, db_engine: AsyncEngine, owner: str) -> Stream:
        return Stream(
            ConversationService.export_all_ndjson(db_engine, owner),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": 'attachment; filename="chipi-conversations.ndjson"'},
        )

    @post(
        "/import",
        operation_id="importConversation",
        summary="Recreate a conversation from its JSON export, under new ids, as the caller's",
        responses=error_responses(400, 401, 413),
    )
    async def import_conversation(
        self, conversations: ConversationService, owner: str, settings: Settings, data: ConversationExport
    ) -> ConversationImported:
        conversation = await conversations.import_conversation(
            owner,
            data,
            max_title_chars=settings.max_title_chars,
            limits=settings.conversation_limits,
        )
        return conversation_out(
            conversation, ConversationImported, message="Conversation imported", imported_messages=len(data.messages)
        )

    @get(
        "/{session_id:str}/export",
        operation_id="exportConversation",
        summary="A conversation as JSON (every message of every branch, re-importable) or Markdown (active branch)",
        responses={
            200: ResponseSpec(
                data_container=ConversationExport,
                description="format=json: the export; format=markdown: a text/markdown document",
            ),
            **error_responses(400, 401, 404),
        },
        operation_class=success_content(("text/markdown", TEXT), keep_inferred=True),
    )
    async def export_conversation(
        self,
        reader: ConversationService,
        owner: str,
        conversation_id: UUID,
        format: Annotated[Literal["json", "markdown"], Parameter(description="json or markdown")] = "json",
    ) -> Response[bytes]:
        exported = await reader.export_file(owner, conversation_id, format)
        disposition = f'attachment; filename="{exported.filename}"'
        return Response(exported.content, media_type=exported.media_type, headers={"Content-Disposition": disposition})

    @get(
        "/{session_id:str}",
        operation_id="getConversation",
        summary="A conversation and its messages, oldest first",
        responses=error_responses(400, 401, 404),
    )
    async def get_conversation(
        self,
        pages: ConversationPages,
        owner: str,
        conversation_id: UUID,
        tree: Annotated[bool, Parameter(description="Every message of every branch instead of the active one")] = False,
    ) -> ConversationDetail:
        return await pages.conversation(owner, conversation_id, tree=tree)

    @delete(
        "/{session_id:str}",
        operation_id="deleteConversation",
        summary="Delete a conversation and its messages",
        status_code=200,
        responses=error_responses(400, 401, 404),
    )
    async def delete_conversation(
        self, conversations: ConversationService, owner: str, conversation_id: UUID
    ) -> ConversationDeleted:
        await conversations.delete_conversation(owner, conversation_id)
        return ConversationDeleted(session_id=conversation_id, message="Conversation deleted")

    @patch(
        "/{session_id:str}/title",
        operation_id="renameConversation",
        summary="Set a conversation's title; a manual title is never replaced automatically",
        responses=error_responses(400, 401, 404, 413),
    )
    async def rename_conversation(
        self,
        conversations: ConversationService,
        owner: str,
        settings: Settings,
        conversation_id: UUID,
        data: TitleUpdate | None = None,
        title: Annotated[str | None, Parameter(description="The new title (or in the body)")] = None,
    ) -> TitleUpdated:
        new_title = clean_title(_given(data.title if data else None, title), max_chars=settings.max_title_chars)
        await conversations.rename(owner, conversation_id, new_title)
        return TitleUpdated(session_id=conversation_id, title=new_title, message="Title updated")

    @post(
        "/{session_id:str}/message",
        operation_id="sendMessage",
        summary="Store a user message and return it with the model's complete reply",
        status_code=200,
        responses=error_responses(400, 401, 404, 409, 413),
    )
    async def send_message(
        self,
        chat: ChatService,
        owner: str,
        conversation_id: UUID,
        data: MessageCreate | None = None,
        content: Annotated[str | None, Parameter(description="The message (or in the body)")] = None,
        role: Annotated[str | None, Parameter(description="Only `user` is accepted")] = None,
    ) -> MessageExchange:
        if data is None and role not in (None, "user"):
            raise InvalidInputError("role must be 'user'; replies come from the model", field="role")
        request = NewMessage(_given(data.content if data else None, content) or "")
        user_message, reply = await chat.reply(owner, conversation_id, request, _options(data))
        return _exchange(conversation_id, user_message, reply)

    @get(
        "/{session_id:str}/stream",
        operation_id="streamReply",
        summary="Store the prompt as a user message and stream the reply as server-sent events",
        description=(
            "Each text delta is an unnamed event whose data is the exact text; the stream ends with `event: done` "
            "(JSON: user_message_id, assistant_message_id, usage, finish_reason) or `event: error` (JSON: code, "
            "detail), then closes."
        ),
        responses=error_responses(400, 401, 404, 409, 413),
        operation_class=success_content(("text/event-stream", CHAT_STREAM_EVENT)),
    )
    async def stream_reply(
        self,
        chat: ChatService,
        owner: str,
        conversation_id: UUID,
        prompt: Annotated[str | None, Parameter(description="The user's message, form-encoded (+ is a space)")] = None,
        thinking: Annotated[bool, Parameter(description="Let a reasoning model think first (Qwen3 style)")] = False,
        last_event_id: Annotated[
            str | None, Parameter(header="Last-Event-ID", description="Resume after this event (EventSource sets it)")
        ] = None,
    ) -> Stream:
        generation, after = await chat.open_stream(
            owner, conversation_id, prompt, ReplyOptions(thinking=thinking), last_event_id
        )
        return event_stream(_sse_events(generation, after))

    @post(
        "/{session_id:str}/stop",
        operation_id="stopReply",
        summary="Stop the reply being generated; it is stored as cancelled with the text so far",
        status_code=200,
        responses=error_responses(400, 401, 404),
    )
    async def stop_reply(self, chat: ChatService, owner: str, conversation_id: UUID) -> StopResult:
        reply = await chat.stop(owner, conversation_id)
        if reply is None:
            return StopResult(conversation_id, stopped=False, message="No reply was running", assistant_message=None)
        return StopResult(conversation_id, stopped=True, message="Reply stopped", assistant_message=message_out(reply))

    @post(
        "/{session_id:str}/regenerate",
        operation_id="regenerateReply",
        summary="Generate another reply to the same user message; the old reply stays as a sibling branch",
        status_code=200,
        responses=error_responses(400, 401, 404, 409, 413),
    )
    async def regenerate_reply(
        self, chat: ChatService, owner: str, conversation_id: UUID, data: RegenerateRequest | None = None
    ) -> MessageExchange:
        request = Regenerate(data.message_id if data else None)
        user_message, reply = await chat.reply(owner, conversation_id, request, _options(data))
        return _exchange(conversation_id, user_message, reply)

    @post(
        "/{session_id:str}/messages/{message_id:str}/edit",
        operation_id="editMessage",
        summary="Store an edited user message as a new branch and reply to it; the original branch stays",
        status_code=200,
        dependencies={"message_id_value": Provide(parse_message_id, sync_to_thread=False)},
        responses=error_responses(400, 401, 404, 409, 413),
    )
    async def edit_message(
        self, chat: ChatService, owner: str, conversation_id: UUID, message_id_value: UUID, data: EditRequest
    ) -> MessageExchange:
        edit = Edit(message_id_value, data.content)
        user_message, reply = await chat.reply(owner, conversation_id, edit, _options(data))
        return _exchange(conversation_id, user_message, reply)

    @put(
        "/{session_id:str}/branch",
        operation_id="switchBranch",
        summary="Make the branch through a message active; returns that branch",
        responses=error_responses(400, 401, 404, 409, 413),
    )
    async def switch_branch(
        self, chat: ChatService, owner: str, conversation_id: UUID, data: BranchSwitch
    ) -> ConversationDetail:
        conversation, messages = await chat.switch_branch(owner, conversation_id, data.message_id)
        return ConversationDetail(conversation_out(conversation), [message_out(m) for m in messages])
