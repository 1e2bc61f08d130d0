"""Keys and owners, through a real server on SQLite and PostgreSQL: open to the local user until the first key is
created with the CLI, then every API route (REST, SSE, WebSocket, /v1, audio) needs a key, and each owner sees and
changes only their own conversations (another owner's answers 404, exactly like an unknown id).

The server of this module is its own (keys switch authentication on for the whole server, so the shared `server`
fixture, where every other test runs without keys, cannot be used), with the access log captured and one CORS
origin allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa
from advanced_alchemy.alembic.commands import AlembicCommands
from advanced_alchemy.types import GUID, DateTimeUTC
from httpx_sse import aconnect_sse
from sqlalchemy.engine import make_url
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from app.db import create_db_config, upgrade_database_sync
from app.domain.auth import LOCAL_OWNER
from app.services.keys import NO_KEYS_RECHECK_SECONDS
from app.settings import Settings
from tests.conftest import _postgres_database
from tests.helpers import KEY, chipi, create_key, frames_until_done, listed_in_database, next_frame, socket_url
from tests.server import ChipiServer

ALLOWED_ORIGIN = "http://chat.example.test"
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


def sync_engine(database_url: str) -> sa.Engine:
    url = make_url(database_url)
    return sa.create_engine(
        url.set(drivername="sqlite" if url.get_backend_name() == "sqlite" else "postgresql+psycopg")
    )


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def unique_word() -> str:
    return "zq" + "".join(chr(ord("a") + int(digit, 16) % 26) for digit in uuid.uuid4().hex[:10])


def assert_refused(response: httpx.Response) -> None:
    """401, JSON, and how to authenticate."""
    assert response.status_code == 401, (response.request.url, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    if response.request.url.path.startswith("/v1/"):
        assert body["error"]["code"] == "unauthorized" and body["error"]["message"], body
    else:
        assert body["status_code"] == 401 and body["code"] == "unauthorized" and body["detail"], body


def assert_not_found(response: httpx.Response) -> None:
    assert response.status_code == 404, (response.request.method, response.request.url, response.text)
    body = response.json()
    assert (body["error"]["code"] if "error" in body else body["code"]) == "not_found", body


# ---------------------------------------------------------------- the module's server and its phases


@dataclass
class AuthServer:
    server: ChipiServer
    database_url: str
    log: Path

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def auth_database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('auth') / 'chipi.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture(scope="module")
def auth_server(auth_database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    log = tmp_path_factory.mktemp("auth-log") / "server.log"
    with (
        log.open("wb") as stderr,
        ChipiServer(auth_database_url, stderr=stderr, CHIPI_LOG_LEVEL="info", CHIPI_CORS_ORIGINS=ALLOWED_ORIGIN) as s,
    ):
        yield AuthServer(s, auth_database_url, log)


@dataclass
class OpenPhase:
    """What clients without keys got before the first key existed."""

    local_session_id: str
    statuses: dict[str, int]
    listed_ids: list[str]


@pytest.fixture(scope="module")
def open_phase(auth_server: AuthServer) -> OpenPhase:
    """Requests without a key (or with any key, as OpenAI's clients always send one) while no key exists."""
    with httpx.Client(base_url=auth_server.url, timeout=60) as client:
        created = client.post("/api/conversations/new", params={"title": "From before the keys"})
        session_id = created.json()["session_id"]
        with_any_key = client.post("/api/conversations/new", headers=bearer("sk-anything"))
        if with_any_key.status_code == 201:  # keep the local owner's list to the one conversation
            client.delete(f"/api/conversations/{with_any_key.json()['session_id']}")
        listed = client.get("/api/conversations")
        statuses = {
            "create": created.status_code,
            "create with any key": with_any_key.status_code,
            "list": listed.status_code,
            "get": client.get(f"/api/conversations/{session_id}").status_code,
            "models": client.get("/v1/models", headers=bearer("unused")).status_code,
            "voices": client.get("/api/voices").status_code,
        }
    return OpenPhase(session_id, statuses, [c["session_id"] for c in listed.json()["conversations"]])


@dataclass
class Keys:
    alice: str
    bob: str
    local: str


@pytest.fixture(scope="module")
def keys(auth_server: AuthServer, open_phase: OpenPhase) -> Keys:
    """Keys for two owners, and one for the local owner (who owns what was stored before), made with the CLI."""
    url = auth_server.database_url
    created = Keys(
        alice=create_key(url, "alice", "--name", "laptop"),
        bob=create_key(url, "bob"),
        local=create_key(url, LOCAL_OWNER, "--name", "me"),
    )
    deadline = time.monotonic() + 2 * NO_KEYS_RECHECK_SECONDS + 1  # the running server notices the first key
    while httpx.get(f"{auth_server.url}/api/conversations", timeout=30).status_code != 401:
        assert time.monotonic() < deadline, "the server still answers without a key"
        time.sleep(0.1)
    return created


@pytest.fixture
async def anonymous(auth_server: AuthServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_server.url, timeout=60) as client:
        yield client


@pytest.fixture
async def alice(auth_server: AuthServer, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_server.url, headers=bearer(keys.alice), timeout=120) as client:
        yield client


@pytest.fixture
async def bob(auth_server: AuthServer, keys: Keys) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_server.url, headers=bearer(keys.bob), timeout=120) as client:
        yield client


