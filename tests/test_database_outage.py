"""PostgreSQL stopped mid-run, while replies stream: requests fail fast with 503 JSON, health says why, replies keep
streaming from the in-process model and are stored once the database is back, and the service recovers without a
restart. Nothing is lost or duplicated.

The database is a private throwaway cluster (tests/postgres_cluster.py), stopped with `pg_ctl stop -m immediate`
(every connection cut, as in a crash) and started again; the shared server on 5432 is never touched.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from httpx_sse import aconnect_sse
from sqlalchemy.engine import make_url
from websockets.exceptions import ConnectionClosed

from tests.conftest import REQUIRE_POSTGRES
from tests.helpers import connect_socket, frames_until_done, new_conversation, next_frame, send_message
from tests.postgres_cluster import PostgresCluster, missing_reason
from tests.server import ChipiServer

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
SHORT_PROMPT = "Name three colors."
FAST_SECONDS = 5.0  # "fail fast": far below any pool or connect timeout a hung request would wait for


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    reason = missing_reason()
    if reason is not None:
        if REQUIRE_POSTGRES:
            pytest.fail(f"a private PostgreSQL cluster is required but cannot run: {reason}")
        pytest.skip(reason)
    postgres = PostgresCluster()
    try:
        postgres.init()
        postgres.start()
        yield postgres
    finally:
        postgres.destroy()


def stored_messages(url: str) -> list[dict[str, Any]]:
    """Every message row, read straight from the database."""
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as connection:
        cursor = connection.execute(
            "SELECT conversation_id::text, role, content, status, finish_reason FROM message ORDER BY created_at, id"
        )
        columns = [column.name for column in cursor.description or []]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def log_text(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_for_log(log: Path, pattern: str, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while not re.search(pattern, log_text(log)):
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}"
        await asyncio.sleep(0.1)


async def timed(request: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await request
    return response, time.monotonic() - started


async def test_postgres_stopped_mid_stream(cluster: PostgresCluster, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    settings = {
        "CHIPI_MAX_NEW_TOKENS": "300",
        "CHIPI_STREAM_FLUSH_SECONDS": "0.2",
        "CHIPI_DATABASE_RETRY_SECONDS": "300",  # the outage below lasts as long as the slow machine makes it
        "CHIPI_LOG_LEVEL": "info",
        "CHIPI_LOG_FORMAT": "text",
    }
    with log.open("wb") as sink, ChipiServer(cluster.url, stderr=sink, **settings) as server:
        assert server.process is not None
        pid = server.process.pid
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            earlier, streamed, socketed, refused = [(await new_conversation(client))["session_id"] for _ in range(4)]
            await send_message(client, earlier, "Say hello.", max_tokens=8)

            async with (
                aconnect_sse(
                    client, "GET", f"/api/conversations/{streamed}/stream", params={"prompt": LONG_PROMPT}
                ) as source,
                connect_socket(client, socketed) as socket,
            ):
                events = source.aiter_sse()
                sse_text = (await anext(events)).data
                await socket.send(json.dumps({"type": "message", "content": SHORT_PROMPT, "max_tokens": 8}))
                assert (await next_frame(socket))["type"] == "user_message"

                cluster.stop()  # mid-stream: both replies are being generated

                # Requests fail fast with the one error shape, 503 with Retry-After.
                for request in [
                    client.get("/api/conversations"),
                    client.get(f"/api/conversations/{earlier}"),
                    client.post("/api/conversations/new"),
                    client.get(f"/api/conversations/{refused}/stream", params={"prompt": "Hello"}),
                    client.post(f"/api/conversations/{refused}/message", json={"content": "Hello"}),
                ]:
                    response, seconds = await timed(request)
                    assert response.status_code == 503, response.text
                    assert response.json()["code"] == "database_unavailable" and response.headers["Retry-After"]
                    assert seconds < FAST_SECONDS
                health, seconds = await timed(client.get("/api/health"))
                assert health.status_code == 503 and seconds < FAST_SECONDS
                assert health.json()["not_ready"] == ["database"]
                assert health.json()["components"]["database"]["state"] == "unreachable"
                async with connect_socket(client, refused) as refused_socket:  # a new socket is told why, and closed
                    assert (await next_frame(refused_socket))["code"] == "database_unavailable"
                    with pytest.raises(ConnectionClosed) as closed:
                        await next_frame(refused_socket)
                    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013  # try again later

                # The model is in-process: the replies go on; the socket's short one ends while the database is down,
                # so its last write waits for it.
                await wait_for_log(log, "retrying a reply's final write")
                cluster.start()

                socket_frames = await frames_until_done(socket)
                # The long reply has outlived the outage; stopping it now stores it as cancelled with its text so far.
                assert (await client.post(f"/api/conversations/{streamed}/stop")).status_code == 200
                async for event in events:
                    if event.event == "message":
                        sse_text += event.data
                    last = event

            # Back without a restart: the first request after the database returned already works.
            assert (await client.get("/api/conversations")).status_code == 200
            assert (await client.get("/api/health")).status_code == 200
            again = await send_message(client, refused, "Say hello.", max_tokens=8)
            assert again["assistant_message"]["status"] == "complete"
            assert server.process.pid == pid and server.process.poll() is None

    assert last.event == "done"
    sse_status = "cancelled" if last.json()["finish_reason"] == "cancelled" else "complete"
    done = socket_frames[-1]
    assert done["type"] == "done" and done["message"]["status"] == "complete"
    socket_text = "".join(frame["text"] for frame in socket_frames if frame["type"] == "token")

    by_conversation: dict[str, list[tuple[str, str, str]]] = {}
    for row in stored_messages(cluster.url):
        by_conversation.setdefault(row["conversation_id"], []).append((row["role"], row["content"], row["status"]))
    assert [role for role, _, _ in by_conversation[earlier]] == ["user", "assistant"]
    assert by_conversation[streamed] == [("user", LONG_PROMPT, "complete"), ("assistant", sse_text, sse_status)]
    assert by_conversation[socketed] == [("user", SHORT_PROMPT, "complete"), ("assistant", socket_text, "complete")]
    # The refused requests stored nothing; the one sent after the outage is there once.
    assert [(role, content) for role, content, _ in by_conversation[refused]][:1] == [("user", "Say hello.")]
    assert len(by_conversation[refused]) == 2
    assert all(status != "streaming" for rows in by_conversation.values() for _, _, status in rows)
    lines = log_text(log).splitlines()
    assert not [line for line in lines if "Traceback" in line or re.search(r'" 5(?!03)\d\d ', line)]


async def test_a_reply_that_cannot_be_stored_is_marked_once_the_database_is_back(
    cluster: PostgresCluster, tmp_path: Path
) -> None:
    """With no retry window, a reply that ends while the database is down cannot be written: its client gets an
    `error` event, and once the database is back the stale-stream sweep marks it `error` (never `streaming`)."""
    settings = {"CHIPI_DATABASE_RETRY_SECONDS": "0", "CHIPI_STALE_STREAM_SECONDS": "1"}
    with (tmp_path / "server.log").open("wb") as sink, ChipiServer(cluster.url, stderr=sink, **settings) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            session_id = (await new_conversation(client))["session_id"]
            async with connect_socket(client, session_id) as socket:
                await socket.send(json.dumps({"type": "message", "content": LONG_PROMPT}))
                assert (await next_frame(socket))["type"] == "user_message"
                streamed = (await next_frame(socket))["text"]
                cluster.stop()
                frames = await frames_until_done(socket)
            cluster.start()
            deadline = time.monotonic() + 60
            while True:  # the first requests may still find the database starting
                response = await client.get(f"/api/conversations/{session_id}")
                if response.status_code == 200 and response.json()["messages"][-1]["status"] != "streaming":
                    break
                assert time.monotonic() < deadline, response.text
                await asyncio.sleep(0.2)
    assert frames[-1] == {"type": "error", "code": "database_unavailable", "detail": frames[-1]["detail"]}
    streamed += "".join(frame["text"] for frame in frames if frame["type"] == "token")
    user, reply = response.json()["messages"]
    assert user["role"] == "user" and user["content"] == LONG_PROMPT
    assert reply["status"] == "error" and reply["finish_reason"] == "interrupted"
    assert streamed.startswith(reply["content"])  # what was written before the outage


async def test_a_restart_between_requests_fails_none(cluster: PostgresCluster) -> None:
    """The database restarts while the server is idle, so every pooled connection is dead: the pool notices at
    checkout (the server's closing notice is waiting on the socket) and connects anew, so not even the first
    requests after the restart fail."""
    with ChipiServer(cluster.url, CHIPI_STALE_STREAM_SECONDS="3600") as server:  # no sweep touches the pool
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            session_id = (await new_conversation(client))["session_id"]
            before = await asyncio.gather(*(client.get("/api/conversations") for _ in range(8)))
            assert [response.status_code for response in before] == [200] * 8  # several connections in the pool
            cluster.stop()
            cluster.start()
            after = await asyncio.gather(*(client.get(f"/api/conversations/{session_id}") for _ in range(8)))
            renamed = await client.patch(f"/api/conversations/{session_id}/title", json={"title": "After the restart"})
    assert [response.status_code for response in after] == [200] * 8
    assert renamed.status_code == 200, renamed.text
