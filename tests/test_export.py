"""Export and import: a conversation as lossless JSON or readable Markdown, re-importable; all of them as NDJSON."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.helpers import get_conversation, new_conversation, send_message

MESSAGE_FIELDS = ("role", "content", "reasoning", "status", "prompt_tokens", "completion_tokens", "finish_reason")


async def branched_conversation(client: httpx.AsyncClient) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A conversation with a system prompt, two turns, and a regenerated (so branched) last reply."""
    response = await client.post(
        "/api/conversations/new", json={"title": "Export me", "system_prompt": "You are brief."}
    )
    session_id = response.json()["session_id"]
    first = await send_message(client, session_id, "Name a fruit.", max_tokens=6)
    await send_message(client, session_id, "Name a vegetable.", max_tokens=6)
    regenerated = await client.post(
        f"/api/conversations/{session_id}/regenerate", json={"max_tokens": 6, "temperature": 1.0, "top_p": 1.0}
    )
    assert regenerated.status_code == 200, regenerated.text
    return session_id, first, regenerated.json()


async def export_json(client: httpx.AsyncClient, session_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/conversations/{session_id}/export", params={"format": "json"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert f"chipi-{session_id}.json" in response.headers["content-disposition"]
    return response.json()  # type: ignore[no-any-return]


def comparable(export: dict[str, Any]) -> dict[str, Any]:
    """An export with its ids replaced by each message's position, so two copies of a conversation compare equal."""
    position = {message["id"]: index for index, message in enumerate(export["messages"])}
    return {
        **{key: value for key, value in export.items() if key not in ("session_id", "messages")},
        "active_message_id": position.get(export["active_message_id"]),
        "messages": [
            {
                **{key: value for key, value in message.items() if key != "id"},
                "parent_id": position.get(message["parent_id"]),
            }
            for message in export["messages"]
        ],
    }


async def test_the_json_export_holds_the_whole_tree(client: httpx.AsyncClient) -> None:
    session_id, first, regenerated = await branched_conversation(client)
    export = await export_json(client, session_id)
    tree = (await client.get(f"/api/conversations/{session_id}", params={"tree": "true"})).json()
    assert export["format"] == "chipi.conversation" and export["version"] == 1
    assert export["session_id"] == session_id
    assert export["title"] == "Export me" and export["title_source"] == "manual"
    assert export["system_prompt"] == "You are brief."
    assert export["active_message_id"] == regenerated["assistant_message"]["id"]
    assert len(export["messages"]) == len(tree["messages"]) == 5  # both replies to the second question
    for exported, stored in zip(export["messages"], tree["messages"], strict=True):
        assert exported["id"] == stored["id"] and exported["parent_id"] == stored["parent_id"]
        assert exported["created_at"] == stored["timestamp"]
        assert all(exported[field] == stored[field] for field in MESSAGE_FIELDS)
    assert export["messages"][0]["id"] == first["user_message"]["id"]


async def test_an_import_recreates_the_conversation_under_new_ids(client: httpx.AsyncClient) -> None:
    session_id, _, _ = await branched_conversation(client)
    export = await export_json(client, session_id)
    first = await client.post("/api/conversations/import", json=export)
    second = await client.post("/api/conversations/import", json=export)  # twice: two independent copies
    assert first.status_code == second.status_code == 201, first.text
    copies = [first.json()["session_id"], second.json()["session_id"]]
    assert len({session_id, *copies}) == 3
    assert first.json()["imported_messages"] == 5 and first.json()["title"] == "Export me"
    for copy in copies:
        again = await export_json(client, copy)
        assert comparable(again) == comparable(export)  # lossless, down to timestamps and the active branch
        assert not {m["id"] for m in again["messages"]} & {m["id"] for m in export["messages"]}
    active = (await get_conversation(client, copies[0]))["messages"]
    assert [m["content"] for m in active] == [
        m["content"] for m in (await get_conversation(client, session_id))["messages"]
    ]
    # the copy is a conversation like any other: it can go on, and deleting it leaves the original alone
    await send_message(client, copies[0], "One more?", max_tokens=4)
    assert (await client.delete(f"/api/conversations/{copies[0]}")).status_code == 200
    assert comparable(await export_json(client, session_id)) == comparable(export)


async def test_the_markdown_export_is_the_active_branch(client: httpx.AsyncClient) -> None:
    session_id, first, regenerated = await branched_conversation(client)
    tree = (await client.get(f"/api/conversations/{session_id}", params={"tree": "true"})).json()["messages"]
    response = await client.get(f"/api/conversations/{session_id}/export", params={"format": "markdown"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/markdown")
    assert f"chipi-{session_id}.md" in response.headers["content-disposition"]
    markdown = response.text
    assert markdown.startswith("# Export me\n")
    assert "You are brief." in markdown
    assert markdown.count("## User") == 2 and markdown.count("## Assistant") == 2
    assert first["assistant_message"]["content"] in markdown
    assert regenerated["assistant_message"]["content"] in markdown
    replaced = next(
        m
        for m in tree
        if m["parent_id"] == regenerated["user_message"]["id"] and m["id"] != regenerated["assistant_message"]["id"]
    )
    active_texts = " ".join(m["content"] for m in tree if m["id"] != replaced["id"])
    if replaced["content"] not in active_texts:
        assert replaced["content"] not in markdown  # the other branch is not in it


async def test_the_bulk_export_streams_one_conversation_per_line(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client, title="in the bulk export"))["session_id"]
    await send_message(client, session_id, "Hello!", max_tokens=4)
    lines = []
    async with client.stream("GET", "/api/conversations/export") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        async for line in response.aiter_lines():
            if line:
                lines.append(json.loads(line))
    total = (await client.get("/api/conversations")).json()["total"]
    assert len(lines) == total and len({line["session_id"] for line in lines}) == total
    ours = next(line for line in lines if line["session_id"] == session_id)
    assert ours == await export_json(client, session_id)
    imported = await client.post("/api/conversations/import", json=ours)  # each line is importable
    assert imported.status_code == 201


def a_valid_export() -> dict[str, Any]:
    user, reply = str(uuid.uuid4()), str(uuid.uuid4())
    now = "2026-02-03T04:05:06+00:00"
    return {
        "format": "chipi.conversation",
        "version": 1,
        "session_id": str(uuid.uuid4()),
        "title": "valid",
        "title_source": "auto",
        "system_prompt": None,
        "model": "m",
        "created_at": now,
        "updated_at": now,
        "active_message_id": reply,
        "messages": [
            {"id": user, "parent_id": None, "role": "user", "content": "hi", "created_at": now},
            {"id": reply, "parent_id": user, "role": "assistant", "content": "hello", "created_at": now},
        ],
    }


def broken(change: Any) -> dict[str, Any]:
    export = a_valid_export()
    change(export)
    return export


INVALID_IMPORTS = {
    "no messages field": broken(lambda e: e.pop("messages")),
    "an unknown format": broken(lambda e: e.update(format="something.else")),
    "a newer version": broken(lambda e: e.update(version=2)),
    "a role that does not exist": broken(lambda e: e["messages"][0].update(role="wizard")),
    "a status that does not exist": broken(lambda e: e["messages"][1].update(status="done")),
    "a malformed id": broken(lambda e: e["messages"][0].update(id="nope")),
    "a time without an offset": broken(lambda e: e.update(created_at="2026-02-03T04:05:06")),
    "an empty title": broken(lambda e: e.update(title="")),
    "a blank title": broken(lambda e: e.update(title="   ")),
    "an overlong title": broken(lambda e: e.update(title="t" * 300)),
    "an unknown parent": broken(lambda e: e["messages"][1].update(parent_id=str(uuid.uuid4()))),
    "a duplicate id": broken(lambda e: e["messages"][1].update(id=e["messages"][0]["id"])),
    "a cycle": broken(lambda e: e["messages"][0].update(parent_id=e["messages"][1]["id"])),
    "an unknown active message": broken(lambda e: e.update(active_message_id=str(uuid.uuid4()))),
    "a negative token count": broken(lambda e: e["messages"][1].update(completion_tokens=-1)),
    "not an object": [1, 2, 3],
}


@pytest.mark.parametrize("problem", list(INVALID_IMPORTS))
async def test_an_invalid_import_is_400_and_stores_nothing(client: httpx.AsyncClient, problem: str) -> None:
    before = (await client.get("/api/conversations")).json()["total"]
    response = await client.post("/api/conversations/import", json=INVALID_IMPORTS[problem])
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "invalid_input" and body["detail"]
    assert (await client.get("/api/conversations")).json()["total"] == before
    assert (await client.post("/api/conversations/import", json=a_valid_export())).status_code == 201


async def test_an_import_that_is_not_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/conversations/import", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["code"] == "invalid_input"


async def test_export_errors(client: httpx.AsyncClient) -> None:
    assert (await client.get("/api/conversations/not-a-uuid/export")).status_code == 400
    assert (await client.get(f"/api/conversations/{uuid.uuid4()}/export")).status_code == 404
    session_id = (await new_conversation(client))["session_id"]
    response = await client.get(f"/api/conversations/{session_id}/export", params={"format": "pdf"})
    assert response.status_code == 400 and response.json()["field"] == "format"
