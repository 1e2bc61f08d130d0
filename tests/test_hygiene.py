"""Hygiene: names cannot escape their folders (settings, the API, `chipi ... pull`), error bodies never carry a
traceback, SQL or a path, and no SQL is assembled from strings."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from advanced_alchemy.exceptions import IntegrityError as RepositoryIntegrityError
from advanced_alchemy.exceptions import RepositoryError
from sqlalchemy.exc import DataError, IntegrityError, OperationalError

from app.controllers.errors import describe_error
from app.domain.errors import TooLargeError
from app.domain.names import is_plain_name, is_repo_id
from app.domain.rules import ConversationLimits
from app.settings import Settings, SettingsError
from tests.helpers import connect_socket, new_conversation, next_frame
from tests.server import ROOT

ESCAPING_NAMES = ["../../etc/passwd", "/etc/passwd", "..", ".", "../voices/en_US-joe-medium", "a/b", "a\\b", ""]


@pytest.mark.parametrize("name", [*ESCAPING_NAMES, ".hidden", "a..b", "x" * 200])
def test_a_name_with_any_path_in_it_is_not_plain(name: str) -> None:
    assert not is_plain_name(name)


@pytest.mark.parametrize("name", ["tiny.en", "en_US-joe-medium", "SmolLM2-135M-Instruct", "v1.5"])
def test_plain_names(name: str) -> None:
    assert is_plain_name(name)


def test_repo_ids() -> None:
    assert is_repo_id("HuggingFaceTB/SmolLM2-360M-Instruct")
    for bad in ["owner/..", "../name", "owner/name/extra", "owner", "/name", "owner/", "owner/.x"]:
        assert not is_repo_id(bad), bad


@pytest.mark.parametrize("variable", ["CHIPI_VOICE", "CHIPI_WHISPER_MODEL"])
def test_a_speech_model_setting_that_is_a_path_is_refused(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "../../etc/passwd")
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env()


@pytest.mark.parametrize("quantize", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_quantization_needs_float32_weights(quantize: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIPI_QUANTIZE", quantize)
    monkeypatch.setenv("CHIPI_DTYPE", dtype)
    with pytest.raises(SettingsError, match="CHIPI_DTYPE=float32"):
        Settings.from_env()


def test_activation_bits_are_16_or_8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIPI_ACTIVATION_BITS", "4")
    with pytest.raises(SettingsError, match="CHIPI_ACTIVATION_BITS"):
        Settings.from_env()
    monkeypatch.setenv("CHIPI_ACTIVATION_BITS", "8")
    assert Settings.from_env().activation_bits == 8


def test_a_title_limit_beyond_the_title_column_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHIPI_MAX_TITLE_CHARS", "256")
    with pytest.raises(SettingsError, match="at most 255"):
        Settings.from_env()


def test_conversation_limits() -> None:
    limits = ConversationLimits(max_messages=4, max_chars=100)
    limits.check(4, 100, field="content")
    with pytest.raises(TooLargeError, match="4"):
        limits.check(5, 0, field="content")
    with pytest.raises(TooLargeError, match="100"):
        limits.check(1, 101, field="messages")


# Error bodies

SECRET_MESSAGE = 'relation "message" at /srv/chipi/app/secret.py line 3: SELECT content FROM message'


def _wrapped(repository_error: RepositoryError, cause: Exception) -> RepositoryError:
    try:
        raise repository_error from cause
    except RepositoryError as exc:
        return exc


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError(SECRET_MESSAGE), 500),
        (DataError(SECRET_MESSAGE, None, Exception(SECRET_MESSAGE)), 500),
        # advanced-alchemy wraps every driver error in its IntegrityError or RepositoryError
        (_wrapped(RepositoryIntegrityError(SECRET_MESSAGE), OperationalError(SECRET_MESSAGE, None, Exception())), 503),
        (_wrapped(RepositoryIntegrityError(SECRET_MESSAGE), DataError(SECRET_MESSAGE, None, Exception())), 500),
        (_wrapped(RepositoryIntegrityError(SECRET_MESSAGE), IntegrityError(SECRET_MESSAGE, None, Exception())), 409),
        (_wrapped(RepositoryError(SECRET_MESSAGE), OperationalError(SECRET_MESSAGE, None, Exception())), 503),
    ],
)
def test_unexpected_and_database_errors_say_nothing_of_the_server(error: Exception, status: int) -> None:
    info = describe_error(error)
    assert info.status_code == status
    assert "/srv" not in info.detail and "SELECT" not in info.detail and "secret" not in info.detail


async def test_a_validation_error_names_the_field_not_the_code(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    response = await client.post(f"/api/conversations/{session_id}/message", json={"content": ["not", "text"]})
    assert response.status_code == 400 and response.json()["field"] == "content"
    assert not re.search(r"\.py|/app/|Traceback|site-packages", response.text)


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
async def test_a_seed_torch_cannot_take_is_400_not_a_failed_reply(client: httpx.AsyncClient, seed: int) -> None:
    model = (await client.get("/v1/models")).json()["data"][0]["id"]
    response = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "seed": seed}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "seed"


# Names from clients


@pytest.mark.parametrize("voice", ESCAPING_NAMES[:-1])
async def test_a_voice_name_cannot_reach_outside_voices(client: httpx.AsyncClient, voice: str) -> None:
    response = await client.post("/api/audio/speech", json={"input": "Hello.", "voice": voice})
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["field"] == "voice" and response.json()["code"] == "not_found"


async def test_a_voice_name_in_a_voice_turn_or_a_socket_frame_cannot_either(client: httpx.AsyncClient) -> None:
    session_id = (await new_conversation(client))["session_id"]
    response = await client.post(
        f"/api/conversations/{session_id}/voice",
        params={"reply_audio": "true", "voice": "../../etc/passwd"},
        files={"file": ("a.wav", b"RIFF")},
    )
    assert response.status_code == 404 and response.json()["field"] == "voice", response.text
    async with connect_socket(client, session_id) as socket:
        await socket.send(json.dumps({"type": "audio", "data": "UklGRg==", "voice": "../voices/en_US-joe-medium"}))
        frame = await next_frame(socket)
    assert frame == {"type": "error", "code": "not_found", "detail": frame["detail"]}


@pytest.mark.parametrize("model", ["../../etc/passwd", "../whisper/tiny.en", "/etc/passwd"])
async def test_a_whisper_model_name_cannot_reach_outside_its_folder(client: httpx.AsyncClient, model: str) -> None:
    response = await client.post("/api/audio/transcriptions", files={"file": ("a.wav", b"RIFF")}, data={"model": model})
    assert response.status_code == 404 and response.json()["field"] == "model", response.text


def _chipi(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args",
    [
        ("models", "pull", "owner/.."),
        ("models", "pull", "../../tmp/evil"),
        ("models", "pull", "whisper:../../evil"),
        ("models", "pull", "whisper:/tmp/evil"),
        ("voices", "pull", "../../evil"),
        ("voices", "pull", "/tmp/evil"),
    ],
)
def test_pull_refuses_names_that_are_paths(args: tuple[str, ...]) -> None:
    before = sorted(path.name for path in ROOT.iterdir())
    pulled = _chipi(*args)
    assert pulled.returncode == 1, pulled.stdout + pulled.stderr
    assert pulled.stderr.startswith("chipi: ") and "Traceback" not in pulled.stderr
    assert sorted(path.name for path in ROOT.iterdir()) == before  # nothing written beside models/ or voices/
    assert not Path("/tmp/evil").exists()


def test_a_bad_setting_stops_the_cli_with_a_message_not_a_traceback() -> None:
    listed = _chipi("voices", "list", CHIPI_VOICE="../x")
    assert listed.returncode == 1
    assert listed.stderr.startswith("chipi: CHIPI_VOICE must be a plain name") and "Traceback" not in listed.stderr


# SQL

SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WHERE|PRAGMA)\b")


def _literal_text(node: ast.AST) -> str:
    """The constant string parts of an expression (an f-string's literal parts included)."""
    return " ".join(
        part.value for part in ast.walk(node) if isinstance(part, ast.Constant) and isinstance(part.value, str)
    )


def _has_str_side(node: ast.BinOp) -> bool:
    return any(isinstance(side, ast.Constant) and isinstance(side.value, str) for side in (node.left, node.right))


def _assembled_strings(tree: ast.AST) -> list[ast.AST]:
    """Strings built at run time: f-strings with placeholders, `.format(...)`, and `+` or `%` on strings."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
            found.append(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            found.append(node.func.value)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod) and _has_str_side(node):
            found.append(node)
    return found


def test_no_sql_is_assembled_from_strings_in_the_app() -> None:
    """Every SQL statement in app/ (migrations included) is a literal, values travel as bound parameters: no
    f-string, format() or string arithmetic builds one."""
    offenders = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        for node in _assembled_strings(ast.parse(path.read_text())):
            if SQL_WORDS.search(_literal_text(node)):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_the_sql_check_sees_an_assembled_statement() -> None:
    tree = ast.parse('table = "x"\nquery = f"SELECT * FROM {table}"\nother = "DELETE FROM " + table\n')
    assert [node.lineno for node in _assembled_strings(tree) if SQL_WORDS.search(_literal_text(node))] == [2, 3]
