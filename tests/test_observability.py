"""What an operator sees: /metrics, the access log with request ids, and /api/health while the models load,
after a failed load, and while the database is unreachable."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from httpx_sse import aconnect_sse
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from app.db import create_db_config
from app.services.readiness import Readiness
from app.settings import Settings
from tests.conftest import POSTGRES_ADMIN_URL
from tests.helpers import new_conversation, stream_reply
from tests.server import ChipiServer

STREAM_ROUTE = "/api/conversations/{session_id}/stream"
LONG_PROMPT = "Write a long story about a dragon who learns to bake bread."


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when there is none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def test_metrics_count_requests_by_route_tokens_and_time_to_first_token(client: httpx.AsyncClient) -> None:
    before = await scrape(client)
    for _ in range(2):
        assert (await client.get("/api/ping")).status_code == 200
    session_id = (await new_conversation(client))["session_id"]
    reply = await stream_reply(client, session_id, "Hello! What is a cat?")
    after = await scrape(client)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("chipi_requests_total", method="GET", path="/api/ping", status_code="200") == 2
    # Labelled by the route template, never by the raw path with its id.
    assert grew("chipi_requests_total", method="GET", path=STREAM_ROUTE, status_code="200") == 1
    assert grew("chipi_request_duration_seconds_count", method="GET", path=STREAM_ROUTE) == 1
    assert session_id not in after
    assert grew("chipi_generated_tokens_total") == reply.final_data["usage"]["completion_tokens"] > 0
    assert grew("chipi_time_to_first_token_seconds_count") == 1
    assert metric(after, "chipi_time_to_first_token_seconds_sum") > 0
    assert metric(after, "chipi_active_generations") == 0
    assert metric(after, "chipi_queued_generations") == 0
    for component in ("database", "model", "speech"):
        assert metric(after, "chipi_ready", component=component) == 1


async def test_the_active_generations_gauge_counts_a_running_reply(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    url = f"/api/conversations/{session_id}/stream"
    async with aconnect_sse(client, "GET", url, params={"prompt": LONG_PROMPT}) as source:
        events = source.aiter_sse()
        await anext(events)  # the reply is being generated
        running = await scrape(client)
        async for _ in events:
            pass
    assert metric(running, "chipi_active_generations") == 1
    assert metric(running, "chipi_queued_generations") == 0
    assert metric(await scrape(client), "chipi_active_generations") == 0


def access_log(path: Path) -> list[dict[str, Any]]:
    """The JSON access log lines in a server's stderr (other log lines are not JSON objects)."""
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "request_id" in record:
                records.append(record)
    return records


