"""A Chipi whose generation runs on a remote OpenAI-compatible engine: here, a second Chipi serving /v1.

Both instances share one database, as stateless instances behind a load balancer would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.helpers import get_conversation, new_conversation, send_message, stream_reply
from tests.server import TEST_MAX_NEW_TOKENS, ChipiServer

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


@pytest.fixture(scope="session")
def front(server: ChipiServer, database_url: str) -> Iterator[ChipiServer]:
    """A Chipi that loads no model and sends generation to `server`'s /v1."""
    with ChipiServer(database_url, CHIPI_REMOTE_BASE_URL=f"{server.url}/v1") as running:
        yield running


@pytest.fixture
async def front_client(front: ChipiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=front.url, timeout=60) as http:
        yield http


async def test_the_front_generates_through_the_engine(front_client: httpx.AsyncClient) -> None:
    health = (await front_client.get("/api/health")).json()
    assert health["model"] == "SmolLM2-135M-Instruct" and health["device"].startswith("remote http://127.0.0.1:")
    session_id = (await new_conversation(front_client))["session_id"]
    result = await stream_reply(front_client, session_id, "What is the capital of France?")
    assert len(result.deltas) > 1 and "paris" in result.text.lower()
    done = result.final_data
    assert done["finish_reason"] == "stop"
    assert done["usage"]["prompt_tokens"] > 0 and done["usage"]["completion_tokens"] > 0
    messages = (await get_conversation(front_client, session_id))["messages"]
    assert messages[-1]["content"] == result.text and messages[-1]["status"] == "complete"
    assert (await get_conversation(front_client, session_id))["conversation"][
        "title"
    ] == "What is the capital of France?"


async def test_history_stays_in_chipi(front_client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(front_client))["session_id"]
    await send_message(front_client, session_id, "The secret password is tangerine.")
    second = await send_message(front_client, session_id, "What is the secret password?")
    assert "tangerine" in second["response"].lower()
    assert second["assistant_message"]["prompt_tokens"] > 40  # the engine saw both turns


async def test_limits_reach_the_engine(front_client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(front_client))["session_id"]
    exchange = await send_message(front_client, session_id, "Count from one to fifty.", max_tokens=5)
    assert exchange["assistant_message"]["completion_tokens"] == 5
    assert exchange["assistant_message"]["finish_reason"] == "length"


async def test_stop_on_the_front_stops_the_engine(front_client: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(front_client))["session_id"]
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(front_client, "GET", url, params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        await anext(events)
        assert (await client.get("/api/health")).json()["active_generations"] == 1  # the engine is generating
        stopped = (await front_client.post(f"/api/conversations/{session_id}/stop")).json()
        rest = [event async for event in events]
    assert stopped["stopped"] is True and stopped["assistant_message"]["status"] == "cancelled"
    assert rest[-1].event == "done" and rest[-1].json()["finish_reason"] == "cancelled"
    for _ in range(50):  # the engine saw the stream close and aborted its generation
        if (await client.get("/api/health")).json()["active_generations"] == 0:
            break
        await asyncio.sleep(0.1)
    assert (await client.get("/api/health")).json()["active_generations"] == 0
    reply = (await get_conversation(front_client, session_id))["messages"][-1]
    assert reply["completion_tokens"] < TEST_MAX_NEW_TOKENS


async def test_instances_share_the_database(front_client: httpx.AsyncClient, client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(front_client, title="made on the front"))["session_id"]
    seen_by_engine = await get_conversation(client, session_id)
    assert seen_by_engine["conversation"]["title"] == "made on the front"
