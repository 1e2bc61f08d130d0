"""Small client-side helpers the tests share: what a frontend would do over HTTP, and the operator's CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import UUID

import httpx
from httpx_sse import ServerSentEvent, aconnect_sse
from websockets.asyncio.client import ClientConnection, connect

from app.db import create_db_config
from app.repositories.reads import ConversationReads
from app.services.pages import ConversationPages
from app.settings import Settings
from tests.server import ROOT

ISO_WITH_OFFSET = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")


def listed_in_database(database_url: str, owner: str, q: str | None) -> list[UUID]:
    """The ids of the conversations the list (or, with `q`, a search) shows `owner`, read from the database directly:
    for the migration tests, which check a database no server has opened."""

    async def read() -> list[UUID]:
        engine = create_db_config(replace(Settings.from_env(), database_url=database_url)).get_engine()
        try:
            page = await ConversationPages(ConversationReads(engine)).conversations(owner, q, limit=10, offset=0)
        finally:
            await engine.dispose()
        return [conversation.session_id for conversation in page.conversations]

    return asyncio.run(read())


async def new_conversation(client: httpx.AsyncClient, **params: str) -> dict[str, Any]:
    response = await client.post("/api/conversations/new", params=params)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def get_conversation(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/conversations/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def send_message(client: httpx.AsyncClient, session_id: str, content: str, **options: Any) -> dict[str, Any]:
    response = await client.post(f"/api/conversations/{session_id}/message", json={"content": content, **options})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@dataclass
class StreamResult:
    """What an EventSource client saw: the text deltas, the closing event, and the raw headers."""

    deltas: list[str] = field(default_factory=list)
    events: list[ServerSentEvent] = field(default_factory=list)
    headers: httpx.Headers | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def final(self) -> ServerSentEvent:
        return self.events[-1]

    @property
    def final_data(self) -> dict[str, Any]:
        return json.loads(self.final.data)  # type: ignore[no-any-return]


async def stream_reply(client: httpx.AsyncClient, session_id: str, prompt: str, **params: str) -> StreamResult:
    """Read a whole reply from the stream endpoint, as the frontend's EventSource does."""
    result = StreamResult()
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(client, "GET", url, params={"prompt": prompt, **params}) as source:
        assert source.response.status_code == 200, await source.response.aread()
        result.headers = source.response.headers
        async for event in source.aiter_sse():
            result.events.append(event)
            if event.event == "message":
                result.deltas.append(event.data)
    return result


async def next_frame(socket: ClientConnection) -> dict[str, Any]:
    """The next frame that is not a heartbeat."""
    while True:
        frame = json.loads(await asyncio.wait_for(socket.recv(), 60))
        if frame["type"] != "heartbeat":
            return frame  # type: ignore[no-any-return]


async def frames_until_done(socket: ClientConnection) -> list[dict[str, Any]]:
    """Frames up to and including `done` (or an `error`)."""
    frames = []
    while True:
        frame = await next_frame(socket)
        frames.append(frame)
        if frame["type"] in ("done", "error"):
            return frames


def socket_url(client: httpx.AsyncClient, session_id: str) -> str:
    return str(client.base_url).replace("http://", "ws://") + f"/api/conversations/{session_id}/ws"


def connect_socket(client: httpx.AsyncClient, session_id: str) -> connect:
    return connect(socket_url(client, session_id), open_timeout=30)


KEY = re.compile(r"^chipi_[A-Za-z0-9_-]{43}$")


def chipi(database_url: str, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI (`python -m app`, what `chipi` runs) against a test database."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, "CHIPI_LOG_LEVEL": "warning", "DATABASE_URL": database_url, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def create_key(database_url: str, owner: str, *extra: str) -> str:
    """`chipi keys create --owner OWNER`: the new key (from then on, the server asks every request for one)."""
    result = chipi(database_url, "keys", "create", "--owner", owner, *extra)
    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    assert KEY.match(key), result.stdout  # the key alone on stdout, so `KEY=$(chipi keys create ...)` works
    assert "shown only this once" in result.stderr
    return key
