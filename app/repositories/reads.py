"""The reads every open chat page repeats, as SQL on the database driver's own connection, rows straight into the
API's structs: a page of an owner's conversations (newest first, or matching a search) and a conversation with its
messages.

Through the ORM, a 100-message conversation cost the server 1.4 ms of CPU and a list page 0.7 ms (building and
caching the statement, a row object and a type conversion per value); here 0.4 and 0.2 ms. Writes, and the reads
that feed the model, stay on the repositories. The statements are plain SQL that SQLite and PostgreSQL both run;
`_Postgres` and `_Sqlite` hold what differs between their drivers: the parameter marker, and SQLite's stored forms of
ids (16 bytes) and times (ISO text in UTC). A driver error is raised as SQLAlchemy's, as from any other query, so a
database that is down is a 503 here too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import autocommit_engine
from app.domain.schemas import ConversationOut, MessageOut

# Every statement marks its parameters with `?` (PostgreSQL's driver gets `%s`) and selects a conversation's columns in
# the order of ConversationOut's fields, a message's in MessageOut's. The pages count their matches with a window
# function in the same statement.
_ONE = """
SELECT c.id, c.title, c.title_source, c.system_prompt, c.model, c.created_at, c.updated_at, c.active_message_id
FROM conversation AS c WHERE c.id = ? AND c.owner = ?
"""
_MESSAGES = """
SELECT m.id, m.role, m.content, m.reasoning, m.created_at, m.status, m.parent_id, m.prompt_tokens,
       m.completion_tokens, m.finish_reason
FROM message AS m WHERE m.conversation_id = ? ORDER BY m.created_at, m.id
"""
_RECENT = """
SELECT c.id, c.title, c.title_source, c.system_prompt, c.model, c.created_at, c.updated_at, c.active_message_id,
       count(*) OVER ()
FROM conversation AS c WHERE c.owner = ?
ORDER BY c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?
"""
# A search ranks each matching conversation by its best matching text, a title counting twice, lower scores first.
# Migration 0003 builds what they read. (FTS5's `rank` column is bm25(); the function itself cannot be used inside an
# aggregate.) Their parameters: the search text (PostgreSQL's twice), the owner, the page's limit and offset.
_SQLITE_SEARCH = """
SELECT c.id, c.title, c.title_source, c.system_prompt, c.model, c.created_at, c.updated_at, c.active_message_id,
       count(*) OVER ()
FROM conversation AS c JOIN (
    SELECT d.conversation_id AS conversation_id,
           min(CASE WHEN d.message_id IS NULL THEN 2.0 ELSE 1.0 END * search_fts.rank) AS score
    FROM search_fts JOIN search_doc AS d ON d.id = search_fts.rowid
    WHERE search_fts MATCH ?
    GROUP BY d.conversation_id
) AS hits ON hits.conversation_id = c.id
WHERE c.owner = ? ORDER BY hits.score, c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?
"""
_POSTGRES_SEARCH = """
SELECT c.id, c.title, c.title_source, c.system_prompt, c.model, c.created_at, c.updated_at, c.active_message_id,
       count(*) OVER ()
