"""Search: `GET /api/conversations?q=` finds conversations by title and message content, ranked and paginated.

The server is shared by every test of a database, so each test searches for words of its own (`unique_word`).
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
from advanced_alchemy.alembic.commands import AlembicCommands
from advanced_alchemy.types import GUID, DateTimeUTC
from sqlalchemy import String, column, create_engine, insert, table
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from app.db import create_db_config, upgrade_database_sync
from app.domain.auth import LOCAL_OWNER
from app.domain.models import Message
from app.settings import Settings
from tests.helpers import listed_in_database, new_conversation, send_message


def unique_word(prefix: str = "zq") -> str:
    """A word no other test stores: letters only, so every tokenizer keeps it whole."""
    return prefix + "".join(chr(ord("a") + int(digit, 16) % 26) for digit in uuid.uuid4().hex[:10])


async def search(client: httpx.AsyncClient, q: str, **params: Any) -> dict[str, Any]:
    response = await client.get("/api/conversations", params={"q": q, **params})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def ids(page: dict[str, Any]) -> list[str]:
    return [conversation["session_id"] for conversation in page["conversations"]]


async def every_match(client: httpx.AsyncClient, q: str) -> list[str]:
    """The ids of every conversation that matches, page by page."""
    found: list[str] = []
    while True:
        page = await search(client, q, limit=100, offset=len(found))
        found += ids(page)
        if len(found) >= page["total"] or not page["conversations"]:
            return found


async def imported(client: httpx.AsyncClient, title: str, *texts: str) -> str:
    """A conversation with the given user/assistant texts, stored through the import (no model needed)."""
    now = "2026-01-01T12:00:00+00:00"
    messages, parent = [], None
    for index, text in enumerate(texts):
        message_id = str(uuid.uuid4())
        role = "user" if index % 2 == 0 else "assistant"
        messages.append({"id": message_id, "parent_id": parent, "role": role, "content": text, "created_at": now})
        parent = message_id
    export = {
        "session_id": str(uuid.uuid4()),
        "title": title,
        "title_source": "manual",
        "model": "test",
        "created_at": now,
        "updated_at": now,
        "active_message_id": parent,
        "messages": messages,
    }
    response = await client.post("/api/conversations/import", json=export)
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


async def test_a_chat_is_found_by_its_messages_and_its_title(client: httpx.AsyncClient) -> None:
    word = unique_word()
    session_id = (await new_conversation(client))["session_id"]
    exchange = await send_message(client, session_id, f"My parrot is called {word}. Say hi to it.", max_tokens=4)
    page = await search(client, word)
    assert ids(page) == [session_id] and page["total"] == 1
    found = page["conversations"][0]
    assert set(found) >= {"session_id", "title", "created_at", "updated_at"}  # the list's usual shape
    assert page["limit"] == 20 and page["offset"] == 0
    reply_words = [word for word in exchange["response"].split() if word.isalpha()]
    if reply_words:  # the model's reply is searchable too, once it is finished
        assert session_id in await every_match(client, " ".join(reply_words))
    title_word = unique_word()
    await client.patch(f"/api/conversations/{session_id}/title", params={"title": f"About {title_word}"})
    assert ids(await search(client, title_word)) == [session_id]
    old_title_word = unique_word()
    renamed = await new_conversation(client, title=f"Notes on {old_title_word}")
    await client.patch(f"/api/conversations/{renamed['session_id']}/title", params={"title": "Something else"})
    assert (await search(client, old_title_word))["total"] == 0  # the old title is gone from the index


async def test_every_word_must_match_and_words_are_stemmed(client: httpx.AsyncClient) -> None:
    first, second = unique_word(), unique_word()
    both = await imported(client, "both", f"Baking bread with {first} and {second} today")
    only_first = await imported(client, "only one", f"Just {first} here")
    assert set(ids(await search(client, first))) == {both, only_first}
    assert ids(await search(client, f"{first} {second}")) == [both]
    assert ids(await search(client, f"{second} bakes")) == [both]  # "baking" and "bakes" share a stem


async def test_results_are_ranked_title_matches_first(client: httpx.AsyncClient) -> None:
    word = unique_word()
    filler = "lorem ipsum dolor sit amet consectetur " * 20
    in_a_long_message = await imported(client, "unrelated", f"{filler} {word} {filler}")
    in_the_title = await imported(client, f"{word} plans", "nothing to see")
    in_a_short_message = await imported(client, "other", f"{word} {word} is all this says")
    page = await search(client, word)
    assert ids(page)[0] == in_the_title
    assert ids(page).index(in_a_short_message) < ids(page).index(in_a_long_message)


async def test_results_are_paginated(client: httpx.AsyncClient) -> None:
    word = unique_word()
    created = {await imported(client, f"page {n}", f"{word} number {n}") for n in range(3)}
    first = await search(client, word, limit=2, offset=0)
    second = await search(client, word, limit=2, offset=2)
    assert first["total"] == second["total"] == 3
    assert len(first["conversations"]) == 2 and len(second["conversations"]) == 1
    assert set(ids(first)) | set(ids(second)) == created
    assert (await search(client, word, limit=2, offset=10))["conversations"] == []


async def test_deleted_conversations_disappear_from_results(client: httpx.AsyncClient) -> None:
    word = unique_word()
    kept = await imported(client, f"{word} kept", f"about {word}")
    deleted = await imported(client, f"{word} deleted", f"about {word} too")
    assert set(ids(await search(client, word))) == {kept, deleted}
    assert (await client.delete(f"/api/conversations/{deleted}")).status_code == 200
    page = await search(client, word)
    assert ids(page) == [kept] and page["total"] == 1


async def test_unicode_words_are_found(client: httpx.AsyncClient) -> None:
    word = unique_word("façüé")
    session_id = await imported(client, "unicode", f"Viele {word} aus Zürich, 東京 too")
    assert ids(await search(client, word)) == [session_id]
    assert ids(await search(client, word.upper())) == [session_id]  # case does not matter


async def test_any_input_gives_a_sensible_answer(client: httpx.AsyncClient) -> None:
    word = unique_word()
    session_id = await imported(client, "syntax", f"plain {word} text")
    for q in [  # operators of FTS5, tsquery, SQL: all just separators between words
        f'"{word}',
        f"{word}*",
        f"-{word}",
        f"plain:{word}",  # a column filter in FTS5
        f"({word}",
        f"^{word}'; --",
        f"\\{word}%_",
        f"{word} & | ! :* <-> + ~",
    ]:
        assert ids(await search(client, q)) == [session_id], q
    for q in [f"{word} OR plain", f"NOT {word}", f"NEAR({word} text)", f"{word} AND text", "' OR 1=1 --"]:
        response = await client.get("/api/conversations", params={"q": q})  # words, even when they look like syntax
        assert response.status_code == 200, q
    for q in ['"', "*", "()", "!!! ???", "\u200b", "🦜"]:
        page = await search(client, q)
        assert page["conversations"] == [] and page["total"] == 0, q


async def test_a_blank_query_lists_as_without_one(client: httpx.AsyncClient) -> None:
    await new_conversation(client, title="listed")
    plain = (await client.get("/api/conversations", params={"limit": 5})).json()
    for q in ["", "   "]:
        assert await search(client, q, limit=5) == plain


async def test_an_overlong_query_is_400(client: httpx.AsyncClient) -> None:
    for q in ["x" * 501, " ".join(f"w{n}" for n in range(40))]:
        response = await client.get("/api/conversations", params={"q": q})
        assert response.status_code == 400, response.text
        assert response.json()["field"] == "q"


def test_the_migration_indexes_what_is_already_stored(fresh_database_url: str) -> None:
    settings = replace(Settings.from_env(), database_url=fresh_database_url)
    AlembicCommands(create_db_config(settings, pooled=False)).upgrade("0002")  # a database from before search
    title_word, message_word = unique_word(), unique_word()
    url = make_url(fresh_database_url)
    sync_driver = "sqlite" if url.get_backend_name() == "sqlite" else "postgresql+psycopg"  # psycopg 3 is both
    sync_engine = create_engine(url.set(drivername=sync_driver))
    # The conversation table as 0002 left it (the model has grown columns since); the message table is unchanged.
    old_conversation = table(
        "conversation",
        column("id", GUID()),
        column("title", String()),
        column("title_source", String()),
        column("model", String()),
        column("created_at", DateTimeUTC()),
        column("updated_at", DateTimeUTC()),
    )
    session_id, now = uuid.uuid4(), datetime.now(UTC)
    with Session(sync_engine) as session:
        title = f"Old {title_word}"
        session.execute(
            insert(old_conversation).values(
                id=session_id, title=title, title_source="manual", model="m", created_at=now, updated_at=now
            )
        )
        session.add(Message(conversation_id=session_id, role="user", content=f"old {message_word}"))
        session.commit()
    sync_engine.dispose()
    upgrade_database_sync(settings)

    assert listed_in_database(fresh_database_url, LOCAL_OWNER, title_word) == [session_id]
    assert listed_in_database(fresh_database_url, LOCAL_OWNER, message_word) == [session_id]
