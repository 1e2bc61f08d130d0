"""The seed's conversation API (no model involved): ping, new, list, get, title, delete."""

from __future__ import annotations

import asyncio

import httpx

from tests.helpers import ISO_WITH_OFFSET, get_conversation, new_conversation


async def test_ping(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/ping")
    assert response.status_code == 200
    assert response.json() == {"response": "pong"}


async def test_new_conversation_with_a_query_title(client: httpx.AsyncClient) -> None:
    created = await new_conversation(client, title="Trip to Lisbon")
    assert created["title"] == "Trip to Lisbon"
    assert created["title_source"] == "manual"
    assert created["message"]
    assert ISO_WITH_OFFSET.match(created["created_at"]) and ISO_WITH_OFFSET.match(created["updated_at"])
    fetched = await get_conversation(client, created["session_id"])
    assert fetched["conversation"]["title"] == "Trip to Lisbon"
    assert fetched["messages"] == []


async def test_new_conversation_with_a_json_body(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/conversations/new", json={"title": "From JSON", "system_prompt": "You are terse."}
    )
    assert response.status_code == 201
    body = response.json()
    assert body["title"] == "From JSON"
    assert body["system_prompt"] == "You are terse."


async def test_new_conversation_without_a_title_gets_the_default(client: httpx.AsyncClient) -> None:
    created = await new_conversation(client)
    assert created["title"] == "New Conversation"
    assert created["title_source"] == "default"


async def test_list_is_newest_first_and_pages_with_limit_and_offset(client: httpx.AsyncClient) -> None:
    ids = [(await new_conversation(client, title=f"page test {n}"))["session_id"] for n in range(3)]
    response = await client.get("/api/conversations", params={"limit": 2, "offset": 0})
    assert response.status_code == 200
    page = response.json()
    assert [c["session_id"] for c in page["conversations"]] == [ids[2], ids[1]]
    assert page["total"] >= 3 and page["limit"] == 2 and page["offset"] == 0
    second = (await client.get("/api/conversations", params={"limit": 2, "offset": 1})).json()
    assert [c["session_id"] for c in second["conversations"]] == [ids[1], ids[0]]
    for conversation in page["conversations"]:
        assert set(conversation) >= {"session_id", "title", "created_at", "updated_at"}
        assert ISO_WITH_OFFSET.match(conversation["updated_at"])
    past_the_end = (await client.get("/api/conversations", params={"offset": page["total"]})).json()
    assert past_the_end["conversations"] == [] and past_the_end["total"] == page["total"]  # still counts them all


async def test_list_defaults_to_twenty(client: httpx.AsyncClient) -> None:
    for n in range(21 - (await client.get("/api/conversations")).json()["total"]):
        await new_conversation(client, title=f"fill {n}")
    page = (await client.get("/api/conversations")).json()
    assert len(page["conversations"]) == 20 and page["limit"] == 20


async def test_rename_by_query_and_by_body(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    response = await client.patch(f"/api/conversations/{session_id}/title", params={"title": "By query"})
    assert response.status_code == 200
    assert response.json() == {"session_id": session_id, "title": "By query", "message": "Title updated"}
    response = await client.patch(f"/api/conversations/{session_id}/title", json={"title": "By body"})
    assert response.json()["title"] == "By body"
    conversation = (await get_conversation(client, session_id))["conversation"]
    assert conversation["title"] == "By body" and conversation["title_source"] == "manual"


async def test_renaming_moves_the_conversation_to_the_top(client: httpx.AsyncClient) -> None:
    older = (await new_conversation(client, title="older"))["session_id"]
    await new_conversation(client, title="newer")
    await client.patch(f"/api/conversations/{older}/title", params={"title": "older, renamed"})
    top = (await client.get("/api/conversations", params={"limit": 1})).json()["conversations"][0]
    assert top["session_id"] == older


async def test_delete_removes_the_conversation(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client, title="to delete"))["session_id"]
    response = await client.delete(f"/api/conversations/{session_id}")
    assert response.status_code == 200
    assert response.json()["session_id"] == session_id and response.json()["message"]
    assert (await client.get(f"/api/conversations/{session_id}")).status_code == 404
    listed = (await client.get("/api/conversations", params={"limit": 100})).json()["conversations"]
    assert session_id not in {c["session_id"] for c in listed}


async def test_openapi_schema_documents_every_route_with_typed_bodies(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    operations = {
        op["operationId"]: (path, method)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if isinstance(op, dict) and "operationId" in op
    }
    assert set(operations) >= {
        "ping",
        "listConversations",
        "createConversation",
        "getConversation",
        "deleteConversation",
        "renameConversation",
        "sendMessage",
        "streamReply",
    }
    components = schema["components"]["schemas"]
    for struct in ("ConversationList", "ConversationDetail", "MessageExchange", "MessageCreate", "ErrorBody"):
        assert any(name.endswith(struct) for name in components), struct
    message_op = schema["paths"]["/api/conversations/{session_id}/message"]["post"]
    assert "requestBody" in message_op
    assert {"400", "404", "413"} <= set(message_op["responses"])


async def test_renames_and_deletes_racing_a_delete_get_404_never_500(client: httpx.AsyncClient) -> None:
    """A rename or delete landing while another request deletes the conversation finds it gone: 404, nothing
    half-done (each write re-checks the row it changes in the same statement)."""
    statuses: set[tuple[str, int]] = set()
    for round_ in range(12):
        session_id = (await new_conversation(client))["session_id"]
        path = f"/api/conversations/{session_id}"
        racing = [client.patch(f"{path}/title", json={"title": f"racing {n}"}) for n in range(3)]
        racing.insert(round_ % 4, client.delete(path))
        racing.append(client.delete(path))
        responses = await asyncio.gather(*racing)
        for response in responses:
            statuses.add((response.request.method, response.status_code))
        deleted = sorted(response.status_code for response in responses if response.request.method == "DELETE")
        assert deleted == [200, 404]  # of two racing deletes, only one finds the conversation
        assert (await client.get(path)).status_code == 404
    assert {status for _, status in statuses} <= {200, 404}, statuses
    assert ("DELETE", 200) in statuses and ("PATCH", 404) in statuses
