"""Streaming one reply through the API, as the benchmarks' clients do.

The reply is read over a plain asyncio connection with a minimal chunked-transfer and SSE parser, as a browser's
EventSource reads it in native code: httpx and httpx-sse spent about 0.6 ms of Python per token, taken from the
same two cores the server decodes on, which the SSE figure would have counted as API overhead.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx


@dataclass(frozen=True)
class StreamedReply:
    tokens: int  # completion tokens, as the done event counts them
    seconds: float
    first_token_seconds: float


@dataclass(frozen=True)
class Event:
    name: str
    data: str


async def stream_reply(
    client: httpx.AsyncClient, session_id: str, prompt: str, *, stop_after_first: bool = False
) -> StreamedReply:
    """Send `prompt` in the conversation and read the SSE reply to its done event.

    With `stop_after_first`, the reply is stopped once its first token arrives (when only the time to it counts)."""
    started = time.perf_counter()
    first: float | None = None
    path = f"/api/conversations/{session_id}/stream?{urlencode({'prompt': prompt})}"
    async for event in _events(client, path):
        if event.name == "message" and first is None:
            first = time.perf_counter() - started
            if stop_after_first:
                await client.post(f"/api/conversations/{session_id}/stop")
        elif event.name == "done":
            tokens = int(json.loads(event.data)["usage"]["completion_tokens"])
            return StreamedReply(tokens, time.perf_counter() - started, first or 0.0)
        elif event.name == "error":
            raise RuntimeError(f"the reply failed: {event.data}")
    raise RuntimeError("the stream ended without a done event")


async def _events(client: httpx.AsyncClient, path: str) -> AsyncIterator[Event]:
    """The server-sent events of GET `path` (with the client's Authorization, if any), as they arrive."""
    url = client.base_url
    reader, writer = await asyncio.open_connection(url.host, url.port)
    headers = f"Host: {url.netloc.decode()}\r\nAccept: text/event-stream\r\n"
    if "authorization" in client.headers:
        headers += f"Authorization: {client.headers['authorization']}\r\n"
    writer.write(f"GET {path} HTTP/1.1\r\n{headers}\r\n".encode())
    try:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        if not head.startswith("http/1.1 200") or "transfer-encoding: chunked" not in head:
            raise RuntimeError(f"not a chunked event stream: {head.splitlines()[0]}")
        pending = b""  # bytes, so that a character split between chunks is decoded whole
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            *blocks, pending = pending.replace(b"\r\n", b"\n").split(b"\n\n")
            for block in blocks:
                if event := _parse(block.decode()):
                    yield event
    finally:
        writer.close()


def _parse(block: str) -> Event | None:
    """One event block's name (`message` unless named) and data lines, joined; None for a comment or a ping."""
    name, data = "message", []
    for line in block.split("\n"):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
    return Event(name, "\n".join(data)) if data else None
