"""Streaming one reply through the API, as the benchmarks' clients do."""

from __future__ import annotations

import time
from dataclasses import dataclass

import httpx
from httpx_sse import aconnect_sse


@dataclass(frozen=True)
class StreamedReply:
    tokens: int  # completion tokens, as the done event counts them
    seconds: float
    first_token_seconds: float


async def stream_reply(
    client: httpx.AsyncClient, session_id: str, prompt: str, *, stop_after_first: bool = False
) -> StreamedReply:
    """Send `prompt` in the conversation and read the SSE reply to its done event.

    With `stop_after_first`, the reply is stopped once its first token arrives (when only the time to it counts)."""
    started = time.perf_counter()
    first: float | None = None
    async with aconnect_sse(client, "GET", f"/api/conversations/{session_id}/stream", params={"prompt": prompt}) as s:
        async for event in s.aiter_sse():
            if event.event == "message" and first is None:
                first = time.perf_counter() - started
                if stop_after_first:
                    await client.post(f"/api/conversations/{session_id}/stop")
            elif event.event == "done":
                tokens = int(event.json()["usage"]["completion_tokens"])
                return StreamedReply(tokens, time.perf_counter() - started, first or 0.0)
    raise RuntimeError("the stream ended without a done event")
