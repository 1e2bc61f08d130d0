"""Database wiring: the advanced-alchemy config, SQLite pragmas, and Alembic migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
from advanced_alchemy.alembic.commands import AlembicCommands
from advanced_alchemy.extensions.litestar import AlembicAsyncConfig, AsyncSessionConfig, SQLAlchemyAsyncConfig
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from app.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _enable_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE from conversation to messages
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer of a streaming reply
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def _prepare_sqlite_folder(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).parent.mkdir(parents=True, exist_ok=True)


def create_db_config(settings: Settings, *, pooled: bool = True) -> SQLAlchemyAsyncConfig:
    """The engine and session factory for `DATABASE_URL` (SQLite by default, PostgreSQL via psycopg 3)."""
    url = settings.database_url
    is_sqlite = url.startswith("sqlite")
    if is_sqlite:
        _prepare_sqlite_folder(url)
    engine_options: dict[str, Any] = {} if pooled else {"poolclass": NullPool}
    if not is_sqlite and pooled:
        engine_options.update(pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_async_engine(url, **engine_options)
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", _enable_sqlite_pragmas)
    return SQLAlchemyAsyncConfig(
        engine_instance=engine,
        session_config=AsyncSessionConfig(expire_on_commit=False),
        alembic_config=AlembicAsyncConfig(script_location=str(MIGRATIONS_DIR), version_table_name="alembic_version"),
        create_all=False,
        set_default_exception_handler=False,  # repository errors go through Chipi's one mapper too
    )


def upgrade_database_sync(settings: Settings) -> None:
    """Apply every pending migration; Alembic runs its own event loop, so call this outside one."""
    AlembicCommands(create_db_config(settings, pooled=False)).upgrade("head")


async def upgrade_database(settings: Settings) -> None:
    await anyio.to_thread.run_sync(upgrade_database_sync, settings)
