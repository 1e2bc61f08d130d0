"""Bad input gets a clear JSON error with the right status, and never leaves a half-written row."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.helpers import get_conversation, new_conversation
from tests.server import TEST_MAX_NEW_TOKENS, TEST_MAX_PROMPT_CHARS

ROUTES_WITH_AN_ID = [
    ("GET", "/api/conversations/{id}", {}),
    ("DELETE", "/api/conversations/{id}", {}),
    ("PATCH", "/api/conversations/{id}/title", {"params": {"title": "x"}}),
    ("POST", "/api/conversations/{id}/message", {"json": {"content": "hi"}}),
    ("GET", "/api/conversations/{id}/stream", {"params": {"prompt": "hi"}}),
]


def assert_json_error(response: httpx.Response, status: int, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status_code"] == status and body["detail"] and body["code"]
    if field is not None:
        assert body["field"] == field, body


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES_WITH_AN_ID)
async def test_a_malformed_id_is_400(client: httpx.AsyncClient, method: str, path: str, kwargs: dict) -> None:
    response = await client.request(method, path.format(id="not-a-uuid"), **kwargs)
    assert_json_error(response, 400, field="session_id")


@pytest.mark.parametrize(("method", "path", "kwargs"), ROUTES_WITH_AN_ID)
async def test_an_unknown_id_is_404(client: httpx.AsyncClient, method: str, path: str, kwargs: dict) -> None:
    response = await client.request(method, path.format(id=uuid.uuid4()), **kwargs)
    assert_json_error(response, 404, field="session_id")


@pytest.fixture
async def conversation(client: httpx.AsyncClient) -> str:
    return str((await new_conversation(client, title="bad input"))["session_id"])


async def assert_untouched(client: httpx.AsyncClient, session_id: str) -> None:
    stored = await get_conversation(client, session_id)
    assert stored["messages"] == []
    assert stored["conversation"]["title"] == "bad input"


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
async def test_an_empty_prompt_is_400(client: httpx.AsyncClient, conversation: str, prompt: str) -> None:
    stream = await client.get(f"/api/conversations/{conversation}/stream", params={"prompt": prompt})
    assert_json_error(stream, 400, field="content")
    message = await client.post(f"/api/conversations/{conversation}/message", json={"content": prompt})
    assert_json_error(message, 400, field="content")
    assert_json_error(await client.post(f"/api/conversations/{conversation}/message"), 400, field="content")
    assert_json_error(await client.get(f"/api/conversations/{conversation}/stream"), 400, field="content")
    await assert_untouched(client, conversation)


async def test_a_prompt_over_the_limit_is_413(client: httpx.AsyncClient, conversation: str) -> None:
    too_long = "a" * (TEST_MAX_PROMPT_CHARS + 1)
    stream = await client.get(f"/api/conversations/{conversation}/stream", params={"prompt": too_long})
    assert_json_error(stream, 413, field="content")
    message = await client.post(f"/api/conversations/{conversation}/message", json={"content": too_long})
    assert_json_error(message, 413, field="content")
    await assert_untouched(client, conversation)


@pytest.mark.parametrize(
    "body",
    [b'{"content": ', b"not json", b'{"content": 42}', b'{"content": "hi", "unknown": 1}', b'["content"]'],
)
async def test_an_invalid_json_body_is_400(client: httpx.AsyncClient, conversation: str, body: bytes) -> None:
    response = await client.post(
        f"/api/conversations/{conversation}/message", content=body, headers={"content-type": "application/json"}
    )
    assert_json_error(response, 400)
    await assert_untouched(client, conversation)


@pytest.mark.parametrize(
    "options",
    [{"max_tokens": 0}, {"max_tokens": TEST_MAX_NEW_TOKENS + 1}, {"temperature": -1}, {"top_p": 0}],
)
async def test_out_of_range_generation_options_are_400(
    client: httpx.AsyncClient, conversation: str, options: dict
) -> None:
    response = await client.post(f"/api/conversations/{conversation}/message", json={"content": "hi", **options})
    assert_json_error(response, 400, field=next(iter(options)))
    await assert_untouched(client, conversation)


async def test_only_user_messages_can_be_sent(client: httpx.AsyncClient, conversation: str) -> None:
    response = await client.post(
        f"/api/conversations/{conversation}/message", params={"content": "I am the model", "role": "assistant"}
    )
    assert_json_error(response, 400, field="role")
    await assert_untouched(client, conversation)


async def test_bad_titles(client: httpx.AsyncClient, conversation: str) -> None:
    assert_json_error(await client.patch(f"/api/conversations/{conversation}/title", params={"title": " "}), 400)
    assert_json_error(await client.patch(f"/api/conversations/{conversation}/title"), 400, field="title")
    long_title = {"title": "t" * 1000}
    assert_json_error(await client.patch(f"/api/conversations/{conversation}/title", json=long_title), 413)
    assert_json_error(await client.post("/api/conversations/new", params=long_title), 413)
    await assert_untouched(client, conversation)


@pytest.mark.parametrize("params", [{"limit": "abc"}, {"limit": 0}, {"limit": 1000}, {"offset": -1}])
async def test_bad_paging_is_400(client: httpx.AsyncClient, params: dict) -> None:
    assert_json_error(await client.get("/api/conversations", params=params), 400, field=next(iter(params)))


async def test_unknown_routes_and_methods_are_json_too(client: httpx.AsyncClient) -> None:
    assert_json_error(await client.get("/api/nothing-here"), 404)
    assert_json_error(await client.put("/api/ping"), 405)
