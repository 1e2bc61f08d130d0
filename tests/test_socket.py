"""The chat WebSocket: JSON frames both ways, stop, resume, heartbeats, bad frames."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.helpers import connect_socket, frames_until_done, get_conversation, new_conversation, next_frame
from tests.server import TEST_MAX_NEW_TOKENS

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


async def test_a_message_streams_tokens_then_done(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": "What is the capital of France?"}))
        user = await next_frame(socket)
        frames = await frames_until_done(socket)
    assert user["type"] == "user_message" and user["message"]["content"] == "What is the capital of France?"
    tokens = [f for f in frames if f["type"] == "token"]
    assert len(tokens) > 1 and [t["seq"] for t in tokens] == sorted({t["seq"] for t in tokens})
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] in {"stop", "length"}
    text = "".join(t["text"] for t in tokens)
    assert "paris" in text.lower()
    assert done["message"]["content"] == text and done["message"]["status"] == "complete"
    assert done["usage"]["completion_tokens"] > 0
    stored = (await get_conversation(client, session_id))["messages"]
    assert [m["id"] for m in stored] == [user["message"]["id"], done["message"]["id"]]


async def test_a_malformed_frame_gets_an_error_and_the_socket_stays_usable(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        for bad in ["not json", json.dumps({"type": "dance"}), json.dumps({"type": "message"}), "[]"]:
            await socket.send(bad)
            error = await next_frame(socket)
            assert error["type"] == "error" and error["code"] == "invalid_frame" and error["detail"]
        await socket.send(json.dumps({"type": "message", "content": "  "}))
        empty = await next_frame(socket)
        assert empty["type"] == "error" and empty["code"] == "invalid_input"
        await socket.send(json.dumps({"type": "message", "content": "Say hi.", "max_tokens": 4}))
        assert (await next_frame(socket))["type"] == "user_message"
        assert (await frames_until_done(socket))[-1]["type"] == "done"


async def test_the_stop_frame_stops_the_model(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": LONG_PROMPT}))
        await next_frame(socket)  # user_message
        await next_frame(socket)  # first token
        await socket.send(json.dumps({"type": "stop"}))
        frames = await frames_until_done(socket)
    done = frames[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["message"]["status"] == "cancelled"
    assert done["usage"]["completion_tokens"] < TEST_MAX_NEW_TOKENS
    assert (await get_conversation(client, session_id))["messages"][-1]["status"] == "cancelled"


async def test_resume_after_reconnecting_gets_every_missed_token_once(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": LONG_PROMPT}))
        await next_frame(socket)
        before = [await next_frame(socket) for _ in range(3)]
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "resume", "last_seq": before[-1]["seq"]}))
        after = await frames_until_done(socket)
    tokens = before + [f for f in after if f["type"] == "token"]
    seqs = [t["seq"] for t in tokens]
    # each once, in order (text that came together is one frame, numbered as its last piece); none missed: the
    # text checked below
    assert seqs == sorted(set(seqs))
    assert after[-1]["type"] == "done" and after[-1]["finish_reason"] in {"stop", "length"}
    assert after[-1]["message"]["content"] == "".join(t["text"] for t in tokens)


async def test_heartbeats_keep_an_idle_socket_alive(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        frame = json.loads(await asyncio.wait_for(socket.recv(), timeout=5))  # the test server beats every second
    assert frame == {"type": "heartbeat"}


async def test_regenerate_over_the_socket(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "message", "content": "Name a fruit.", "max_tokens": 6}))
        first_user = await next_frame(socket)
        first_done = (await frames_until_done(socket))[-1]
        await socket.send(json.dumps({"type": "regenerate"}))
        again_user = await next_frame(socket)
        again_done = (await frames_until_done(socket))[-1]
    assert again_user["message"]["id"] == first_user["message"]["id"]
    assert again_done["message"]["id"] != first_done["message"]["id"]
    assert again_done["message"]["parent_id"] == first_user["message"]["id"]


async def test_a_socket_for_an_unknown_conversation_gets_an_error(client: httpx.AsyncClient) -> None:
    async with connect_socket(client, "00000000-0000-0000-0000-000000000000") as socket:
        frame = json.loads(await socket.recv())
        assert frame["type"] == "error" and frame["code"] == "not_found"