def test_health_is_503_while_the_models_load_then_200_and_every_request_is_logged_as_json(
    database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        server = ChipiServer(database_url, stderr=log, CHIPI_LOG_LEVEL="info")
        try:
            server.start(until="/api/ping", poll_seconds=0.02)  # the port opens before the models are loaded
            loading = httpx.get(f"{server.url}/api/health", timeout=5)
            waiting = httpx.get(f"{server.url}/v1/models", timeout=5)
            assert loading.status_code == 503, loading.text
            body = loading.json()
            assert body["status"] == "unavailable" and body["components"]["database"]["state"] == "ready"
            assert "loading" in {body["components"][part]["state"] for part in ("model", "speech")}
            assert set(body["not_ready"]) <= {"model", "speech"} and body["not_ready"]
            if "model" in body["not_ready"]:  # an endpoint that needs the model says why and when to retry
                assert waiting.status_code == 503 and waiting.headers["retry-after"].isdigit()
                assert waiting.json()["error"]["code"] == "not_ready"

            deadline = time.monotonic() + 120
            while (ready := httpx.get(f"{server.url}/api/health", timeout=5)).status_code != 200:
                assert time.monotonic() < deadline, ready.text
                time.sleep(0.1)
            assert ready.json()["status"] == "ok" and ready.json()["not_ready"] == []
            assert {part["state"] for part in ready.json()["components"].values()} == {"ready"}

            traced = httpx.get(f"{server.url}/api/ping", headers={"X-Request-ID": "trace-42"}, timeout=5)
            missing = httpx.get(f"{server.url}/api/no-such-route", timeout=5)
        finally:
            server.stop()

    assert traced.headers["x-request-id"] == "trace-42"  # a caller's id is kept
    generated = missing.headers["x-request-id"]
    assert len(generated) == 32
    records = {record["request_id"]: record for record in access_log(log_path)}
    assert records["trace-42"]["method"] == "GET" and records["trace-42"]["path"] == "/api/ping"
    assert records["trace-42"]["status"] == 200 and records["trace-42"]["client"] == "127.0.0.1"
    assert isinstance(records["trace-42"]["duration_ms"], float | int)
    assert records[generated]["status"] == 404 and records[generated]["path"] == "/api/no-such-route"
    assert records[loading.headers["x-request-id"]]["status"] == 503
    assert '"GET /api/ping HTTP/1.1" 200' not in log_path.read_text()  # uvicorn's own access log is off


@pytest.fixture
def failing_server(database_url: str, tmp_path: Path) -> Iterator[ChipiServer]:
    """A server whose model and whisper model are missing (start() must not wait for a healthy state), with its
    access log as text in tmp_path/server.log."""
    with (tmp_path / "server.log").open("wb") as log:
        server = ChipiServer(
            database_url,
            stderr=log,
            CHIPI_MODEL=str(tmp_path / "no-such-model"),
            CHIPI_WHISPER_MODEL="no-such-whisper",
            CHIPI_LOG_LEVEL="info",
            CHIPI_LOG_FORMAT="text",
        )
        server.start(until="/api/ping")
        try:
            yield server
        finally:
            server.stop()


def test_a_failed_model_load_answers_503_with_the_error(failing_server: ChipiServer, tmp_path: Path) -> None:
    url = failing_server.url
    deadline = time.monotonic() + 60
    while (health := httpx.get(f"{url}/api/health", timeout=5).json())["components"]["model"]["state"] != "failed":
        assert time.monotonic() < deadline, health
        time.sleep(0.1)
    response = httpx.get(f"{url}/api/health", timeout=5)
    assert response.status_code == 503
    assert str(tmp_path / "no-such-model") in health["components"]["model"]["detail"]
    assert health["not_ready"] == ["model", "speech"]

    session_id = httpx.post(f"{url}/api/conversations/new", timeout=5).json()["session_id"]  # no model needed
    reply = httpx.post(f"{url}/api/conversations/{session_id}/message", json={"content": "Hi"}, timeout=5)
    assert reply.status_code == 503 and reply.headers["retry-after"].isdigit()
    assert reply.json()["code"] == "not_ready" and "failed to load" in reply.json()["detail"]
    speech = httpx.post(f"{url}/api/audio/speech", json={"input": "Hi"}, timeout=5)
    assert speech.status_code == 503 and speech.json()["code"] == "not_ready"
    ping = httpx.get(f"{url}/api/ping", timeout=5)
    assert ping.status_code == 200  # still alive
    time.sleep(0.2)  # the log line is written as the response ends
    text_lines = (tmp_path / "server.log").read_text(errors="replace").splitlines()
    assert f'127.0.0.1 - "POST /api/conversations/{session_id}/message" 503' in "\n".join(text_lines)
    assert any(
        line.startswith('127.0.0.1 - "GET /api/ping" 200 ') and line.endswith(f"id={ping.headers['x-request-id']}")
        for line in text_lines
    )


async def test_health_is_503_while_the_database_is_unreachable(
    database_url: str, server: ChipiServer, client: httpx.AsyncClient
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("an SQLite file cannot be made unreachable from outside the server process")
    name = make_url(database_url).database
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            down = await client.get("/api/health")
        finally:
            admin.execute(f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS true')
    up = await client.get("/api/health")
    assert down.status_code == 503
    assert down.json()["not_ready"] == ["database"]
    assert down.json()["components"]["database"]["state"] == "unreachable"
    assert up.status_code == 200 and up.json()["components"]["database"]["state"] == "ready"


async def test_garbage_collection_paused_for_the_start_resumes_when_the_loads_end_even_failed(tmp_path: Path) -> None:
    """`chipi serve` pauses collection while it imports and loads; however the loads end, collection comes back on
    (a server that never collected again would grow for good)."""
    settings = replace(
        Settings.from_env(),
        database_url=f"sqlite+aiosqlite:///{tmp_path}/chipi.db",
        model=str(tmp_path / "no-such-model"),
        whisper_model="no-such-whisper",
    )
    readiness = Readiness(settings, create_db_config(settings))
    gc.disable()
    try:
        readiness.start_loading()
        assert readiness._loader is not None
        await readiness._loader
        assert readiness.chat.error is not None and readiness.speech.error is not None
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()  # the rest of the test session collects as usual
