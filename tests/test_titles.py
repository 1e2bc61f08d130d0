"""Titles: after the first reply the model names the conversation; a title the user set is never replaced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from app.domain.rules import MODEL_TITLE_CHARS, auto_title, clean_model_title
from tests.helpers import get_conversation, new_conversation, send_message
from tests.server import ChipiServer

FIRST_MESSAGE = "What is the capital of France?"


@pytest.fixture(scope="module")
def titling_server(database_url: str) -> Iterator[ChipiServer]:
    """A server with model titles on (the shared test server uses the first-message rule)."""
    with ChipiServer(database_url, CHIPI_AUTO_TITLE="model") as running:
        yield running


@pytest.fixture
async def titling(titling_server: ChipiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=titling_server.url, timeout=60) as http:
        yield http


async def conversation_once_titled(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    """The conversation once the model's title is in (or after 30 s, whatever it is then)."""
    for _ in range(300):
        conversation = (await get_conversation(client, session_id))["conversation"]
        if conversation["title_source"] == "model":
            break
        await asyncio.sleep(0.1)
    return conversation  # type: ignore[no-any-return]


async def test_the_model_names_the_conversation_after_its_first_reply(titling: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(titling))["session_id"]
    exchange = await send_message(titling, session_id, FIRST_MESSAGE)
    assert exchange["assistant_message"]["status"] == "complete"  # the reply did not wait for the title
    conversation = await conversation_once_titled(titling, session_id)
    title = conversation["title"]
    assert conversation["title_source"] == "model", conversation
    assert title.strip() == title and 0 < len(title) <= MODEL_TITLE_CHARS
    assert "\n" not in title and title[0] not in "\"'*#" and title[-1] not in "\"'*."
    assert title != auto_title(FIRST_MESSAGE)
    assert "france" in title.lower() or "paris" in title.lower()  # it is about the conversation
    await send_message(titling, session_id, "And of Italy?", max_tokens=4)
    await asyncio.sleep(2)  # time enough for a (wrong) second title
    assert (await get_conversation(titling, session_id))["conversation"]["title"] == title  # named once


async def test_a_title_the_user_set_is_never_replaced(titling: httpx.AsyncClient) -> None:
    named_first = (await new_conversation(titling, title="My trip"))["session_id"]
    await send_message(titling, named_first, FIRST_MESSAGE, max_tokens=4)
    renamed = (await new_conversation(titling))["session_id"]
    await send_message(titling, renamed, FIRST_MESSAGE, max_tokens=4)
    # renamed while (or before) the model names it: the user's title wins the race
    await titling.patch(f"/api/conversations/{renamed}/title", params={"title": "Capitals quiz"})
    await send_message(titling, renamed, "And of Spain?", max_tokens=4)
    await asyncio.sleep(2)
    for session_id, title in ((named_first, "My trip"), (renamed, "Capitals quiz")):
        conversation = (await get_conversation(titling, session_id))["conversation"]
        assert conversation["title"] == title and conversation["title_source"] == "manual"


async def test_renaming_after_the_model_title_replaces_it_for_good(titling: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(titling))["session_id"]
    await send_message(titling, session_id, "How do I bake bread?", max_tokens=8)
    assert (await conversation_once_titled(titling, session_id))["title_source"] == "model"
    await titling.patch(f"/api/conversations/{session_id}/title", params={"title": "Bread"})
    await send_message(titling, session_id, "And rolls?", max_tokens=4)
    await asyncio.sleep(1)
    conversation = (await get_conversation(titling, session_id))["conversation"]
    assert conversation["title"] == "Bread" and conversation["title_source"] == "manual"


async def test_with_first_message_titles_the_first_message_names_it(client: httpx.AsyncClient) -> None:
    """The shared test server runs with CHIPI_AUTO_TITLE=first-message: the seed's rule, and nothing after."""
    session_id = (await new_conversation(client))["session_id"]
    message = "Please help me plan a week of vegetarian dinners " * 3
    await send_message(client, session_id, message, max_tokens=4)
    await asyncio.sleep(1)
    conversation = (await get_conversation(client, session_id))["conversation"]
    assert conversation["title"] == auto_title(message) and conversation["title_source"] == "auto"


@pytest.mark.parametrize(
    ("raw", "title"),
    [
        ("The capital of France is Paris.", "The capital of France is Paris"),
        ('"Title: Cooking pasta"', "Cooking pasta"),
        ("**Baking bread**\nMore text after", "Baking bread"),
        ("  \n\n  Trip to Lisbon  ", "Trip to Lisbon"),
        ("How to reverse a list in Python:\n\n* Use slicing", "How to reverse a list in Python"),
        ("Cats. And more sentences follow here.", "Cats"),
        ("“Weekend plans”", "Weekend plans"),
    ],
)
def test_a_model_title_is_cleaned(raw: str, title: str) -> None:
    assert clean_model_title(raw) == title


def test_a_long_model_title_is_cut_at_a_word() -> None:
    raw = "Plan a week of vegetarian dinners, with a focus on delicious and healthy meals"
    cleaned = clean_model_title(raw)
    assert cleaned == "Plan a week of vegetarian dinners, with a focus on delicious"
    assert len(cleaned) <= MODEL_TITLE_CHARS
    assert clean_model_title("x" * 200) == "x" * MODEL_TITLE_CHARS


@pytest.mark.parametrize("raw", ["", "   ", "\n\n", '""', "...", "**", "?"])
def test_no_usable_model_title_is_none(raw: str) -> None:
    assert clean_model_title(raw) is None