async def new_conversation(client: httpx.AsyncClient, title: str | None = None) -> str:
    response = await client.post("/api/conversations/new", json={"title": title} if title else None)
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


async def listed(client: httpx.AsyncClient, **params: Any) -> list[str]:
    response = await client.get("/api/conversations", params={"limit": 100, **params})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["total"] == len(page["conversations"])  # fewer than a page each: total counts the owner's only
    return [c["session_id"] for c in page["conversations"]]


# ---------------------------------------------------------------- no keys: open, as before


def test_without_keys_everything_is_open_as_before(open_phase: OpenPhase) -> None:
    assert open_phase.statuses == {
        "create": 201,
        "create with any key": 201,  # a key sent to a server without keys is ignored
        "list": 200,
        "get": 200,
        "models": 200,
        "voices": 200,
    }
    assert open_phase.listed_ids == [open_phase.local_session_id]


# ---------------------------------------------------------------- the CLI, and what is stored


def test_keys_are_shown_once_and_stored_only_as_their_hash(auth_server: AuthServer, keys: Keys) -> None:
    engine = sync_engine(auth_server.database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT * FROM api_key")).mappings().all()
    finally:
        engine.dispose()
    plain = {keys.alice, keys.bob, keys.local}
    assert len(rows) >= 3
    by_owner = {row["owner"]: row for row in rows}
    for owner, key in (("alice", keys.alice), ("bob", keys.bob), (LOCAL_OWNER, keys.local)):
        assert by_owner[owner]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    stored = " ".join(str(value) for row in rows for value in row.values())
    assert not any(key in stored or key.removeprefix("chipi_") in stored for key in plain)

    listing = chipi(auth_server.database_url, "keys", "list")
    assert listing.returncode == 0, listing.stderr
    alice_line = next(line for line in listing.stdout.splitlines() if " alice " in line)
    assert "laptop" in alice_line and "active" in alice_line and keys.alice[:12] + "..." in alice_line
    assert not any(key in listing.stdout for key in plain)


def test_the_cli_refuses_bad_owners_and_unknown_ids(auth_server: AuthServer, keys: Keys) -> None:
    bad_owner = chipi(auth_server.database_url, "keys", "create", "--owner", "two words")
    unknown = chipi(auth_server.database_url, "keys", "revoke", str(uuid.uuid4()))
    malformed = chipi(auth_server.database_url, "keys", "revoke", "nope")
    for result in (bad_owner, unknown, malformed):
        assert result.returncode == 1 and result.stderr.startswith("chipi: ") and "Traceback" not in result.stderr
        assert not KEY.search(result.stdout)


# ---------------------------------------------------------------- keys on: what needs one, what does not


async def test_without_a_valid_key_every_api_route_answers_401(
    anonymous: httpx.AsyncClient, keys: Keys, open_phase: OpenPhase
) -> None:
    session = f"/api/conversations/{open_phase.local_session_id}"
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("GET", "/api/conversations", {}),
        ("GET", "/api/conversations", {"params": {"q": "before"}}),
        ("POST", "/api/conversations/new", {}),
        ("GET", session, {}),
        ("PATCH", f"{session}/title", {"json": {"title": "Taken over"}}),
        ("POST", f"{session}/message", {"json": {"content": "Hello"}}),
        ("GET", f"{session}/stream", {"params": {"prompt": "Hello"}}),
        ("POST", f"{session}/stop", {}),
        ("POST", f"{session}/regenerate", {}),
        ("GET", f"{session}/export", {}),
        ("GET", "/api/conversations/export", {}),
        ("DELETE", session, {}),
        ("POST", f"{session}/voice", {"files": {"file": ("a.wav", b"RIFF")}}),
        ("POST", "/api/audio/transcriptions", {"files": {"file": ("a.wav", b"RIFF")}}),
        ("POST", "/api/audio/speech", {"json": {"input": "Hello"}}),
        ("GET", "/api/voices", {}),
        ("GET", "/v1/models", {}),
        ("POST", "/v1/chat/completions", {"json": {"model": "x", "messages": [{"role": "user", "content": "Hi"}]}}),
    ]
    wrong_headers = [
        {},
        bearer("chipi_" + "x" * 43),
        {"Authorization": f"Basic {keys.alice}"},
        {"Authorization": "Bearer"},
    ]
    for method, path, options in calls:
        for headers in wrong_headers:
            assert_refused(await anonymous.request(method, path, headers=headers, **options))
        with_query_key = {**options, "params": {**options.get("params", {}), "api_key": "not-a-key"}}
        assert_refused(await anonymous.request(method, path, **with_query_key))

    # Nothing was changed, stored or deleted by any of them.
    local = await anonymous.get(session, headers=bearer(keys.local))
    assert local.status_code == 200 and local.json()["messages"] == []
    assert local.json()["conversation"]["title"] == "From before the keys"


