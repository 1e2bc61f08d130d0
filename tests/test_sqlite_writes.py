"""The server's SQLite connections take turns to write on a lock of their own, not in SQLite's busy handler."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import event, text

from app.db import create_db_config
from app.settings import Settings


async def test_concurrent_write_transactions_take_turns_without_sqlite_waiting(tmp_path: Path) -> None:
    """Twenty transactions that each write, then yield to the event loop before committing (as a request's does while
    the loop serves others), all commit: with SQLite's busy timeout at zero, any of them that met another's write lock
    inside SQLite would fail as `database is locked`."""
    settings = replace(Settings.from_env(), database_url=f"sqlite+aiosqlite:///{tmp_path}/writes.db")
    engine = create_db_config(settings).get_engine()

    def no_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.close()

    event.listen(engine.sync_engine, "connect", no_busy_timeout)  # after the server's own pragmas
    async with engine.begin() as connection:
        await connection.execute(text("CREATE TABLE notes (writer INTEGER, line INTEGER)"))

    async def write(writer: int) -> None:
        async with engine.begin() as connection:
            for line in range(3):
                await connection.execute(
                    text("INSERT INTO notes VALUES (:writer, :line)"), {"writer": writer, "line": line}
                )
                await asyncio.sleep(0.002)
            await connection.execute(
                text("UPDATE notes SET line = line + 10 WHERE writer = :writer"), {"writer": writer}
            )

    try:
        await asyncio.gather(*(write(writer) for writer in range(20)))
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT writer, line FROM notes ORDER BY writer, line"))).all()
    finally:
        await engine.dispose()
    assert [tuple(row) for row in rows] == [(writer, 10 + line) for writer in range(20) for line in range(3)]
