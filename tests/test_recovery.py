"""Nothing a user sent is lost when the server dies or is stopped mid-reply."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
from httpx_sse import aconnect_sse

from tests.helpers import connect_socket, frames_until_done, get_conversation, new_conversation, next_frame
from tests.server import ChipiServer


def stream_url(session_id: str) -> str:
    return f"/api/conversations/{session_id}/stream"


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


async def test_sigterm_stores_every_running_reply_before_the_process_exits(database_url: str) -> None:
    """A graceful stop: replies get CHIPI_SHUTDOWN_GRACE_SECONDS to finish, then are stopped; each is stored (here:
    cancelled with exactly the text its client saw), SSE and WebSocket clients get the last event, and the process
    exits in bounded time. A reply whose client had already gone is stored too."""
    prompt = "Write a long story about a lighthouse keeper."
    settings = {
        # replies that outlast the grace period on any CPU (400 tokens took this AMD EPYC under 3 s), cut off by it
        "CHIPI_CONTEXT_WINDOW": "2048",
        "CHIPI_MAX_NEW_TOKENS": "2000",
        "CHIPI_SHUTDOWN_GRACE_SECONDS": "3",
        "CHIPI_DISCONNECT_GRACE_SECONDS": "600",  # the abandoned reply is still running when the signal comes
    }
    with ChipiServer(database_url, **settings) as server:
        assert server.process is not None
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as client,
            httpx.AsyncClient(base_url=server.url, timeout=60) as late,
        ):
            streamed, socketed, abandoned, refused = [(await new_conversation(client))["session_id"] for _ in range(4)]
            async with aconnect_sse(client, "GET", stream_url(abandoned), params={"prompt": prompt}) as source:
                abandoned_text = (await anext(source.aiter_sse())).data  # then the client goes
            async with (
                aconnect_sse(client, "GET", stream_url(streamed), params={"prompt": prompt}) as source,
                connect_socket(client, socketed) as socket,
            ):
                events = source.aiter_sse()
                sse_text = (await anext(events)).data
                await socket.send(json.dumps({"type": "message", "content": prompt}))
                assert (await next_frame(socket))["type"] == "user_message"
                first_token = await next_frame(socket)
                assert first_token["type"] == "token"

                ping = await late.get("/api/ping")  # leaves a keep-alive connection open when the signal comes
                assert ping.status_code == 200
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                await asyncio.sleep(1)  # within the grace period: no new replies
                too_late = await late.get(stream_url(refused), params={"prompt": prompt})
                sse_events = [event async for event in events]
                socket_frames = await frames_until_done(socket)
            server.process.wait(timeout=60)
            exit_seconds = time.monotonic() - signalled
    assert server.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it is done
    assert exit_seconds < 30  # grace (3 s) + a token + uvicorn's own shutdown, with room for a slow machine
    assert too_late.status_code == 503 and too_late.json()["code"] == "shutting_down"
    assert int(too_late.headers["Retry-After"]) >= 1
    assert sse_events[-1].event == "done" and sse_events[-1].json()["finish_reason"] == "cancelled"
    sse_text += "".join(event.data for event in sse_events if event.event == "message")
    assert socket_frames[-1]["type"] == "done" and socket_frames[-1]["finish_reason"] == "cancelled"
    socket_text = first_token["text"] + "".join(frame["text"] for frame in socket_frames if frame["type"] == "token")

    with ChipiServer(database_url) as restarted:
        async with httpx.AsyncClient(base_url=restarted.url, timeout=60) as client:
            conversations = {sid: (await get_conversation(client, sid))["messages"] for sid in (streamed, socketed)}
            left = (await get_conversation(client, abandoned))["messages"]
            assert (await get_conversation(client, refused))["messages"] == []  # the refused request stored nothing
    for session_id, text in [(streamed, sse_text), (socketed, socket_text)]:
        messages = conversations[session_id]
        assert [(m["role"], m["status"]) for m in messages] == [("user", "complete"), ("assistant", "cancelled")]
        assert messages[0]["content"] == prompt
        assert messages[1]["content"] == text and text  # exactly what the client saw, stored before the exit
    assert [(m["role"], m["status"]) for m in left] == [("user", "complete"), ("assistant", "cancelled")]
    assert left[1]["content"].startswith(abandoned_text)