async def test_liveness_readiness_metrics_the_web_page_and_the_schema_need_no_key(
    anonymous: httpx.AsyncClient, keys: Keys
) -> None:
    for path in ("/api/ping", "/api/health", "/metrics", "/", "/app.js", "/style.css", "/schema/openapi.json"):
        response = await anonymous.get(path)
        assert response.status_code == 200, (path, response.text)


async def test_the_schema_documents_the_key(anonymous: httpx.AsyncClient) -> None:
    schema = (await anonymous.get("/schema/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http" and schemes["bearer"]["scheme"] == "bearer"
    assert (schemes["apiKeyQuery"]["type"], schemes["apiKeyQuery"]["in"], schemes["apiKeyQuery"]["name"]) == (
        "apiKey",
        "query",
        "api_key",
    )
    required = [{"bearer": []}, {"apiKeyQuery": []}]
    paths = schema["paths"]
    assert paths["/api/conversations"]["get"]["security"] == required
    assert paths["/api/conversations/{session_id}/stream"]["get"]["security"] == required
    assert paths["/v1/chat/completions"]["post"]["security"] == required
    assert paths["/api/audio/transcriptions"]["post"]["security"] == required
    assert "401" in paths["/api/conversations"]["get"]["responses"]
    assert "security" not in paths["/api/ping"]["get"] and "security" not in paths["/metrics"]["get"]


# ---------------------------------------------------------------- owners


async def test_an_owner_sees_and_changes_only_their_own_conversations(
    alice: httpx.AsyncClient, bob: httpx.AsyncClient, keys: Keys, open_phase: OpenPhase
) -> None:
    word = unique_word()
    alices = await new_conversation(alice, f"Alice plans {word}")
    bobs = await new_conversation(bob, f"Bob plans {word}")

    assert alices in await listed(alice) and bobs not in await listed(alice)
    assert bobs in await listed(bob) and alices not in await listed(bob)
    assert open_phase.local_session_id not in await listed(alice) + await listed(bob)
    assert await listed(alice, q=word) == [alices] and await listed(bob, q=word) == [bobs]

    path = f"/api/conversations/{alices}"
    unknown = f"/api/conversations/{uuid.uuid4()}"
    for target in (path, unknown):  # another owner's conversation is exactly as absent as one that never was
        assert_not_found(await bob.get(target))
        assert_not_found(await bob.get(f"{target}/export"))
        assert_not_found(await bob.patch(f"{target}/title", json={"title": "Mine now"}))
        assert_not_found(await bob.post(f"{target}/message", json={"content": "Hello"}))
        assert_not_found(await bob.get(f"{target}/stream", params={"prompt": "Hello"}))
        assert_not_found(await bob.post(f"{target}/stop"))
        assert_not_found(await bob.post(f"{target}/regenerate"))
        assert_not_found(await bob.post(f"{target}/messages/{uuid.uuid4()}/edit", json={"content": "Hi"}))
        assert_not_found(await bob.put(f"{target}/branch", json={"message_id": str(uuid.uuid4())}))
        assert_not_found(await bob.delete(target))
    # Bad input is refused as it would be for an unknown id, before anyone looks the conversation up.
    empty = [await bob.post(f"{target}/message", json={"content": " "}) for target in (path, unknown)]
    assert [r.status_code for r in empty] == [400, 400] and empty[0].json() == empty[1].json()

    mine = await alice.get(path)
    assert mine.status_code == 200, mine.text
    assert mine.json()["conversation"]["title"] == f"Alice plans {word}" and mine.json()["messages"] == []

    # The bulk export holds the owner's conversations only; an import becomes the importer's.
    exported = await alice.get("/api/conversations/export")
    lines = [json.loads(line) for line in exported.text.splitlines()]
    assert alices in {line["session_id"] for line in lines} and bobs not in {line["session_id"] for line in lines}
    single = (await alice.get(f"{path}/export")).json()
    imported = await bob.post("/api/conversations/import", json=single)
    assert imported.status_code == 201, imported.text
    copy = imported.json()["session_id"]
    assert copy in await listed(bob) and copy not in await listed(alice)

    # The local owner's key opens what was stored before the keys, and only that.
    async with httpx.AsyncClient(base_url=str(alice.base_url), headers=bearer(keys.local)) as local:
        assert await listed(local) == [open_phase.local_session_id]

    deleted = await alice.delete(path)
    assert deleted.status_code == 200 and alices not in await listed(alice)


@pytest.mark.model
async def test_a_running_reply_is_its_owners_alone(
    auth_server: AuthServer, alice: httpx.AsyncClient, bob: httpx.AsyncClient, keys: Keys
) -> None:
    """The SSE stream, with the key as the query parameter (as a browser's EventSource sends it); while it runs,
    another owner can neither watch, resume, stop nor join it: 404, never the 409 that would give it away."""
    session_id = await new_conversation(alice)
    stream = f"/api/conversations/{session_id}/stream"
    deltas: list[str] = []
    done: dict[str, Any] = {}
    async with (
        httpx.AsyncClient(base_url=auth_server.url, timeout=120) as browser,
        aconnect_sse(browser, "GET", stream, params={"prompt": LONG_PROMPT, "api_key": keys.alice}) as source,
    ):
        assert source.response.status_code == 200
        async for event in source.aiter_sse():
            if event.event == "message":
                deltas.append(event.data)
                if len(deltas) == 1:  # the reply is running now
                    assert_not_found(await bob.get(stream))
                    assert_not_found(await bob.get(stream, headers={"Last-Event-ID": f"{event.id}"}))
                    assert_not_found(await bob.post(f"/api/conversations/{session_id}/message", json={"content": "x"}))
                    assert_not_found(await bob.post(f"/api/conversations/{session_id}/stop"))
                    busy = await alice.post(f"/api/conversations/{session_id}/message", json={"content": "x"})
                    assert busy.status_code == 409, busy.text  # its owner is told it is busy
            elif event.event == "done":
                done = json.loads(event.data)
    assert len(deltas) > 1 and done["finish_reason"] in {"stop", "length"}  # bob's stop did not stop it
    stored = (await alice.get(f"/api/conversations/{session_id}")).json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"] == "".join(deltas) and stored[1]["status"] == "complete"


async def closed_with(socket: ClientConnection) -> tuple[dict[str, Any], int | None]:
    """The error frame a refused socket gets, and the close code that follows."""
    frame = await next_frame(socket)
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(socket.recv(), 30)
    return frame, socket.close_code


@pytest.mark.model
async def test_the_websocket_needs_a_key_and_opens_only_its_owners_conversations(
    alice: httpx.AsyncClient, bob: httpx.AsyncClient, keys: Keys
) -> None:
    session_id = await new_conversation(alice)
    url = socket_url(alice, session_id)

    for refused_url in (url, f"{url}?api_key=chipi_wrong"):
        async with connect(refused_url, open_timeout=30) as socket:
            frame, code = await closed_with(socket)
        assert frame["type"] == "error" and frame["code"] == "unauthorized" and code == 4401

    async with connect(url, additional_headers=bearer(keys.bob), open_timeout=30) as socket:
        frame, code = await closed_with(socket)
    assert frame["code"] == "not_found" and code == 4404

    # A browser's way: the key in the query.
    async with connect(f"{url}?api_key={keys.alice}", open_timeout=30) as socket:
        await socket.send(json.dumps({"type": "message", "content": "What is the capital of France?"}))
        user = await next_frame(socket)
        frames = await frames_until_done(socket)
    assert user["type"] == "user_message" and frames[-1]["type"] == "done"

    # The header works as well; the socket stays open and usable.
    async with connect(url, additional_headers=bearer(keys.alice), open_timeout=30) as socket:
        await socket.send("[]")
        assert (await next_frame(socket))["code"] == "invalid_frame"
        await socket.send(json.dumps({"type": "stop"}))
        await socket.send("[]")
        assert (await next_frame(socket))["code"] == "invalid_frame"

    stored = (await alice.get(f"/api/conversations/{session_id}")).json()["messages"]
    assert [m["content"] for m in stored if m["role"] == "user"] == ["What is the capital of France?"]


@pytest.mark.model
async def test_the_openai_client_works_with_a_key(
    auth_server: AuthServer, alice: httpx.AsyncClient, bob: httpx.AsyncClient, keys: Keys
) -> None:
    base_url = f"{auth_server.url}/v1"
    async with openai.AsyncOpenAI(base_url=base_url, api_key=keys.alice, max_retries=0) as client:
        model = (await client.models.list()).data[0].id
        completion = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8
        )
        assert completion.choices[0].message.content

        alices = await new_conversation(alice)
        stored = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            extra_body={"chipi_session_id": alices},
        )
        assert stored.choices[0].message.content is not None
        bobs = await new_conversation(bob)
        with pytest.raises(openai.NotFoundError):  # another owner's conversation is not one to store in
            await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                extra_body={"chipi_session_id": bobs},
            )
    assert len((await alice.get(f"/api/conversations/{alices}")).json()["messages"]) == 2
    assert (await bob.get(f"/api/conversations/{bobs}")).json()["messages"] == []

    async with openai.AsyncOpenAI(base_url=base_url, api_key="sk-not-a-chipi-key", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "unauthorized"


@pytest.mark.model
async def test_speech_needs_a_key_and_a_voice_turn_only_the_owners_conversation(
    alice: httpx.AsyncClient, bob: httpx.AsyncClient, anonymous: httpx.AsyncClient
) -> None:
    spoken = await alice.post("/api/audio/speech", json={"input": "Good morning."})
    assert spoken.status_code == 200 and spoken.content[:4] == b"RIFF"
    heard = await alice.post("/api/audio/transcriptions", files={"file": ("a.wav", spoken.content)})
    assert heard.status_code == 200 and "morning" in heard.json()["text"].lower()
    assert_refused(await anonymous.post("/api/audio/transcriptions", files={"file": ("a.wav", spoken.content)}))

    alices = await new_conversation(alice)
    assert_not_found(await bob.post(f"/api/conversations/{alices}/voice", files={"file": ("a.wav", spoken.content)}))
    assert (await alice.get(f"/api/conversations/{alices}")).json()["messages"] == []


async def test_a_revoked_key_is_refused_at_once_and_keys_stay_on(
    auth_server: AuthServer, alice: httpx.AsyncClient, anonymous: httpx.AsyncClient, keys: Keys
) -> None:
    carol = create_key(auth_server.database_url, "carol")
    assert (await anonymous.get("/api/conversations", headers=bearer(carol))).status_code == 200
    listing = chipi(auth_server.database_url, "keys", "list").stdout
    carol_id = next(line.split()[0] for line in listing.splitlines() if " carol " in line)

    revoked = chipi(auth_server.database_url, "keys", "revoke", carol_id)
    assert revoked.returncode == 0, revoked.stderr
    assert_refused(await anonymous.get("/api/conversations", headers=bearer(carol)))
    assert_refused(await anonymous.get("/api/conversations", params={"api_key": carol}))
    async with connect(socket_url(anonymous, str(uuid.uuid4())), additional_headers=bearer(carol)) as socket:
        frame, code = await closed_with(socket)
    assert frame["code"] == "unauthorized" and code == 4401
    assert "revoked" in next(
        line for line in chipi(auth_server.database_url, "keys", "list").stdout.splitlines() if " carol " in line
    )

    assert (await alice.get("/api/conversations")).status_code == 200  # the other keys still work
    assert_refused(await anonymous.get("/api/conversations"))


def test_chipi_chat_sends_its_key(auth_server: AuthServer, keys: Keys, open_phase: OpenPhase) -> None:
    session = open_phase.local_session_id
    args = ("chat", "--url", auth_server.url, "--session", session)
    refused = chipi(auth_server.database_url, *args, stdin="/quit\n", CHIPI_API_KEY="")
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    with_key = chipi(auth_server.database_url, *args, "--api-key", keys.local, stdin="/quit\n")
    assert with_key.returncode == 0, with_key.stderr
    assert f"conversation {session}: From before the keys" in with_key.stdout
    from_settings = chipi(auth_server.database_url, *args, stdin="/quit\n", CHIPI_API_KEY=keys.local)
    assert from_settings.returncode == 0 and f"conversation {session}" in from_settings.stdout


# ---------------------------------------------------------------- CORS, and keys kept out of the log


async def test_cors_lets_the_configured_origin_in_and_no_other(anonymous: httpx.AsyncClient, keys: Keys) -> None:
    preflight = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"}
    allowed = await anonymous.options("/api/conversations", headers={"Origin": ALLOWED_ORIGIN, **preflight})
    assert allowed.status_code == 204, allowed.text  # a preflight never needs a key
    assert allowed.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    other = await anonymous.options("/api/conversations", headers={"Origin": "http://evil.test", **preflight})
    assert "access-control-allow-origin" not in other.headers

    answered = await anonymous.get("/api/conversations", headers={"Origin": ALLOWED_ORIGIN, **bearer(keys.alice)})
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    refused = await anonymous.get("/api/conversations", headers={"Origin": ALLOWED_ORIGIN})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert "www-authenticate" in refused.headers["access-control-expose-headers"].lower()  # the page may read it


async def test_keys_never_reach_the_access_log(
    auth_server: AuthServer, anonymous: httpx.AsyncClient, keys: Keys
) -> None:
    socket_path = f"/api/conversations/{uuid.uuid4()}/ws"
    async with connect(f"{socket_url(anonymous, socket_path.split('/')[3])}?api_key={keys.bob}") as socket:
        await closed_with(socket)  # bob's key is good; the conversation is unknown (4404)
    marker = uuid.uuid4().hex
    response = await anonymous.get("/api/conversations", params={"api_key": keys.bob}, headers={"X-Request-ID": marker})
    assert response.status_code == 200
    deadline = asyncio.get_running_loop().time() + 10
    while marker not in (text := auth_server.log.read_text()) or socket_path not in text:
        assert asyncio.get_running_loop().time() < deadline, "the access log has no line for the requests"
        await asyncio.sleep(0.1)
    for key in (keys.alice, keys.bob, keys.local):
        assert key not in text and key.removeprefix("chipi_") not in text


# ---------------------------------------------------------------- CHIPI_AUTH, and the migration


@contextmanager
def serving(database_url: str, **settings: str) -> Iterator[str]:
    """A server that answers as soon as its port is open (these checks need no model)."""
    server = ChipiServer(database_url, **settings)
    server.start(until="/api/ping")
    try:
        yield server.url
    finally:
        server.stop()


def test_chipi_auth_on_needs_a_key_before_any_exists_and_off_needs_none(tmp_path: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'chipi.db'}"
    with serving(database_url, CHIPI_AUTH="on") as url:
        assert_refused(httpx.get(f"{url}/api/conversations", timeout=30))
    key = create_key(database_url, "alice")
    with serving(database_url, CHIPI_AUTH="off") as url:
        anyone = httpx.get(f"{url}/api/conversations", timeout=30)
        assert anyone.status_code == 200 and anyone.json()["conversations"] == []
        with_key = httpx.post(f"{url}/api/conversations/new", headers=bearer(key), timeout=30)
        assert with_key.status_code == 201  # as the local owner: a key means nothing while authentication is off
    with serving(database_url) as url:  # auto, the default: a key exists, so one is needed
        assert_refused(httpx.get(f"{url}/api/conversations", timeout=30))
        mine = httpx.get(f"{url}/api/conversations", headers=bearer(key), timeout=30)
        assert mine.status_code == 200 and mine.json()["conversations"] == []


def test_the_migration_gives_stored_conversations_to_the_local_owner(fresh_database_url: str) -> None:
    settings = replace(Settings.from_env(), database_url=fresh_database_url)
    AlembicCommands(create_db_config(settings, pooled=False)).upgrade("0003")  # a database from before owners
    conversation = sa.table(
        "conversation",
        sa.column("id", GUID()),
        sa.column("title", sa.String()),
        sa.column("title_source", sa.String()),
        sa.column("model", sa.String()),
        sa.column("created_at", DateTimeUTC()),
        sa.column("updated_at", DateTimeUTC()),
    )
    session_id, word, now = uuid.uuid4(), unique_word(), datetime.now(UTC)
    engine = sync_engine(fresh_database_url)
    with engine.begin() as connection:
        connection.execute(
            sa.insert(conversation).values(
                id=session_id, title=f"Old {word}", title_source="manual", model="m", created_at=now, updated_at=now
            )
        )
    engine.dispose()
    upgrade_database_sync(settings)

    assert listed_in_database(settings.database_url, LOCAL_OWNER, None) == [session_id]
    assert listed_in_database(settings.database_url, LOCAL_OWNER, word) == [
        session_id
    ]  # the search index survived the migration
    assert listed_in_database(settings.database_url, "alice", None) == []
    assert listed_in_database(settings.database_url, "alice", word) == []
