"""Nothing a user sent is lost when the server dies mid-reply."""

from __future__ import annotations

import asyncio

import httpx
from httpx_sse import aconnect_sse

from tests.helpers import get_conversation, new_conversation
from tests.server import ChipiServer


async def test_a_server_killed_mid_stream_keeps_the_user_message(database_url: str) -> None:
    prompt = "Write a long story about a lighthouse keeper."
    with ChipiServer(database_url, CHIPI_MAX_NEW_TOKENS="400", CHIPI_STREAM_FLUSH_SECONDS="0.2") as doomed:
        async with httpx.AsyncClient(base_url=doomed.url, timeout=60) as client:
            session_id = (await new_conversation(client))["session_id"]
            received = ""
            async with aconnect_sse(
                client, "GET", f"/api/conversations/{session_id}/stream", params={"prompt": prompt}
            ) as source:
                async for event in source.aiter_sse():
                    received += event.data
                    if len(received) > 80:
                        await asyncio.sleep(0.5)  # let a periodic write land
                        doomed.kill()
                        break
    with ChipiServer(database_url, CHIPI_STALE_STREAM_SECONDS="1") as restarted:
        async with httpx.AsyncClient(base_url=restarted.url, timeout=60) as client:
            for _ in range(100):  # the sweep finds the reply nobody has written for a second
                messages = (await get_conversation(client, session_id))["messages"]
                if messages[-1]["status"] != "streaming":
                    break
                await asyncio.sleep(0.1)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == prompt
    reply = messages[1]
    assert reply["status"] == "error" and reply["finish_reason"] == "interrupted"  # never `streaming` forever
    assert reply["content"][:80] == received[:80]  # the partial text written while streaming survived
