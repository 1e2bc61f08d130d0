"""Replies from the real default model, generated from the conversation's stored history."""

from __future__ import annotations

import httpx

from tests.helpers import get_conversation, new_conversation, send_message
from tests.server import TEST_CONTEXT_WINDOW


async def test_message_returns_the_stored_user_message_and_the_reply(
    client: httpx.AsyncClient, max_new_tokens: int
) -> None:
    session_id = (await new_conversation(client))["session_id"]
    exchange = await send_message(client, session_id, "What is the capital of France?")
    user, reply = exchange["user_message"], exchange["assistant_message"]
    assert user["role"] == "user" and user["content"] == "What is the capital of France?"
    assert reply["role"] == "assistant" and reply["status"] == "complete"
    assert "paris" in reply["content"].lower()
    assert exchange["response"] == reply["content"]
    assert reply["parent_id"] == user["id"]
    assert 0 < reply["completion_tokens"] <= max_new_tokens
    assert reply["finish_reason"] in {"stop", "length"}
    stored = await get_conversation(client, session_id)
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [
        ("user", user["content"]),
        ("assistant", reply["content"]),
    ]


async def test_the_seed_query_parameters_still_work(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    response = await client.post(
        f"/api/conversations/{session_id}/message", params={"content": "Say hello.", "role": "user"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["user_message"]["content"] == "Say hello."
    assert response.json()["assistant_message"]["content"]


async def test_the_model_recalls_what_an_earlier_turn_said(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    first = await send_message(client, session_id, "The secret password is tangerine.")
    second = await send_message(client, session_id, "What is the secret password?")
    assert "tangerine" in second["response"].lower()
    # the second prompt carried the whole first exchange
    first_prompt = first["assistant_message"]["prompt_tokens"]
    second_prompt = second["assistant_message"]["prompt_tokens"]
    assert second_prompt > first_prompt + first["assistant_message"]["completion_tokens"]


async def test_a_system_prompt_shapes_the_replies(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/conversations/new",
        json={"system_prompt": "You are a pirate. Always answer with the word 'Arrr' at the start."},
    )
    session_id = response.json()["session_id"]
    exchange = await send_message(client, session_id, "How are you today?")
    assert "arr" in exchange["response"].lower()


async def test_the_first_message_names_an_untitled_conversation(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    long_message = "Please help me plan a week of vegetarian dinners " * 4
    await send_message(client, session_id, long_message, max_tokens=4)
    conversation = (await get_conversation(client, session_id))["conversation"]
    assert conversation["title"] == " ".join(long_message.split())[:100] + "..."
    assert conversation["title_source"] == "auto"
    await send_message(client, session_id, "And a dessert?", max_tokens=4)
    assert (await get_conversation(client, session_id))["conversation"]["title"] == conversation["title"]


async def test_a_manual_title_is_never_overwritten(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client, title="My title"))["session_id"]
    await send_message(client, session_id, "Hello there", max_tokens=4)
    assert (await get_conversation(client, session_id))["conversation"]["title"] == "My title"


async def test_a_long_conversation_is_trimmed_to_the_context_window_and_keeps_every_message(
    client: httpx.AsyncClient, max_new_tokens: int
) -> None:
    session_id = (await new_conversation(client))["session_id"]
    paragraph = "The quick brown fox jumps over the lazy dog near the quiet river bank. " * 20  # ~300 tokens
    prompt_sizes = []
    for turn in range(5):
        exchange = await send_message(client, session_id, f"Note {turn}: {paragraph}", max_tokens=4)
        prompt_sizes.append(exchange["assistant_message"]["prompt_tokens"])
        assert exchange["assistant_message"]["status"] == "complete"
    assert max(prompt_sizes) <= TEST_CONTEXT_WINDOW - 4
    assert prompt_sizes[-1] < sum(prompt_sizes[:2])  # old turns were dropped from the prompt ...
    messages = (await get_conversation(client, session_id))["messages"]
    assert len(messages) == 10  # ... but never from storage


async def test_generation_options_in_the_body(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    exchange = await send_message(client, session_id, "Count from one to twenty.", max_tokens=3)
    assert exchange["assistant_message"]["completion_tokens"] == 3
    assert exchange["assistant_message"]["finish_reason"] == "length"
