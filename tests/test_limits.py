"""Limits, through a real server with small ones: per-client rate limits (429 + Retry-After), request bodies, texts,
recordings and conversations that are too large (413), generation limits (max tokens, wall time), and that an
internal error is a bare 500.

Every test speaks with an API key of its own, created in the module's database (which switches authentication on
for its server), so each has a rate-limit budget of its own; the test of address-based limits runs a server of its
own with authentication off.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from httpx_sse import aconnect_sse
from sqlalchemy.engine import make_url

from app.db import create_db_config
from app.services.keys import ApiKeyService
from app.settings import Settings
from tests.helpers import frames_until_done, get_conversation, new_conversation, next_frame
from tests.server import ChipiServer

RATE_LIMIT = 30  # a minute
MAX_BODY_BYTES = 20_000
MAX_AUDIO_BYTES = 200_000
MAX_CONVERSATION_MESSAGES = 4
MAX_CONVERSATION_CHARS = 3000
MAX_GENERATION_SECONDS = 0.5
MAX_NEW_TOKENS = 400  # more than fit in the time limit on any CPU
LONG_REPLY_PROMPT = "Write a long story about a dragon who learns to bake bread."  # runs to 400 tokens greedily


@pytest.fixture(scope="module")
def limits_server(module_database_url: str) -> Iterator[ChipiServer]:
    with ChipiServer(
        module_database_url,
        CHIPI_RATE_LIMIT=str(RATE_LIMIT),
        CHIPI_MAX_BODY_BYTES=str(MAX_BODY_BYTES),
        CHIPI_MAX_AUDIO_BYTES=str(MAX_AUDIO_BYTES),
        CHIPI_MAX_CONVERSATION_MESSAGES=str(MAX_CONVERSATION_MESSAGES),
        CHIPI_MAX_CONVERSATION_CHARS=str(MAX_CONVERSATION_CHARS),
        CHIPI_MAX_GENERATION_SECONDS=str(MAX_GENERATION_SECONDS),
        CHIPI_MAX_NEW_TOKENS=str(MAX_NEW_TOKENS),
    ) as server:
        yield server


async def key_headers(database_url: str) -> dict[str, str]:
    """A new API key of an owner of its own, stored in the database: a rate-limit budget of its own."""
    config = create_db_config(replace(Settings.from_env(), database_url=database_url))
    try:
        async with ApiKeyService.new(config=config) as keys:
            created = await keys.create_key(f"limits-{uuid.uuid4().hex[:12]}")
    finally:
        await config.get_engine().dispose()
    return {"Authorization": f"Bearer {created.key}"}


@pytest.fixture
async def keyed(limits_server: ChipiServer, module_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    headers = await key_headers(module_database_url)
    async with httpx.AsyncClient(base_url=limits_server.url, timeout=60, headers=headers) as http:
        yield http


def keyed_socket(http: httpx.AsyncClient, session_id: str) -> websockets.connect:
    """The conversation's WebSocket, opened with the client's API key."""
    url = str(http.base_url).replace("http://", "ws://") + f"/api/conversations/{session_id}/ws"
    auth = {"Authorization": http.headers["authorization"]}
    return websockets.connect(url, additional_headers=auth, open_timeout=30)


def assert_error(response: httpx.Response, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["status_code"] == status and body["code"] == code and body["detail"], body
    if field is not None:
        assert body["field"] == field, body
    return body


async def spend_budget(http: httpx.AsyncClient, path: str = "/api/conversations") -> tuple[int, httpx.Response]:
    """Send requests until one is refused (at most twice the budget): how many got through, and the refusal."""
    for count in range(2 * RATE_LIMIT):
        response = await http.get(path)
        if response.status_code == 429:
            return count, response
        assert response.status_code == 200, response.text
    raise AssertionError(f"no 429 after {2 * RATE_LIMIT} requests")


# Rate limits


async def test_a_client_over_its_budget_gets_429_with_retry_after(
    keyed: httpx.AsyncClient, module_database_url: str
) -> None:
    first = await keyed.get("/api/conversations")
    assert first.status_code == 200
    assert first.headers["ratelimit-limit"] == str(RATE_LIMIT)
    assert first.headers["ratelimit-remaining"] == str(RATE_LIMIT - 1)
    started = time.monotonic()
    passed, refused = await spend_budget(keyed)
    # the whole budget may be spent at once; one more request comes back every 60/RATE_LIMIT seconds
    assert RATE_LIMIT - 1 <= passed <= RATE_LIMIT - 1 + (time.monotonic() - started) * RATE_LIMIT / 60 + 1
    body = assert_error(refused, 429, "rate_limited")
    assert "a minute" in body["detail"]
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60 // RATE_LIMIT
    other_headers = await key_headers(module_database_url)
    async with httpx.AsyncClient(base_url=str(keyed.base_url), headers=other_headers) as other_key:
        assert (await other_key.get("/api/conversations")).status_code == 200  # a budget per key
    await asyncio.sleep(retry_after)
    assert (await keyed.get("/api/conversations")).status_code == 200  # and it comes back


async def test_liveness_readiness_metrics_and_the_page_are_not_counted(keyed: httpx.AsyncClient) -> None:
    for path in ["/api/ping", "/api/health", "/metrics", "/", "/schema/openapi.json"] * (RATE_LIMIT // 4):
        response = await keyed.get(path)
        assert response.status_code == 200, (path, response.text)
        assert "ratelimit-remaining" not in response.headers
    counted = await keyed.get("/api/conversations")
    assert counted.status_code == 200 and counted.headers["ratelimit-remaining"] == str(RATE_LIMIT - 1)


async def test_the_openai_api_answers_429_in_openai_shape(keyed: httpx.AsyncClient) -> None:
    _, refused = await spend_budget(keyed, "/v1/models")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limited" and error["message"]


async def test_a_websocket_over_the_budget_is_closed_with_4429(keyed: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(keyed))["session_id"]
    await spend_budget(keyed)
    async with keyed_socket(keyed, session_id) as socket:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), 30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4429
    assert "retry after" in closed.value.rcvd.reason


async def test_without_authentication_the_budget_is_the_client_address_whatever_key_is_sent(
    module_database_url: str,
) -> None:
    server = ChipiServer(module_database_url, CHIPI_AUTH="off", CHIPI_RATE_LIMIT=str(RATE_LIMIT))
    server.start(until="/api/ping")  # the API answers before the models are loaded; these requests need none
    try:
        made_up = {"Authorization": f"Bearer sk-made-up-{uuid.uuid4().hex}"}  # what OpenAI's clients send
        async with httpx.AsyncClient(base_url=server.url, timeout=60, headers=made_up) as with_made_up_key:
            passed, refused = await spend_budget(with_made_up_key)
        assert passed >= RATE_LIMIT - 1
        assert_error(refused, 429, "rate_limited")
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as anonymous:
            assert_error(await anonymous.get("/api/conversations"), 429, "rate_limited")  # the same address
            other = {"Authorization": f"Bearer sk-another-{uuid.uuid4().hex}"}
            assert_error(await anonymous.get("/api/conversations", headers=other), 429, "rate_limited")
            assert (await anonymous.get("/api/ping")).status_code == 200  # liveness still answers
    finally:
        server.stop()


async def test_a_made_up_key_is_refused_before_it_spends_any_budget(keyed: httpx.AsyncClient) -> None:
    made_up = {"Authorization": f"Bearer chipi_{uuid.uuid4().hex}"}
    for _ in range(2 * RATE_LIMIT):
        refused = await keyed.get("/api/conversations", headers=made_up)
        assert refused.status_code == 401, refused.text
        assert "ratelimit-remaining" not in refused.headers
    assert (await keyed.get("/api/conversations")).headers["ratelimit-remaining"] == str(RATE_LIMIT - 1)


# Request bodies, texts, recordings


async def test_a_body_over_the_limit_is_413(keyed: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(keyed))["session_id"]
    big = json.dumps({"content": "x" * MAX_BODY_BYTES}).encode()
    headers = {"content-type": "application/json"}
    response = await keyed.post(f"/api/conversations/{session_id}/message", content=big, headers=headers)
    assert_error(response, 413, "too_large")

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit counts the bytes as they come
        for start in range(0, len(big), 4096):
            yield big[start : start + 4096]

    response = await keyed.post("/api/conversations/import", content=chunked(), headers=headers)
    assert_error(response, 413, "too_large")
    assert (await get_conversation(keyed, session_id))["messages"] == []


async def test_recordings_may_be_larger_than_json_bodies_up_to_the_audio_limit(keyed: httpx.AsyncClient) -> None:
    not_audio = os.urandom(MAX_BODY_BYTES * 5)  # over the JSON limit, under the audio limit: read, then refused
    response = await keyed.post("/api/audio/transcriptions", files={"file": ("a.wav", not_audio)})
    assert_error(response, 400, "invalid_input", field="file")
    too_big = os.urandom(MAX_AUDIO_BYTES + 1)
    response = await keyed.post("/api/audio/transcriptions", files={"file": ("a.wav", too_big)})
    assert_error(response, 413, "too_large")
    way_too_big = os.urandom(MAX_AUDIO_BYTES + 100_000)  # over the form's own limit too
    response = await keyed.post("/api/audio/transcriptions", files={"file": ("a.wav", way_too_big)})
    assert_error(response, 413, "too_large")


async def test_a_system_prompt_over_the_prompt_limit_is_413_and_nul_is_400(keyed: httpx.AsyncClient) -> None:
    response = await keyed.post("/api/conversations/new", json={"system_prompt": "s" * 4001})
    assert_error(response, 413, "too_large", field="system_prompt")
    session_id = (await new_conversation(keyed))["session_id"]
    response = await keyed.post(f"/api/conversations/{session_id}/message", json={"content": "a\x00b"})
    assert_error(response, 400, "invalid_input", field="content")
    response = await keyed.patch(f"/api/conversations/{session_id}/title", json={"title": "a\x00b"})
    assert_error(response, 400, "invalid_input", field="title")
    assert (await get_conversation(keyed, session_id))["messages"] == []


# Conversation size


async def test_a_full_conversation_refuses_every_write_that_would_grow_it(keyed: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(keyed))["session_id"]
    first = (await keyed.post(f"/api/conversations/{session_id}/message", json={"content": "Hi"})).json()
    second = await keyed.post(f"/api/conversations/{session_id}/message", json={"content": "Hello again"})
    assert second.status_code == 200  # 4 messages: the limit, reached
    before = (await get_conversation(keyed, session_id))["messages"]
    assert len(before) == MAX_CONVERSATION_MESSAGES

    body = assert_error(
        await keyed.post(f"/api/conversations/{session_id}/message", json={"content": "One more"}),
        413,
        "too_large",
        field="content",
    )
    assert f"the limit is {MAX_CONVERSATION_MESSAGES}" in body["detail"]
    stream = await keyed.get(f"/api/conversations/{session_id}/stream", params={"prompt": "One more"})
    assert_error(stream, 413, "too_large")
    assert_error(await keyed.post(f"/api/conversations/{session_id}/regenerate"), 413, "too_large")
    edit = f"/api/conversations/{session_id}/messages/{first['user_message']['id']}/edit"
    assert_error(await keyed.post(edit, json={"content": "Edited"}), 413, "too_large")
    model = (await keyed.get("/v1/models")).json()["data"][0]["id"]
    completion = await keyed.post(
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "One more"}], "chipi_session_id": session_id},
    )
    assert completion.status_code == 413 and completion.json()["error"]["code"] == "too_large"
    async with keyed_socket(keyed, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": "One more"}))
        frame = await next_frame(socket)
    assert frame["type"] == "error" and frame["code"] == "too_large"
    assert (await get_conversation(keyed, session_id))["messages"] == before  # nothing was written


async def test_a_conversation_over_the_character_limit_refuses_the_next_message(keyed: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(keyed))["session_id"]
    long_message = "word " * 500  # 2500 characters
    assert (await keyed.post(f"/api/conversations/{session_id}/message", json={"content": long_message})).is_success
    response = await keyed.post(f"/api/conversations/{session_id}/message", json={"content": "x" * 501})
    body = assert_error(response, 413, "too_large", field="content")
    assert f"characters; the limit is {MAX_CONVERSATION_CHARS}" in body["detail"]
    assert len((await get_conversation(keyed, session_id))["messages"]) == 2


async def test_an_import_larger_than_a_conversation_may_be_is_413(keyed: httpx.AsyncClient) -> None:
    total = (await keyed.get("/api/conversations")).json()["total"]
    now = "2026-01-01T00:00:00+00:00"
    ids = [str(uuid.uuid4()) for _ in range(MAX_CONVERSATION_MESSAGES + 1)]
    messages = [
        {
            "id": message_id,
            "parent_id": ids[index - 1] if index else None,
            "role": "user" if index % 2 == 0 else "assistant",
            "content": f"message {index}",
            "created_at": now,
        }
        for index, message_id in enumerate(ids)
    ]
    export = {
        "session_id": str(uuid.uuid4()),
        "title": "too long to import",
        "title_source": "manual",
        "model": "m",
        "created_at": now,
        "updated_at": now,
        "messages": messages,
    }
    assert_error(await keyed.post("/api/conversations/import", json=export), 413, "too_large", field="messages")
    assert (await keyed.get("/api/conversations")).json()["total"] == total  # nothing stored
    export["messages"] = messages[:MAX_CONVERSATION_MESSAGES]
    assert (await keyed.post("/api/conversations/import", json=export)).status_code == 201


# Generation limits


async def test_max_tokens_above_the_servers_cap_is_400_everywhere(keyed: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(keyed))["session_id"]
    too_many = MAX_NEW_TOKENS + 1
    response = await keyed.post(
        f"/api/conversations/{session_id}/message", json={"content": "Hi", "max_tokens": too_many}
    )
    assert_error(response, 400, "invalid_input", field="max_tokens")
    model = (await keyed.get("/v1/models")).json()["data"][0]["id"]
    for field in ("max_tokens", "max_completion_tokens"):
        completion = await keyed.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], field: too_many},
        )
        assert completion.status_code == 400 and completion.json()["error"]["param"] == "max_tokens", completion.text
    async with keyed_socket(keyed, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": "Hi", "max_tokens": too_many}))
        frame = await next_frame(socket)
    assert frame["type"] == "error" and frame["code"] == "invalid_input"
    assert (await get_conversation(keyed, session_id))["messages"] == []


async def test_a_reply_that_runs_out_of_time_is_cut_off_and_stored(keyed: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(keyed))["session_id"]
    deltas: list[str] = []
    done: dict[str, Any] = {}
    started = time.monotonic()
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(keyed, "GET", url, params={"prompt": LONG_REPLY_PROMPT}) as source:
        async for event in source.aiter_sse():
            if event.event == "message":
                deltas.append(event.data)
            elif event.event == "done":
                done = json.loads(event.data)
    elapsed = time.monotonic() - started
    assert done["finish_reason"] == "time", done
    assert 0 < done["usage"]["completion_tokens"] < MAX_NEW_TOKENS
    assert elapsed < MAX_GENERATION_SECONDS + 10  # cut off, not run to its 400 tokens
    stored = (await get_conversation(keyed, session_id))["messages"][-1]
    assert stored["status"] == "complete" and stored["finish_reason"] == "time"
    assert stored["content"] == "".join(deltas) and stored["content"]

    another = (await new_conversation(keyed))["session_id"]
    async with keyed_socket(keyed, another) as socket:
        await socket.send(json.dumps({"type": "message", "content": LONG_REPLY_PROMPT}))
        frames = await frames_until_done(socket)
    assert frames[-1]["type"] == "done" and frames[-1]["finish_reason"] == "time", frames[-1]
    assert frames[-1]["message"]["finish_reason"] == "time"

    model = (await keyed.get("/v1/models")).json()["data"][0]["id"]
    completion = await keyed.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": LONG_REPLY_PROMPT}]}
    )
    assert completion.status_code == 200
    assert completion.json()["choices"][0]["finish_reason"] == "length"  # OpenAI's name for a reply cut short


# An internal error (last: it corrupts a row of this module's database)


def _corrupt_created_at(database_url: str, title: str) -> None:
    """Make one conversation's row unreadable, as a damaged database would: a creation time that is not one."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        with sqlite3.connect(str(url.database)) as connection:
            changed = connection.execute("UPDATE conversation SET created_at = 'not a date' WHERE title = ?", (title,))
            assert changed.rowcount == 1
    else:
        plain = url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(plain, autocommit=True) as connection:
            changed = connection.execute("UPDATE conversation SET created_at = 'infinity' WHERE title = %s", (title,))
            assert changed.rowcount == 1


async def test_an_internal_error_is_a_bare_500(
    keyed: httpx.AsyncClient, limits_server: ChipiServer, module_database_url: str
) -> None:
    title = f"to be damaged {uuid.uuid4()}"
    session_id = (await new_conversation(keyed, title=title))["session_id"]
    _corrupt_created_at(module_database_url, title)
    response = await keyed.get(f"/api/conversations/{session_id}")
    assert response.status_code == 500, response.text
    assert response.json() == {
        "status_code": 500,
        "detail": "internal server error",
        "code": "internal_error",
        "field": None,
    }
    for leak in ("Traceback", "File ", ".py", "/", "not a date", "infinity", "SELECT"):
        assert leak not in response.text
    assert (await keyed.get("/api/ping")).status_code == 200  # and the server goes on
