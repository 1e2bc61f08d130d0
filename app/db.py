"""Database wiring: the advanced-alchemy config, SQLite pragmas, and Alembic migrations."""

from __future__ import annotations

import asyncio
import select
import sqlite3
import weakref
from pathlib import Path
from typing import Any

import anyio
from advanced_alchemy.alembic.commands import AlembicCommands
from advanced_alchemy.extensions.litestar import AlembicAsyncConfig, AsyncSessionConfig, SQLAlchemyAsyncConfig
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, NullPool
from sqlalchemy.util import await_

from app.settings import Settings

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
SQLITE_BUSY_TIMEOUT_SECONDS = 10  # how long a write waits for another's, in SQLite (busy_timeout) as on SQLiteWriteLock

# What SQLAlchemy raises when the database cannot be reached or stops answering (a pool timeout included).
_UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, PoolTimeoutError)


def database_unavailable(exc: BaseException) -> bool:
    """True when `exc`, or an error it was raised from, says the database is unreachable rather than the request
    wrong (advanced-alchemy re-raises SQLAlchemy's errors as its own, so the chain is followed)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, _UNAVAILABLE) or (isinstance(current, DBAPIError) and current.connection_invalidated):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _enable_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")  # ON DELETE CASCADE from conversation to messages
    cursor.execute("PRAGMA journal_mode=WAL")  # readers do not wait for the writer of a streaming reply
    cursor.execute("PRAGMA busy_timeout=10000")  # SQLITE_BUSY_TIMEOUT_SECONDS
    cursor.close()


class SQLiteWriteLock:
    """One writer at a time among the server's SQLite connections, waiting on an asyncio lock.

    SQLite lets one connection write at a time; the others wait in its busy handler, which sleeps 1, 2, 5, 10 ms and
    longer between tries, while the writer's transaction stays open across the event loop's turns. Eight clients
    opening conversations at once waited up to 150 ms for locks held a few ms each (with no busy timeout, 5 of their
    8 requests failed as locked). A connection takes this lock at its first write statement (SQLite takes its own
    there) and gives it back when it returns to the pool, after its COMMIT or ROLLBACK, so the next writer goes on at
    once. Other processes (the CLI) still meet SQLite's own lock and busy timeout."""

    _WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE")

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def listen(self, engine: AsyncEngine) -> None:
        event.listen(engine.sync_engine, "before_cursor_execute", self._before_execute)
        event.listen(engine.sync_engine.pool, "checkin", self._release)
        event.listen(engine.sync_engine.pool, "invalidate", self._release)

    def _before_execute(self, connection: Any, _cursor: Any, statement: str, *_: Any) -> None:
        info = connection.connection.info  # the pooled connection's, which the pool events see too
        if "write_lock" in info or not statement.lstrip()[:7].upper().startswith(self._WRITES):
            return
        lock = self._locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
        try:
            await_(asyncio.wait_for(lock.acquire(), SQLITE_BUSY_TIMEOUT_SECONDS))
        except TimeoutError:
            raise OperationalError(statement, None, sqlite3.OperationalError("database is locked")) from None
        info["write_lock"] = lock

    @staticmethod
    def _release(_dbapi_connection: Any, record: ConnectionPoolEntry, *_: Any) -> None:
        lock = record.info.pop("write_lock", None)
        if lock is not None:
            lock.release()


def _replace_connections_the_server_closed(_dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
    """Pool checkout: an idle connection with something to read was closed by the server (a restart or a terminated
    backend sends its notice, then closes the socket); raising makes the pool replace it, so no request fails on it.
    This is pool_pre_ping's guard without its round trip."""
    connection = record.driver_connection
    if connection is None or connection.closed or select.select([connection.fileno()], [], [], 0)[0]:
        raise DisconnectionError("the database server closed this pooled connection")


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
    if not is_sqlite:
        # libpq waits forever for a connection by default; a database that is down must fail requests fast.
        engine_options["connect_args"] = {"connect_timeout": max(1, round(settings.database_connect_timeout_seconds))}
        if pooled:
            # Connections past pool_size are closed when returned: with a pool smaller than the usual number of
            # concurrent requests, every request beyond it would open (and PostgreSQL fork) a connection of its own.
            engine_options.update(pool_size=20, max_overflow=10)
    engine = create_async_engine(url, **engine_options)
    if is_sqlite:
        event.listen(engine.sync_engine, "connect", _enable_sqlite_pragmas)
        SQLiteWriteLock().listen(engine)
    elif pooled:
        event.listen(engine.sync_engine, "checkout", _replace_connections_the_server_closed)
    return SQLAlchemyAsyncConfig(
        engine_instance=engine,
        session_config=AsyncSessionConfig(expire_on_commit=False),
        set_default_exception_handler=False,  # every error goes through app/controllers/errors.py
        alembic_config=AlembicAsyncConfig(script_location=str(MIGRATIONS_DIR), version_table_name="alembic_version"),
        create_all=False,
    )


def autocommit_engine(engine: AsyncEngine) -> AsyncEngine:
    """`engine`'s pool, with each statement its own transaction: for reads, which then cost no BEGIN and ROLLBACK
    round trips (under READ COMMITTED each statement sees its own snapshot anyway)."""
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def upgrade_database_sync(settings: Settings) -> None:
    """Apply every pending migration; Alembic runs its own event loop, so call this outside one."""
    AlembicCommands(create_db_config(settings, pooled=False)).upgrade("head")


async def upgrade_database(settings: Settings) -> None:
    await anyio.to_thread.run_sync(upgrade_database_sync, settings)
