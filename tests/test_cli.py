"""The `chipi` command as a user runs it: the real CLI (`python -m app`, what the `chipi` script runs) in a
subprocess, against the real model files, a real database and the running test server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from app.settings import DEFAULT_VOICE, DEFAULT_WHISPER_MODEL
from tests.server import ROOT, ChipiServer

NEW_CONVERSATION = re.compile(r"\(new conversation ([0-9a-f-]{36})\)")
CLOSED_PORT_URL = "http://127.0.0.1:9"  # nothing listens on the discard port: an unreachable hub


def chipi(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, "CHIPI_LOG_LEVEL": "warning", **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


def listed(output: str, name: str) -> str:
    """The line of `chipi models list` / `chipi voices list` that names `name`."""
    lines = [line for line in output.splitlines() if re.search(rf"\s{re.escape(name)}\s", line)]
    assert len(lines) == 1, output
    return lines[0]


def test_models_list_shows_the_default_model_and_whisper_checkpoint_as_configured() -> None:
    result = chipi("models", "list")
    assert result.returncode == 0, result.stderr
    model = listed(result.stdout, "SmolLM2-135M-Instruct")
    # configured, with its size: GB once the folder also holds files converted for other CHIPI_QUANTIZE settings
    assert model.startswith("*") and re.search(r"\d+\.\d+ [MG]B", model), model
    whisper = listed(result.stdout, DEFAULT_WHISPER_MODEL)
    assert whisper.startswith("*") and "models/whisper/tiny.en.pt" in whisper


def test_models_list_marks_another_configured_model_as_not_installed() -> None:
    result = chipi("models", "list", CHIPI_MODEL="models/NotHere-1B")
    assert result.returncode == 0, result.stderr
    assert listed(result.stdout, "SmolLM2-135M-Instruct").startswith(" ")
    assert "configured: models/NotHere-1B (not installed here)" in result.stdout


def test_voices_list_shows_the_default_voice() -> None:
    result = chipi("voices", "list")
    assert result.returncode == 0, result.stderr
    voice = listed(result.stdout, DEFAULT_VOICE)
    assert voice.startswith("*") and f"voices/{DEFAULT_VOICE}.onnx" in voice


def test_pulling_what_is_installed_fetches_nothing() -> None:
    model = chipi("models", "pull")
    voice = chipi("voices", "pull")
    assert model.returncode == 0 and "already in models/SmolLM2-135M-Instruct" in model.stdout
    assert voice.returncode == 0 and f"already in voices/{DEFAULT_VOICE}.onnx" in voice.stdout


def test_pulling_from_an_unreachable_hub_fails_with_a_clear_error() -> None:
    model = chipi("models", "pull", "HuggingFaceTB/SmolLM2-360M-Instruct", HF_ENDPOINT=CLOSED_PORT_URL)
    voice = chipi("voices", "pull", "en_GB-alan-low", HF_ENDPOINT=CLOSED_PORT_URL)
    for result in (model, voice):
        assert result.returncode == 1
        assert f"the Hugging Face hub at {CLOSED_PORT_URL} is not reachable" in result.stderr
        assert "Traceback" not in result.stderr
    assert "Only the default model can be fetched without it" in model.stderr
    assert not (ROOT / "models" / "SmolLM2-360M-Instruct").exists()


def test_pulling_a_name_that_is_no_model_is_refused() -> None:
    result = chipi("models", "pull", "not a model")
    assert result.returncode == 1
    assert "neither the default model" in result.stderr


def table_names(database_url: str) -> set[str]:
    url = make_url(database_url)
    engine = create_engine(url.set(drivername="sqlite" if url.drivername.startswith("sqlite") else url.drivername))
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_db_upgrade_creates_the_tables_of_a_fresh_database(fresh_database_url: str) -> None:
    result = chipi("db", "upgrade", DATABASE_URL=fresh_database_url)
    assert result.returncode == 0, result.stderr
    assert "database is up to date" in result.stdout
    assert {"conversation", "message", "alembic_version"} <= table_names(fresh_database_url)
    again = chipi("upgrade-db", DATABASE_URL=fresh_database_url)  # the old name still works, and is idempotent
    assert again.returncode == 0 and "database is up to date" in again.stdout


def reply_text(output: str) -> str:
    """What `chipi chat` printed after `chipi> ` up to the next prompt, without the `[length]`-style marker of a
    reply that did not end by itself."""
    printed = output.split("chipi> ", 1)[1].split("\nyou> ", 1)[0]
    return re.sub(r" \[\w+\]$", "", printed.rstrip()).strip()


def conversation_of(server: ChipiServer, session_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/conversations/{session_id}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_chat_streams_a_reply_into_a_conversation_that_it_can_continue(server: ChipiServer) -> None:
    first = chipi("chat", "--url", server.url, stdin="Hello! What is a cat?\n/quit\n")
    assert first.returncode == 0, first.stderr
    match = NEW_CONVERSATION.search(first.stdout)
    assert match, first.stdout
    session_id = match[1]
    printed = reply_text(first.stdout)
    assert printed

    conversation = conversation_of(server, session_id)
    assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
    assert conversation["messages"][0]["content"] == "Hello! What is a cat?"
    assert conversation["messages"][1]["content"].strip() == printed  # what streamed is what was stored

    second = chipi("chat", "--url", server.url, "--session", session_id, stdin="And a dog?\n/list\n/quit\n")
    assert second.returncode == 0, second.stderr
    assert f"conversation {session_id}" in second.stdout and "(2 messages)" in second.stdout
    assert NEW_CONVERSATION.search(second.stdout) is None
    assert session_id in second.stdout.split("chipi> ", 1)[1]  # /list shows it
    conversation = conversation_of(server, session_id)
    assert [m["content"] for m in conversation["messages"] if m["role"] == "user"] == [
        "Hello! What is a cat?",
        "And a dog?",
    ]


def test_chat_with_an_unknown_session_says_so(server: ChipiServer) -> None:
    result = chipi("chat", "--url", server.url, "--session", "00000000-0000-0000-0000-000000000000", stdin="/quit\n")
    assert result.returncode == 1
    assert "HTTP 404" in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_during_a_reply_stops_it_on_the_server(server: ChipiServer) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "app", "chat", "--url", server.url],
        cwd=ROOT,
        env={**os.environ, "CHIPI_LOG_LEVEL": "warning"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(b"Write a long story about a dragon who learns to bake bread.\n")
    process.stdin.flush()
    os.set_blocking(process.stdout.fileno(), False)
    output = b""
    deadline = time.monotonic() + 120
    while b"chipi> " not in output or not output.split(b"chipi> ", 1)[1].strip():  # the reply has begun
        assert time.monotonic() < deadline and process.poll() is None, output
        output += process.stdout.read() or b""
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    rest, errors = process.communicate(b"/quit\n", timeout=60)
    output += rest
    assert process.returncode == 0, errors
    text = output.decode()
    assert "[stopped]" in text
    match = NEW_CONVERSATION.search(text)
    assert match, text
    reply = conversation_of(server, match[1])["messages"][-1]
    assert reply["role"] == "assistant" and reply["status"] == "cancelled"
    # The server may have written a token or two more before the stop arrived.
    assert reply["content"].strip().startswith(reply_text(text))
