"""The SSE stream, as the frontend's EventSource reads it."""

from __future__ import annotations

import asyncio
import json

import httpx
from httpx_sse import aconnect_sse

from app.domain.auth import LOCAL_OWNER
from app.domain.reasoning import Piece
from app.domain.schemas import Usage
from app.services.chat import ChatEvent, Generation, ReplyFinished
from tests.helpers import get_conversation, new_conversation, stream_reply

LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


async def test_stream_sends_text_deltas_then_done_and_closes(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    result = await stream_reply(client, session_id, "What is the capital of France?")
    assert result.headers is not None
    assert result.headers["content-type"].startswith("text/event-stream")
    assert result.headers["cache-control"] == "no-cache"
    assert result.headers["x-accel-buffering"] == "no"
    assert len(result.deltas) > 1  # token by token, not one blob
    assert "paris" in result.text.lower()
    assert all(event.id for event in result.events)
    assert len({event.id for event in result.events}) == len(result.events)
    assert [e.event for e in result.events].count("done") == 1 and result.final.event == "done"
    assert all(e.data != "[DONE]" for e in result.events)
    done = result.final_data
    assert done["finish_reason"] in {"stop", "length"}
    assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0
    messages = (await get_conversation(client, session_id))["messages"]
    assert [m["id"] for m in messages] == [done["user_message_id"], done["assistant_message_id"]]
    assert messages[0]["content"] == "What is the capital of France?"
    assert messages[1]["content"] == result.text  # exactly what the client concatenated
    assert messages[1]["status"] == "complete"


async def test_raw_stream_format_keeps_leading_spaces_and_splits_newlines(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    url = f"/api/conversations/{session_id}/stream"
    # A story: paragraphs, and deltas starting with a space however many tokens each event joins.
    async with client.stream("GET", url, params={"prompt": LONG_PROMPT}) as response:
        raw = (await response.aread()).decode()
    normalised = raw.replace("\r\n", "\n").replace("\r", "\n")  # the SSE spec allows all three line ends
    blocks = [block.split("\n") for block in normalised.split("\n\n") if block.strip()]
    text = ""
    for lines in blocks:
        assert lines[0].startswith("id: ")
        if any(line.startswith("event:") for line in lines):
            continue
        data_lines = [line for line in lines if line.startswith("data:")]
        assert all(line.startswith("data: ") for line in data_lines)  # one separator space, then the text
        text += "\n".join(line[len("data: ") :] for line in data_lines)
    assert "\n" in text  # a multi-line reply came through as multiple data lines
    stored = (await get_conversation(client, session_id))["messages"][-1]["content"]
    assert text == stored
    assert any(line.startswith("data:  ") for lines in blocks for line in lines)  # a delta with a leading space


async def test_the_prompt_is_decoded_as_a_form(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    url = f"/api/conversations/{session_id}/stream?prompt=What+is+2%2B2%3F&thinking=false"
    async with aconnect_sse(client, "GET", url) as source:
        [event async for event in source.aiter_sse()]
    assert (await get_conversation(client, session_id))["messages"][0]["content"] == "What is 2+2?"


async def test_user_message_is_stored_before_the_reply_streams(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(client, "GET", url, params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        await anext(events)
        during = (await get_conversation(client, session_id))["messages"]
        assert [m["role"] for m in during] == ["user", "assistant"]
        assert during[0]["content"] == LONG_PROMPT
        assert during[1]["status"] == "streaming"
        rest = [event async for event in events]
    assert rest[-1].event == "done"
    after = (await get_conversation(client, session_id))["messages"]
    assert after[1]["status"] == "complete"


async def test_other_requests_answer_while_a_reply_streams(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(client, "GET", url, params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        await anext(events)
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=5) as other:
            ping, listing, conversation = await asyncio.gather(
                other.get("/api/ping"), other.get("/api/conversations"), other.get(f"/api/conversations/{session_id}")
            )
        assert ping.status_code == listing.status_code == conversation.status_code == 200
        later = [event async for event in events]
    # the stream was still going when the other requests were answered
    assert sum(1 for e in later if e.event == "message") >= 5
    assert later[-1].event == "done"


async def test_a_second_stream_in_the_same_conversation_is_a_conflict(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(client, "GET", url, params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        await anext(events)
        second = await client.get(url, params={"prompt": "Interrupting!"})
        assert second.status_code == 409
        assert second.json()["code"] == "conflict"
        [event async for event in events]
    messages = (await get_conversation(client, session_id))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == [LONG_PROMPT]


async def test_done_event_json_matches_the_stored_reply(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    result = await stream_reply(client, session_id, "Name a color.")
    done = json.loads(result.final.data)
    reply = (await get_conversation(client, session_id))["messages"][-1]
    assert reply["id"] == done["assistant_message_id"]
    assert reply["completion_tokens"] == done["usage"]["completion_tokens"]
    assert reply["prompt_tokens"] == done["usage"]["prompt_tokens"]
    assert reply["finish_reason"] == done["finish_reason"]


async def test_text_that_comes_within_the_event_interval_goes_out_as_one_event() -> None:
    """At hundreds of tokens/s, a reply's followers (SSE, WebSocket, /v1) get the text that came since their last
    event joined into one, numbered as its last piece; the first piece goes out at once, and the think tags stay
    events of their own."""
    generation = Generation(LOCAL_OWNER, None, None, None, 30.0, event_interval_seconds=0.05)
    received: list[tuple[int, ChatEvent]] = []

    async def follow() -> None:
        async for seq, event in generation.follow():
            received.append((seq, event))

    follower = asyncio.create_task(follow())
    generation.publish(Piece("content", "Once"))
    await asyncio.sleep(0.01)
    assert received == [(1, Piece("content", "Once"))]  # not held back
    for piece in [" upon", " a", " time"]:  # a piece every 2 ms, within the interval
        generation.publish(Piece("content", piece))
        await asyncio.sleep(0.002)
    generation.publish(Piece("think_start", "<think>"))
    for piece in ["Hm", "m."]:
        generation.publish(Piece("reasoning", piece))
    finished = ReplyFinished(Usage(prompt_tokens=5, completion_tokens=7), "stop")
    generation.publish(finished)
    await asyncio.wait_for(follower, 1)
    assert received == [
        (1, Piece("content", "Once")),
        (4, Piece("content", " upon a time")),
        (5, Piece("think_start", "<think>")),
        (7, Piece("reasoning", "Hmm.")),
        (8, finished),
    ]
