"""Live replies: stop is a stop, a dropped connection is not, many watchers, resume, the generation cap."""

from __future__ import annotations

import asyncio

import httpx
from httpx_sse import aconnect_sse

from tests.helpers import get_conversation, new_conversation
from tests.server import LONG_REPLY_TOKENS, TEST_GRACE_SECONDS, TEST_MAX_NEW_TOKENS, ChipiServer

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


def stream_url(session_id: str) -> str:
    return f"/api/conversations/{session_id}/stream"


async def test_stop_ends_the_reply_at_once_and_keeps_it_as_cancelled(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with aconnect_sse(client, "GET", stream_url(session_id), params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        first = await anext(events)
        stopped = await client.post(f"/api/conversations/{session_id}/stop")
        rest = [event async for event in events]
    assert stopped.status_code == 200
    body = stopped.json()
    assert body["stopped"] is True
    assert body["assistant_message"]["status"] == "cancelled"
    assert rest[-1].event == "done"
    done = rest[-1].json()
    assert done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < TEST_MAX_NEW_TOKENS
    streamed = first.data + "".join(e.data for e in rest if e.event == "message")
    reply = (await get_conversation(client, session_id))["messages"][-1]
    assert reply["status"] == "cancelled" and reply["content"] == streamed
    assert (await client.get("/api/health")).json()["active_generations"] == 0


async def test_stop_with_nothing_running(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    response = await client.post(f"/api/conversations/{session_id}/stop")
    assert response.status_code == 200
    assert response.json()["stopped"] is False


async def test_a_dropped_connection_resumes_with_last_event_id_exactly_once(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    seen: list[str] = []
    last_id = ""
    async with aconnect_sse(client, "GET", stream_url(session_id), params={"prompt": LONG_PROMPT}) as source:
        async for event in source.aiter_sse():
            seen.append(event.data)
            last_id = event.id
            if len(seen) == 3:
                break  # the connection drops
    # EventSource reconnects to the same URL with Last-Event-ID
    async with aconnect_sse(
        client, "GET", stream_url(session_id), params={"prompt": LONG_PROMPT}, headers={"Last-Event-ID": last_id}
    ) as source:
        resumed = [event async for event in source.aiter_sse()]
    assert resumed[-1].event == "done"
    assert resumed[-1].json()["finish_reason"] in {"stop", "length"}  # not a stop: it went on
    # Only later events, each once (text that came together arrives as one event, numbered as its last piece);
    # nothing missed: the text checked below.
    seqs = [int(e.id.rsplit(":", 1)[1]) for e in resumed]
    assert seqs[0] > int(last_id.rsplit(":", 1)[1]) and seqs == sorted(set(seqs))
    text = "".join(seen) + "".join(e.data for e in resumed if e.event == "message")
    messages = (await get_conversation(client, session_id))["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the reconnect did not send the prompt again
    assert messages[-1]["content"] == text and messages[-1]["status"] == "complete"


async def test_resuming_a_reply_that_is_long_gone_is_404(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    headers = {"Last-Event-ID": "00000000-0000-0000-0000-000000000000:3"}
    response = await client.get(stream_url(session_id), params={"prompt": "hi"}, headers=headers)
    assert response.status_code == 404 and response.json()["code"] == "not_found"


async def test_nobody_back_within_the_grace_period_stops_the_model(long_reply_client: httpx.AsyncClient) -> None:
    client = long_reply_client
    session_id = (await new_conversation(client))["session_id"]
    received = ""
    async with aconnect_sse(client, "GET", stream_url(session_id), params={"prompt": LONG_PROMPT}) as source:
        async for event in source.aiter_sse():
            received += event.data
            if len(received) > 10:
                break
    await asyncio.sleep(TEST_GRACE_SECONDS / 2)
    assert (await get_conversation(client, session_id))["messages"][-1]["status"] == "streaming"  # still going
    reply = None
    for _ in range(100):
        reply = (await get_conversation(client, session_id))["messages"][-1]
        if reply["status"] != "streaming":
            break
        await asyncio.sleep(0.1)
    assert reply is not None and reply["status"] == "cancelled"
    assert reply["content"].startswith(received)
    assert reply["completion_tokens"] < LONG_REPLY_TOKENS  # stopped instead of finishing for nobody
    assert (await client.get("/api/health")).json()["active_generations"] == 0


async def test_many_clients_watch_the_same_reply(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]

    async def watch() -> list[str]:
        async with aconnect_sse(client, "GET", stream_url(session_id)) as source:  # no prompt: watch
            assert source.response.status_code == 200
            return [event.data async for event in source.aiter_sse() if event.event == "message"]

    async with aconnect_sse(client, "GET", stream_url(session_id), params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        first = await anext(events)
        watchers = [asyncio.create_task(watch()) for _ in range(2)]
        own = [first.data] + [e.data async for e in events if e.event == "message"]
    watched = await asyncio.gather(*watchers)
    assert all("".join(w) == "".join(own) for w in watched)  # each watcher saw the reply from its start
    assert (await get_conversation(client, session_id))["messages"][-1]["content"] == "".join(own)


async def test_concurrent_streams_in_different_conversations_all_finish(client: httpx.AsyncClient) -> None:
    ids = [(await new_conversation(client))["session_id"] for _ in range(3)]

    async def one(session_id: str) -> dict:
        async with aconnect_sse(client, "GET", stream_url(session_id), params={"prompt": "Name three colors."}) as s:
            events = [event async for event in s.aiter_sse()]
        return events[-1].json()

    results = await asyncio.gather(*(one(session_id) for session_id in ids))
    assert all(result["finish_reason"] in {"stop", "length"} for result in results)
    for session_id in ids:
        assert (await get_conversation(client, session_id))["messages"][-1]["status"] == "complete"


async def test_beyond_the_cap_requests_wait_then_get_429_or_503_with_retry_after(database_url: str) -> None:
    limits = {
        "CHIPI_MAX_CONCURRENT_GENERATIONS": "1",
        "CHIPI_MAX_QUEUED_GENERATIONS": "1",
        "CHIPI_QUEUE_TIMEOUT_SECONDS": "1",
        "CHIPI_MAX_NEW_TOKENS": "400",
        # Greedy, the story runs all 400 tokens and holds the only slot throughout; a sampled one may end in a second.
        "CHIPI_TEMPERATURE": "0",
    }
    with ChipiServer(database_url, **limits) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            first, queued, rejected = [(await new_conversation(client))["session_id"] for _ in range(3)]
            async with aconnect_sse(client, "GET", stream_url(first), params={"prompt": LONG_PROMPT}) as source:
                # Keep the iterator: a dropped one is closed when collected, and so is the stream under it.
                events = source.aiter_sse()
                await anext(events)  # the only slot is taken
                waiting = asyncio.create_task(client.get(stream_url(queued), params={"prompt": "Hello"}))
                for _ in range(200):  # until the second request is waiting in the queue
                    if (await client.get("/api/health")).json()["queued_generations"] == 1:
                        break
                    await asyncio.sleep(0.05)
                full = await client.get(stream_url(rejected), params={"prompt": "Hello"})
                timed_out = await waiting
                stopped = await client.post(f"/api/conversations/{first}/stop")
            assert stopped.json()["stopped"], "the first reply ended before the waits did: the test proves nothing"
            assert full.status_code == 429 and int(full.headers["Retry-After"]) >= 1
            assert timed_out.status_code == 503 and int(timed_out.headers["Retry-After"]) >= 1
            assert full.json()["code"] == timed_out.json()["code"] == "busy"
            for session_id in (queued, rejected):  # a refused request stores nothing
                assert (await get_conversation(client, session_id))["messages"] == []
            # once the slot is free, a new request goes through
            response = await client.post(
                f"/api/conversations/{queued}/message", json={"content": "Hi", "max_tokens": 4}
            )
            assert response.status_code == 200
