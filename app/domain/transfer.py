"""Pure rules for exports and imports: a conversation as JSON (lossless) or Markdown, and checking an import."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

import msgspec

from app.domain.errors import InvalidInputError
from app.domain.models import Conversation, Role, StoredMessage

EXPORT_FORMAT: Literal["chipi.conversation"] = "chipi.conversation"
EXPORT_VERSION: Literal[1] = 1

AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]  # fits the database's integer columns


class MessageExport(msgspec.Struct, kw_only=True):
    """One message of the tree, as stored."""

    id: UUID
    parent_id: UUID | None = None
    role: Literal["system", "user", "assistant"]
    content: str
    reasoning: str | None = None
    status: Literal["complete", "streaming", "cancelled", "error"] = "complete"
    prompt_tokens: Count | None = None
    completion_tokens: Count | None = None
    finish_reason: Annotated[str, msgspec.Meta(max_length=32)] | None = None
    created_at: AwareDatetime
    updated_at: AwareDatetime | None = None


class ConversationExport(msgspec.Struct, kw_only=True):
    """A whole conversation: every message of every branch, and which branch is active. Importing it back
    recreates the conversation under new ids."""

    format: Literal["chipi.conversation"] = EXPORT_FORMAT
    version: Literal[1] = EXPORT_VERSION
    session_id: UUID
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    title_source: Literal["default", "auto", "model", "manual"]
    system_prompt: str | None = None
    model: Annotated[str, msgspec.Meta(max_length=255)]
    created_at: AwareDatetime
    updated_at: AwareDatetime
    active_message_id: UUID | None = None
    messages: list[MessageExport]


def export_conversation(conversation: Conversation, messages: Sequence[StoredMessage]) -> ConversationExport:
    return ConversationExport(
        session_id=conversation.id,
        title=conversation.title,
        title_source=conversation.title_source,  # type: ignore[arg-type]
        system_prompt=conversation.system_prompt,
        model=conversation.model,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        active_message_id=conversation.active_message_id,
        messages=[
            MessageExport(
                id=message.id,
                parent_id=message.parent_id,
                role=message.role,  # type: ignore[arg-type]
                content=message.content,
                reasoning=message.reasoning,
                status=message.status,  # type: ignore[arg-type]
                prompt_tokens=message.prompt_tokens,
                completion_tokens=message.completion_tokens,
                finish_reason=message.finish_reason,
                created_at=message.created_at,
                updated_at=message.updated_at,
            )
            for message in messages
        ],
    )


def _refuse_nul(text: str | None, field: str) -> None:
    if text is not None and "\x00" in text:
        raise InvalidInputError(f"{field} must not contain NUL characters", field=field)


def import_order(export: ConversationExport, *, max_title_chars: int) -> list[MessageExport]:
    """The export's messages, each after its parent, once the export is checked: a usable title, unique message
    ids, parents and the active message inside the export, no cycles. A problem is a 400 naming where it is."""
    if not export.title.strip():
        raise InvalidInputError("title must not be blank", field="title")
    if len(export.title) > max_title_chars:
        raise InvalidInputError(f"title is longer than {max_title_chars} characters", field="title")
    for field, text in (("title", export.title), ("system_prompt", export.system_prompt), ("model", export.model)):
        _refuse_nul(text, field)
    by_id: dict[UUID, MessageExport] = {}
    for index, message in enumerate(export.messages):
        _refuse_nul(message.content, f"messages[{index}].content")
        _refuse_nul(message.reasoning, f"messages[{index}].reasoning")
        _refuse_nul(message.finish_reason, f"messages[{index}].finish_reason")
        if message.id in by_id:
            raise InvalidInputError(f"message id {message.id} appears twice", field=f"messages[{index}].id")
        by_id[message.id] = message
    for index, message in enumerate(export.messages):
        if message.parent_id is not None and message.parent_id not in by_id:
            raise InvalidInputError(
                f"parent {message.parent_id} is not a message of this export", field=f"messages[{index}].parent_id"
            )
    if export.active_message_id is not None and export.active_message_id not in by_id:
        raise InvalidInputError("active_message_id is not a message of this export", field="active_message_id")
    ordered: list[MessageExport] = []
    placed: set[UUID] = set()
    for message in export.messages:
        chain: list[MessageExport] = []
        in_chain: set[UUID] = set()
        current: MessageExport | None = message
        while current is not None and current.id not in placed:
            if current.id in in_chain:
                raise InvalidInputError(f"message {current.id} is its own ancestor", field="messages")
            chain.append(current)
            in_chain.add(current.id)
            current = by_id[current.parent_id] if current.parent_id is not None else None
        for link in reversed(chain):
            placed.add(link.id)
            ordered.append(link)
    return ordered


_ROLE_HEADINGS = {Role.SYSTEM.value: "System", Role.USER.value: "User", Role.ASSISTANT.value: "Assistant"}


def render_markdown(conversation: Conversation, branch: Sequence[StoredMessage]) -> str:
    """The active branch as a readable Markdown document: a heading per message, reasoning folded away."""
    lines = [
        f"# {conversation.title}",
        "",
        f"*Chipi conversation `{conversation.id}` with `{conversation.model}`, "
        f"started {conversation.created_at.isoformat(timespec='seconds')}*",
        "",
    ]
    if conversation.system_prompt:
        lines += ["## System", "", conversation.system_prompt, ""]
    for message in branch:
        heading = _ROLE_HEADINGS.get(message.role, message.role.title())
        lines += [f"## {heading}", "", f"*{message.created_at.isoformat(timespec='seconds')}*", ""]
        if message.reasoning:
            lines += ["<details><summary>Reasoning</summary>", "", message.reasoning, "", "</details>", ""]
        lines += [message.content, ""]
        if message.status != "complete":
            lines += [f"*(reply {message.status})*", ""]
    return "\n".join(lines)
