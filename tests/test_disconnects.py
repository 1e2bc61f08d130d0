"""Clients that go away at every phase of a request, read slowly, or cut an upload short.

Whatever the client does: the server stays healthy, a message whose request arrived whole is stored once, nothing
from a request cut short is stored, no reply is left `streaming` (a reply nobody follows is cancelled after the
grace period), and the log shows no server error (a request whose client hung up mid-body is logged as 499).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest

from tests.audio_samples import silence_wav
from tests.helpers import connect_socket, get_conversation, new_conversation, next_frame, stream_reply
from tests.raw_client import (
    StalledReader,
    http_request,
    multipart_upload,
    open_websocket,
    parse_sse_response,
    send_and_hang_up,
    websocket_text_frame_header,
)
from tests.server import LONG_REPLY_TOKENS, TEST_GRACE_SECONDS, ChipiServer

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."
SETTLE_SECONDS = 120  # a whole reply takes seconds, but minutes on a loaded 2-core machine
SERVER_ERROR = re.compile(r'" 5\d\d \d')  # an access log line (text format) with a 5xx status


class LoggedServer:
    """A server whose log goes to a file, so each test can read what its requests left there."""

    def __init__(self, server: ChipiServer, log: Path) -> None:
        self.server = server
        self.log = log
        self._mark = 0

    def mark(self) -> None:
        self._mark = self.log.stat().st_size

    def new_lines(self) -> list[str]:
        return self.log.read_bytes()[self._mark :].decode(errors="replace").splitlines()

    async def wait_for_line(self, pattern: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for line in self.new_lines():
                if re.search(pattern, line):
                    return line
            await asyncio.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}; new lines: {self.new_lines()[-20:]}")

    def assert_no_server_error(self) -> None:
        lines = self.new_lines()
        assert not [line for line in lines if SERVER_ERROR.search(line)], lines
        assert not [line for line in lines if "Traceback" in line or "unhandled error" in line], lines


@pytest.fixture(scope="module")
def logged(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    log = tmp_path_factory.mktemp("disconnects") / "server.log"
    with (
        log.open("wb") as sink,
        # long replies, as tests/conftest.py's long_reply_server: a reply nobody reads must outlast the grace period
        # to be cancelled at its end (the test server's 160 tokens took 0.8 s on an AMD EPYC with AVX-512)
        ChipiServer(
            database_url,
            stderr=sink,
            CHIPI_LOG_LEVEL="info",
            CHIPI_LOG_FORMAT="text",
            CHIPI_MAX_NEW_TOKENS=str(LONG_REPLY_TOKENS),
        ) as server,
    ):
        yield LoggedServer(server, log)


@pytest.fixture
async def http(logged: LoggedServer) -> Any:
    logged.mark()
    async with httpx.AsyncClient(base_url=logged.server.url, timeout=60) as client:
        yield client
        assert (await client.get("/api/health")).status_code == 200  # still healthy
    logged.assert_no_server_error()


async def settled_messages(client: httpx.AsyncClient, session_id: str) -> list[dict[str, Any]]:
    """The conversation's messages once it has some and no reply in it is `streaming` any more (cancelled after
    the grace period, or finished), or as they are after SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        messages: list[dict[str, Any]] = (await get_conversation(client, session_id))["messages"]
        if (messages and all(m["status"] != "streaming" for m in messages)) or time.monotonic() > deadline:
            return messages
        await asyncio.sleep(0.1)


async def test_a_body_cut_short_stores_nothing(http: httpx.AsyncClient, logged: LoggedServer) -> None:
    session_id = (await new_conversation(http))["session_id"]
    body = json.dumps({"content": "This message never arrives whole"}).encode()
    path = f"/api/conversations/{session_id}/message"
    request = http_request("POST", path, body[:20], content_length=len(body), Content_Type="application/json")
    await send_and_hang_up(logged.server.port, request, linger=0.3, reset=True)
    await logged.wait_for_line(rf'"POST {path}" 499 ')  # logged as the client's doing, not a server error
    assert (await get_conversation(http, session_id))["messages"] == []


