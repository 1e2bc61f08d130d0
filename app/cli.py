"""The `chipi` command (also `python -m app`): serve, fetch the default models, migrate the database."""

from __future__ import annotations

import argparse
import logging

from app.settings import get_settings


def _serve(_: argparse.Namespace) -> None:
    import uvicorn

    from app.assets import ensure_default_assets

    settings = get_settings()
    ensure_default_assets(settings)
    # An `audio` WebSocket frame carries a recording in base64 (4/3 of its size): let the largest allowed one in.
    ws_max_size = max(16 * 1024 * 1024, settings.max_audio_bytes * 4 // 3 + 64 * 1024)
    uvicorn.run(
        "app.asgi:app",
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=ws_max_size,
        access_log=False,  # Chipi writes its own access log (app/observability.py)
    )


def _fetch_models(_: argparse.Namespace) -> None:
    from app.assets import ensure_default_assets

    ensure_default_assets(get_settings())


def _upgrade_database(_: argparse.Namespace) -> None:
    from app.db import upgrade_database_sync

    upgrade_database_sync(get_settings())
    print("database is up to date")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="chipi", description="Chipi, a local chatbot backend")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="fetch the default models if missing, migrate, and serve").set_defaults(
        run=_serve
    )
    commands.add_parser("fetch-models", help="fetch and convert the default models (models/, voices/)").set_defaults(
        run=_fetch_models
    )
    commands.add_parser("upgrade-db", help="apply database migrations (serve does this too)").set_defaults(
        run=_upgrade_database
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=get_settings().log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    args.run(args)
