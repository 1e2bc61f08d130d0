"""Schemathesis fuzzes every operation of the OpenAPI schema a real server serves (`/schema/openapi.json`).

Checked for every response: no 5xx, a documented status code, a documented content type, a body that matches the
documented schema, and documented headers. Schemathesis' examples, coverage (boundary and invalid values) and fuzzing
phases run, both valid and invalid input, with CHIPI_FUZZ_EXAMPLES cases per operation (default 25) and a fixed seed so
that CI runs the same cases every time; set CHIPI_FUZZ_SEED to explore others. This runs schemathesis' own command
line (`st run`), the same a developer would run by hand; a failure prints its report, with a curl command per failure.

The server generates at most 4 tokens per reply and speaks at most 200 characters, so the operations that run the
model or Piper answer quickly. Real conversation and message ids are mixed into the generated path parameters, and
the served model's name into `/v1` requests (tests/fuzz_hooks.py), so the fuzzer reaches past the 404s.

Not fuzzed: the chat WebSocket (not part of OpenAPI). Streamed and binary bodies (SSE, NDJSON, audio, Markdown, plain
text) are checked for status and content type; they are not JSON, so there is no body schema to check them against.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.server import ROOT, ChipiServer

FUZZ_EXAMPLES = os.environ.get("CHIPI_FUZZ_EXAMPLES", "25")
FUZZ_SEED = os.environ.get("CHIPI_FUZZ_SEED", "20261127")
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
]
ST = Path(sys.executable).with_name("st")


@pytest.fixture(scope="module")
def fuzz_server(module_database_url: str) -> Iterator[ChipiServer]:
    with ChipiServer(
        module_database_url,
        CHIPI_MAX_NEW_TOKENS="4",
        CHIPI_MAX_SPEECH_CHARS="200",
        CHIPI_MAX_AUDIO_SECONDS="5",
        CHIPI_MAX_GENERATION_SECONDS="10",
    ) as server:
        yield server


def _seed_conversations(url: str) -> dict[str, str]:
    """Three conversations with one exchange each; their ids and the model's name, as the hooks' environment."""
    session_ids, message_ids = [], []
    with httpx.Client(base_url=url, timeout=60) as http:
        for index in range(3):
            session_id = http.post("/api/conversations/new", params={"title": f"fuzz {index}"}).json()["session_id"]
            exchange = http.post(f"/api/conversations/{session_id}/message", json={"content": "Hello"}).json()
            session_ids.append(session_id)
            message_ids += [exchange["user_message"]["id"], exchange["assistant_message"]["id"]]
        model = http.get("/v1/models").json()["data"][0]["id"]
    return {
        "CHIPI_FUZZ_SESSION_IDS": ",".join(session_ids),
        "CHIPI_FUZZ_MESSAGE_IDS": ",".join(message_ids),
        "CHIPI_FUZZ_MODEL": model,
    }


def test_every_response_is_as_documented(fuzz_server: ChipiServer, tmp_path: Path) -> None:
    env = {
        **os.environ,
        **_seed_conversations(fuzz_server.url),
        "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
        "PYTHONPATH": str(ROOT),
    }
    command = [
        str(ST),
        "run",
        f"{fuzz_server.url}/schema/openapi.json",
        f"--checks={','.join(CHECKS)}",
        f"--max-examples={FUZZ_EXAMPLES}",
        f"--seed={FUZZ_SEED}",
        "--phases=examples,coverage,fuzzing",
        "--mode=all",
        "--workers=2",
        "--request-timeout=60",
        "--generation-database=none",
        "--no-color",
    ]
    started = time.monotonic()
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    report = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(report)
    print(f"schemathesis ran in {time.monotonic() - started:.0f}s:\n{report[-3000:]}")
    assert run.returncode == 0, report[-20000:]
    assert "Operations:" in report and "Tested: " in report  # it did run against the schema