async def test_a_client_gone_before_the_first_token_keeps_its_message(
    http: httpx.AsyncClient, logged: LoggedServer
) -> None:
    """The request arrived whole, so its message is stored; the reply nobody waits for ends within the grace."""
    port = logged.server.port
    sse, post, socket_id = [(await new_conversation(http))["session_id"] for _ in range(3)]
    stream_path = f"/api/conversations/{sse}/stream?prompt={quote_plus(LONG_PROMPT)}"
    await send_and_hang_up(port, http_request("GET", stream_path))
    body = json.dumps({"content": "Say hello."}).encode()
    await send_and_hang_up(
        port, http_request("POST", f"/api/conversations/{post}/message", body, Content_Type="application/json")
    )
    async with connect_socket(http, socket_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": LONG_PROMPT}))
        socket.transport.close()  # gone without a close frame, before any reply frame
    for session_id, prompt in [(sse, LONG_PROMPT), (post, "Say hello."), (socket_id, LONG_PROMPT)]:
        messages = await settled_messages(http, session_id)
        assert [(m["role"], m["content"]) for m in messages[:1]] == [("user", prompt)], session_id
        assert [m["role"] for m in messages] == ["user", "assistant"]  # stored once
        assert messages[1]["status"] in {"cancelled", "complete"}
    # A POST /message keeps going without its client, so its reply is whole; the others were stopped.
    assert (await get_conversation(http, post))["messages"][1]["status"] == "complete"
    assert (await get_conversation(http, sse))["messages"][1]["status"] == "cancelled"


async def test_a_socket_dropped_mid_stream_is_cancelled_after_the_grace_period(
    long_reply_client: httpx.AsyncClient,
) -> None:
    http = long_reply_client
    session_id = (await new_conversation(http))["session_id"]
    received = ""
    async with connect_socket(http, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": LONG_PROMPT}))
        assert (await next_frame(socket))["type"] == "user_message"
        while len(received) < 10:
            frame = await next_frame(socket)
            assert frame["type"] == "token"
            received += frame["text"]
        socket.transport.abort()
    await asyncio.sleep(TEST_GRACE_SECONDS / 2)
    assert (await get_conversation(http, session_id))["messages"][-1]["status"] == "streaming"  # waits for a resume
    messages = await settled_messages(http, session_id)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[1]["status"] == "cancelled" and messages[1]["content"].startswith(received)


async def test_a_stalled_reader_holds_up_no_one_and_still_gets_every_token(
    http: httpx.AsyncClient, logged: LoggedServer
) -> None:
    """The reply is generated and stored at the model's pace whatever the reader does; the reader's share waits in
    the reply's event list (at most one reply long) and in the kernel's socket buffers, which uvicorn's flow control
    does not let grow past its high-water mark."""
    slow_id, other_id = [(await new_conversation(http))["session_id"] for _ in range(2)]
    reader = StalledReader(logged.server.port, f"/api/conversations/{slow_id}/stream?prompt={quote_plus(LONG_PROMPT)}")
    other = await stream_reply(http, other_id, "Name three colors.")  # while the stalled one reads nothing
    assert other.final.event == "done"
    stored = await settled_messages(http, slow_id)
    assert stored[1]["status"] == "complete"  # generated and stored while its reader still read nothing
    status, events = parse_sse_response(await asyncio.wait_for(reader.read_slowly(), SETTLE_SECONDS))
    assert status == 200 and events[-1].event == "done"
    assert "".join(e.data for e in events if e.event == "message") == stored[1]["content"]
    seqs = [int(e.id.rsplit(":", 1)[1]) for e in events]
    assert seqs == sorted(set(seqs))  # none repeated, in order (none lost: the text, above)


async def test_cut_uploads_store_nothing(http: httpx.AsyncClient, logged: LoggedServer) -> None:
    session_id = (await new_conversation(http))["session_id"]
    recording = silence_wav(5.0)
    for path in [f"/api/conversations/{session_id}/voice", "/api/audio/transcriptions"]:
        body, content_type = multipart_upload("file", "recording.wav", recording)
        cut = http_request("POST", path, body[: len(body) // 2], content_length=len(body), Content_Type=content_type)
        await send_and_hang_up(logged.server.port, cut, linger=0.3, reset=True)
        await logged.wait_for_line(rf'"POST {re.escape(path)}" 499 ')
    # A recording sent over the chat socket, cut inside its frame.
    _, writer = await open_websocket(logged.server.port, f"/api/conversations/{session_id}/ws")
    frame = json.dumps({"type": "audio", "data": "UklGR" + "A" * 200_000}).encode()
    writer.write(websocket_text_frame_header(len(frame)) + frame[: len(frame) // 2])
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()
    await logged.wait_for_line(rf'"WEBSOCKET /api/conversations/{session_id}/ws" ')
    assert (await get_conversation(http, session_id))["messages"] == []
