"""Regenerate and edit keep history as branches; the model always sees exactly the active branch."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import get_conversation, new_conversation, send_message


async def test_regenerate_adds_a_sibling_reply_and_keeps_the_old_one(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    first = await send_message(client, session_id, "Tell me a fun fact about cats.", temperature=0)
    regenerated = await client.post(
        f"/api/conversations/{session_id}/regenerate", json={"temperature": 1.0, "top_p": 1.0}
    )
    assert regenerated.status_code == 200, regenerated.text
    second = regenerated.json()
    assert second["user_message"]["id"] == first["user_message"]["id"]  # the same question ...
    assert second["assistant_message"]["parent_id"] == first["user_message"]["id"]  # ... answered again
    assert second["assistant_message"]["id"] != first["assistant_message"]["id"]
    active = (await get_conversation(client, session_id))["messages"]
    assert [m["id"] for m in active] == [first["user_message"]["id"], second["assistant_message"]["id"]]
    tree = (await client.get(f"/api/conversations/{session_id}", params={"tree": "true"})).json()["messages"]
    assert {m["id"] for m in tree} == {
        first["user_message"]["id"],
        first["assistant_message"]["id"],
        second["assistant_message"]["id"],
    }


async def test_edit_starts_a_branch_and_the_model_sees_only_the_active_one(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    original = await send_message(client, session_id, "The secret password is tangerine.")
    edit = await client.post(
        f"/api/conversations/{session_id}/messages/{original['user_message']['id']}/edit",
        json={"content": "The secret password is pineapple."},
    )
    assert edit.status_code == 200, edit.text
    edited = edit.json()
    assert edited["user_message"]["parent_id"] is None  # a sibling of the original first message
    question = await send_message(client, session_id, "What is the secret password?")
    assert "pineapple" in question["response"].lower()
    assert "tangerine" not in question["response"].lower()
    branch = (await get_conversation(client, session_id))["messages"]
    assert [m["content"] for m in branch if m["role"] == "user"] == [
        "The secret password is pineapple.",
        "What is the secret password?",
    ]

    switched = await client.put(
        f"/api/conversations/{session_id}/branch", json={"message_id": original["user_message"]["id"]}
    )
    assert switched.status_code == 200, switched.text
    assert [m["id"] for m in switched.json()["messages"]] == [
        original["user_message"]["id"],
        original["assistant_message"]["id"],
    ]
    again = await send_message(client, session_id, "What is the secret password?")
    assert "tangerine" in again["response"].lower()
    assert "pineapple" not in again["response"].lower()
    tree = (await client.get(f"/api/conversations/{session_id}", params={"tree": True})).json()["messages"]
    assert len(tree) == 8  # two branches of two exchanges each, all kept


async def test_branch_errors(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    nothing = await client.post(f"/api/conversations/{session_id}/regenerate")
    assert nothing.status_code == 400 and nothing.json()["field"] == "message_id"
    exchange = await send_message(client, session_id, "Hi", max_tokens=4)
    user_id, reply_id = exchange["user_message"]["id"], exchange["assistant_message"]["id"]
    base = f"/api/conversations/{session_id}"
    assert (await client.post(f"{base}/regenerate", json={"message_id": user_id})).status_code == 400
    assert (await client.post(f"{base}/messages/{reply_id}/edit", json={"content": "x"})).status_code == 400
    assert (await client.post(f"{base}/messages/not-a-uuid/edit", json={"content": "x"})).status_code == 400
    unknown = "00000000-0000-0000-0000-000000000000"
    assert (await client.post(f"{base}/messages/{unknown}/edit", json={"content": "x"})).status_code == 404
    assert (await client.put(f"{base}/branch", json={"message_id": unknown})).status_code == 404
    assert (await client.post(f"{base}/messages/{user_id}/edit", json={"content": " "})).status_code == 400
    assert len((await get_conversation(client, session_id))["messages"]) == 2  # nothing half-written


async def test_switching_branch_while_the_conversation_is_deleted_gets_404_never_500(
    client: httpx.AsyncClient,
) -> None:
    statuses: set[int] = set()
    for round_ in range(6):
        session_id = (await new_conversation(client))["session_id"]
        reply_id = (await send_message(client, session_id, "Hi", max_tokens=2))["assistant_message"]["id"]
        path = f"/api/conversations/{session_id}"
        racing = [client.put(f"{path}/branch", json={"message_id": reply_id}) for _ in range(3)]
        racing.insert(round_ % 4, client.delete(path))
        statuses |= {response.status_code for response in await asyncio.gather(*racing)}
        assert (await client.get(path)).status_code == 404
    assert statuses <= {200, 404}, statuses
