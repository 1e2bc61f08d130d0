"""Test fixtures: a real Chipi server (uvicorn, the real default model) per database, SQLite and PostgreSQL.

Every test that takes `client` runs once against each database. PostgreSQL tests skip with a reason when no
server answers at CHIPI_TEST_POSTGRES_URL, unless CHIPI_TEST_REQUIRE_POSTGRES=1 (as in CI), where they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from app.assets import ensure_default_assets
from app.services import kernels
from app.settings import Settings
from tests.server import LONG_REPLY_TOKENS, TEST_MAX_NEW_TOKENS, ChipiServer

POSTGRES_ADMIN_URL = os.environ.get("CHIPI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_POSTGRES = os.environ.get("CHIPI_TEST_REQUIRE_POSTGRES") == "1"


@pytest.fixture(scope="session", autouse=True)
def default_model() -> None:
    """The real default models (LLM, whisper, Piper voice), fetched and converted once (as `make run` does), and
    Chipi's CPU kernels built once, before any server starts (each would otherwise wait for the first build)."""
    ensure_default_assets(Settings.from_env())
    kernels.available()


def _postgres_database() -> Iterator[str]:
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        if REQUIRE_POSTGRES:
            pytest.fail(f"PostgreSQL is required but not reachable at {POSTGRES_ADMIN_URL}: {exc}")
        pytest.skip(f"no PostgreSQL server at {POSTGRES_ADMIN_URL} ({exc}); set CHIPI_TEST_POSTGRES_URL")
    name = f"chipi_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            admin_url = make_url(POSTGRES_ADMIN_URL)
            yield admin_url.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _new_database(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if kind == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "chipi.db"
        yield f"sqlite+aiosqlite:///{path}"
    else:
        yield from _postgres_database()


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database of each kind for the session."""
    yield from _new_database(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def module_database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database of each kind for one test module, for a server of its own with other settings."""
    yield from _new_database(request.param, tmp_path_factory)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database of each kind that no server has migrated, for one test (a SQLite file in a folder that does
    not exist yet)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'fresh' / 'chipi.db'}"
    else:
        yield from _postgres_database()


@pytest.fixture(scope="session")
def server(database_url: str) -> Iterator[ChipiServer]:
    """One running server per database, shared by the tests of that database."""
    with ChipiServer(database_url) as running:
        yield running


@pytest.fixture
async def client(server: ChipiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="session")
def long_reply_server(database_url: str) -> Iterator[ChipiServer]:
    """A server whose long replies outlast the disconnect grace period on any CPU (the test server's 160 tokens take
    0.6 s at 250 tokens/s), for tests of what happens to a reply nobody is reading any more: they expect it
    cancelled at the grace period's end, so no machine waits for its LONG_REPLY_TOKENS."""
    with ChipiServer(database_url, CHIPI_MAX_NEW_TOKENS=str(LONG_REPLY_TOKENS)) as running:
        yield running


@pytest.fixture
async def long_reply_client(long_reply_server: ChipiServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=long_reply_server.url, timeout=60) as http:
        yield http


@pytest.fixture
def max_new_tokens() -> int:
    return TEST_MAX_NEW_TOKENS