FROM conversation AS c JOIN (
    SELECT hits.conversation_id AS conversation_id, min(hits.score) AS score FROM (
        SELECT m.conversation_id AS conversation_id, -ts_rank(to_tsvector('english', m.content), q) AS score
        FROM message AS m, plainto_tsquery('english', ?) AS q
        WHERE to_tsvector('english', m.content) @@ q AND m.status <> 'streaming'
        UNION ALL
        SELECT c.id, -2 * ts_rank(to_tsvector('english', c.title), q)
        FROM conversation AS c, plainto_tsquery('english', ?) AS q
        WHERE to_tsvector('english', c.title) @@ q
    ) AS hits
    GROUP BY hits.conversation_id
) AS hits ON hits.conversation_id = c.id
WHERE c.owner = ? ORDER BY hits.score, c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?
"""

Row = Sequence[Any]
Fetch = Callable[[str, tuple[Any, ...]], Awaitable[list[Row]]]


class _Postgres:
    """psycopg returns ids, times and the rest as the structs hold them."""

    marker = "%s"

    @staticmethod
    def search(terms: list[str]) -> tuple[str, tuple[str, ...]]:
        text = " ".join(terms)
        return _POSTGRES_SEARCH, (text, text)

    @staticmethod
    def id_param(value: UUID) -> Any:
        return value

    @staticmethod
    def conversation(row: Row) -> ConversationOut:
        return ConversationOut(*row[:8])

    @staticmethod
    def message(row: Row) -> MessageOut:
        return MessageOut(*row)


def _fts5_string(term: str) -> str:
    """A term as an FTS5 string: read as a plain word (or phrase), never as an operator or a column filter."""
    return '"' + term.replace('"', '""') + '"'


def _sqlite_id(value: bytes | None) -> UUID | None:
    return None if value is None else UUID(bytes=value)


def _sqlite_time(value: str) -> datetime:
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


class _Sqlite:
    """advanced-alchemy stores ids as 16 bytes and SQLAlchemy times as ISO text in UTC, without an offset."""

    marker = "?"

    @staticmethod
    def search(terms: list[str]) -> tuple[str, tuple[str, ...]]:
        match = " ".join(_fts5_string(term) for term in terms)
        return _SQLITE_SEARCH, (match,)

    @staticmethod
    def id_param(value: UUID) -> Any:
        return value.bytes

    @staticmethod
    def conversation(row: Row) -> ConversationOut:
        id_, title, title_source, system_prompt, model, created_at, updated_at, active_message_id = row[:8]
        return ConversationOut(
            UUID(bytes=id_),
            title,
            title_source,
            system_prompt,
            model,
            _sqlite_time(created_at),
            _sqlite_time(updated_at),
            _sqlite_id(active_message_id),
        )

    @staticmethod
    def message(row: Row) -> MessageOut:
        id_, role, content, reasoning, created_at, status, parent_id, prompt_tokens, completion_tokens, reason = row
        return MessageOut(
            UUID(bytes=id_),
            role,
            content,
            reasoning,
            _sqlite_time(created_at),
            status,
            _sqlite_id(parent_id),
            prompt_tokens,
            completion_tokens,
            reason,
        )


class ConversationReads:
    """The conversation list and a conversation, read over `engine`'s pool (each statement its own transaction)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = autocommit_engine(engine)
        dialect = engine.dialect
        if dialect.name == "postgresql":
            self._driver: type[_Postgres] | type[_Sqlite] = _Postgres
        elif dialect.name == "sqlite":
            self._driver = _Sqlite
        else:
            raise NotImplementedError(f"the conversation reads are not written for {dialect.name}")
        self._dialect = dialect

    async def conversation(self, owner: str, conversation_id: UUID) -> tuple[ConversationOut, list[MessageOut]] | None:
        """The owner's conversation and every message of it (all branches), oldest first (UUIDv7 ids break timestamp
        ties); None for an unknown id and for another owner's alike."""
        id_param = self._driver.id_param(conversation_id)
        async with self._connection() as fetch:
            found = await fetch(_ONE, (id_param, owner))
            if not found:
                return None
            messages = await fetch(_MESSAGES, (id_param,))
        return self._driver.conversation(found[0]), [self._driver.message(row) for row in messages]

    async def recent(self, owner: str, *, limit: int, offset: int) -> tuple[list[ConversationOut], int]:
        """A page of the owner's conversations, most recently updated first, and how many there are in all."""
        return await self._page(_RECENT, (owner,), limit, offset)

    async def search(
        self, owner: str, terms: list[str], *, limit: int, offset: int
    ) -> tuple[list[ConversationOut], int]:
        """A page of the owner's conversations whose title or messages contain every term, best match first, and how
        many match in all. SQLite ranks with FTS5's bm25, PostgreSQL with ts_rank (English stemming on both)."""
        if not terms:
            return [], 0
        query, search_params = self._driver.search(terms)
        return await self._page(query, (*search_params, owner), limit, offset)

    async def _page(
        self, query: str, params: tuple[Any, ...], limit: int, offset: int
    ) -> tuple[list[ConversationOut], int]:
        async with self._connection() as fetch:
            rows = await fetch(query, (*params, limit, offset))
            if not rows and offset:  # past the end: the count comes with a row, so ask for the first one
                first = await fetch(query, (*params, 1, 0))
                return [], first[0][-1] if first else 0
        return [self._driver.conversation(row) for row in rows], rows[0][-1] if rows else 0

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Fetch]:
        """A pooled connection, as a function that runs a query on the driver and returns its rows."""
        async with self._engine.connect() as connection:
            driver_connection = (await connection.get_raw_connection()).driver_connection
            assert driver_connection is not None  # a checked-out connection is open

            async def fetch(query: str, params: tuple[Any, ...]) -> list[Row]:
                if self._driver.marker != "?":
                    query = query.replace("?", self._driver.marker)
                try:
                    cursor = await driver_connection.execute(query, params)
                    try:
                        return list(await cursor.fetchall())
                    finally:
                        await cursor.close()
                except self._dialect.loaded_dbapi.Error as exc:
                    if self._dialect.is_disconnect(exc, driver_connection, None):
                        await connection.invalidate(exc)
                    raise DBAPIError.instance(query, params, exc, self._dialect.loaded_dbapi.Error) from exc

            yield fetch
