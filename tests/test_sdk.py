"""A Python client generated from the served OpenAPI schema works end to end."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import ChipiServer


def test_a_generated_client_drives_the_api(server: ChipiServer, tmp_path: Path) -> None:
    package = tmp_path / "chipi_sdk"
    bin_dir = Path(sys.executable).parent
    subprocess.run(
        [
            str(bin_dir / "openapi-python-client"),
            "generate",
            "--url",
            f"{server.url}/schema/openapi.json",
            "--meta",
            "none",
            "--output-path",
            str(package),
        ],
        check=True,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},  # its ruff post-hook
        capture_output=True,
    )
    sys.path.insert(0, str(tmp_path))
    try:
        sdk = importlib.import_module("chipi_sdk")
        api = importlib.import_module("chipi_sdk.api.conversations")
        models = importlib.import_module("chipi_sdk.models")
        client = sdk.Client(base_url=server.url, raise_on_unexpected_status=True, timeout=120)
        with client:
            created = importlib.import_module("chipi_sdk.api.conversations.create_conversation").sync(
                client=client, body=models.ConversationCreate(title="From the SDK")
            )
            assert isinstance(created, models.ConversationCreated) and created.title == "From the SDK"
            session_id = str(created.session_id)
            send = importlib.import_module(f"{api.__name__}.send_message")
            exchange = send.sync(session_id, client=client, body=models.MessageCreate(content="Hello!", max_tokens=8))
            assert isinstance(exchange, models.MessageExchange) and exchange.assistant_message.content
            get = importlib.import_module(f"{api.__name__}.get_conversation")
            detail = get.sync(session_id, client=client)
            assert [m.content for m in detail.messages] == ["Hello!", exchange.assistant_message.content]
            rename = importlib.import_module(f"{api.__name__}.rename_conversation")
            renamed = rename.sync(session_id, client=client, body=models.TitleUpdate(title="Renamed by SDK"))
            assert renamed.title == "Renamed by SDK"
            delete = importlib.import_module(f"{api.__name__}.delete_conversation")
            assert isinstance(delete.sync(session_id, client=client), models.ConversationDeleted)
            missing = get.sync(session_id, client=client)
            assert isinstance(missing, models.ErrorBody) and missing.status_code == 404
    finally:
        sys.path.remove(str(tmp_path))
        for name in [n for n in sys.modules if n == "chipi_sdk" or n.startswith("chipi_sdk.")]:
            del sys.modules[name]


@pytest.mark.parametrize("path", ["/schema/openapi.json"])
def test_every_route_has_an_operation_id_and_documented_errors(server: ChipiServer, path: str) -> None:
    import httpx

    schema = httpx.get(f"{server.url}{path}").json()
    for route, item in schema["paths"].items():
        for method, operation in item.items():
            assert operation.get("operationId"), (method, route)
            has_input = operation.get("parameters") or operation.get("requestBody")
            if has_input:
                errors = [status for status in operation["responses"] if status.startswith(("4", "5"))]
                assert "400" in errors, (method, route)
                for status in errors:
                    ref = operation["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith(("ErrorBody", "OpenAIErrorBody")), (method, route, status)
