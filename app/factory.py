"""The Litestar application factory and its lifespan (migrations, the model, running replies)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from advanced_alchemy.extensions.litestar import SQLAlchemyPlugin
from advanced_alchemy.extensions.litestar.providers import create_service_provider
from litestar import Litestar, Router
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from app.controllers.audio import AudioController, VoiceChatController
from app.controllers.auth import PUBLIC, SECURITY_COMPONENTS, ApiKeyAuthMiddleware, provide_owner
from app.controllers.conversations import ConversationController
from app.controllers.dependencies import resolve_dependencies_in_turn
from app.controllers.errors import exception_handlers
from app.controllers.openai import OpenAIController
from app.controllers.rate_limit import RateLimitMiddleware
from app.controllers.socket import chat_socket
from app.controllers.system import MetricsController, SystemController
from app.db import autocommit_engine, create_db_config, upgrade_database
from app.observability import RequestLog, configure_access_log, prometheus_config, watch_readiness
from app.repositories.reads import ConversationReads
from app.services.chat import ChatService
from app.services.conversations import ConversationService
from app.services.keys import Authenticator
from app.services.pages import ConversationPages
from app.services.readiness import Readiness
from app.services.speech import SpeechService, VoiceChatService
from app.settings import Settings, get_settings

logger = logging.getLogger("app")

FORM_OVERHEAD_BYTES = 64 * 1024
STATIC_DIR = Path(__file__).parent / "static"
SCHEMA_PATH = "/schema"
# Headers a page on another origin (CHIPI_CORS_ORIGINS) may read from a response.
CORS_EXPOSED_HEADERS = ["X-Request-ID", "Retry-After", "WWW-Authenticate", "X-Sample-Rate", "Content-Disposition"]


WEBSOCKET_DOC = """A local chatbot backend: stored conversations, replies streamed from a local model.

**WebSocket** `/api/conversations/{session_id}/ws`: JSON frames named by `type`.
Client: `message` {content, max_tokens?, temperature?, top_p?, thinking?}, `regenerate` {message_id?},
`stop` {}, `resume` {last_seq}. Server: `user_message` {message}, `token` {text, seq}, `reasoning` {text, seq},
`done` {message, usage, finish_reason, seq}, `error` {code, detail}, `heartbeat` {}.
While API keys are in use the socket needs one too: `Authorization: Bearer KEY`, or `?api_key=KEY` from a browser.
Without a valid key it gets an `error` frame (`unauthorized`) and is closed with code 4401; another owner's
conversation, like an unknown one, gets `not_found` and code 4404.
A malformed frame gets an `error` frame and the socket stays usable; a client that reconnects sends `resume` with
the last `seq` it saw and receives every later event exactly once, then the live rest.
Voice: client `audio` {data (base64 recording), format?, language?, reply_audio? (default true), voice?, generation
options}; server `transcript` {text, language, duration}, then the reply as for `message`, with `audio` {index,
text, data (base64 WAV), format} for each sentence as soon as it is complete, and `audio_done` {count} at the end.
"""


# These raise NotReadyError (503 with Retry-After) while the model or the speech models load.
def _provide_chat(state: State) -> ChatService:
    return state.readiness.chat.get()  # type: ignore[no-any-return]


def _provide_speech(state: State) -> SpeechService:
    return state.readiness.speech.get()  # type: ignore[no-any-return]


def _provide_voice_chat(state: State) -> VoiceChatService:
    return state.readiness.voice_chat()  # type: ignore[no-any-return]


def _provide_readiness(state: State) -> Readiness:
    return state.readiness  # type: ignore[no-any-return]


def _provide_settings(state: State) -> Settings:
    return state.settings  # type: ignore[no-any-return]


def _reader_provider(engine: AsyncEngine) -> Callable[[], AsyncIterator[ConversationService]]:
    """The `reader` dependency: a ConversationService for handlers that only read, its statements each their own
    transaction (no BEGIN or ROLLBACK round trips). Handlers that write take `conversations`."""
    reads = autocommit_engine(engine)

    async def provide_reader() -> AsyncIterator[ConversationService]:
        async with AsyncSession(reads, expire_on_commit=False) as session:
            yield ConversationService(session=session)

    return provide_reader


def _pages_provider(engine: AsyncEngine) -> Callable[[], ConversationPages]:
    """The `pages` dependency: one ConversationPages for the app (it keeps nothing of a request)."""
    pages = ConversationPages(ConversationReads(engine))

    def provide_pages() -> ConversationPages:
        return pages

    return provide_pages


def _cors_config(settings: Settings) -> CORSConfig | None:
    """Browsers on these origins may call the API (the key goes in the Authorization header, not a cookie)."""
    if not settings.cors_origins:
        return None
    return CORSConfig(allow_origins=list(settings.cors_origins), expose_headers=CORS_EXPOSED_HEADERS)


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app for `settings` (by default, those of the environment)."""
    settings = settings or get_settings()
    resolve_dependencies_in_turn()
    db_config = create_db_config(settings)
    authenticator = Authenticator(settings.auth, db_config)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await upgrade_database(settings)
        # The server accepts connections at once; the models load in the background (see Readiness).
        app.state.readiness = readiness = Readiness(settings, db_config)
        watch_readiness(readiness)
        readiness.start_loading()
        try:
            yield
        finally:
            await readiness.shutdown()
            await db_config.get_engine().dispose()

    configure_access_log(settings.log_level)
    middleware: list[Any] = [prometheus_config().middleware, ApiKeyAuthMiddleware(authenticator)]
    if settings.rate_limit:
        middleware.append(RateLimitMiddleware(settings.rate_limit))
    # Recordings arrive as multipart forms: room for the largest allowed file and the form around it.
    audio_body_bytes = max(settings.max_body_bytes, settings.max_audio_bytes + FORM_OVERHEAD_BYTES)
    app = Litestar(
        route_handlers=[
            SystemController,
            MetricsController,
            ConversationController,
            OpenAIController,
            Router("/", route_handlers=[AudioController, VoiceChatController], request_max_body_size=audio_body_bytes),
            chat_socket,
            # The web chat page at `/` (plain files, no build step); routes above take precedence over its paths.
            create_static_files_router(
                path="/", directories=[STATIC_DIR], html_mode=True, name="web", opt={PUBLIC: True}
            ),
        ],
        plugins=[SQLAlchemyPlugin(config=db_config)],
        dependencies={
            "conversations": Provide(create_service_provider(ConversationService)),
            "reader": Provide(_reader_provider(db_config.get_engine())),
            "pages": Provide(_pages_provider(db_config.get_engine()), sync_to_thread=False),
            "chat": Provide(_provide_chat, sync_to_thread=False),
            "speech": Provide(_provide_speech, sync_to_thread=False),
            "voice_chat": Provide(_provide_voice_chat, sync_to_thread=False),
            "settings": Provide(_provide_settings, sync_to_thread=False),
            "readiness": Provide(_provide_readiness, sync_to_thread=False),
            "owner": Provide(provide_owner, sync_to_thread=False),
        },
        # Prometheus outermost, so refused requests are counted too; the rate limit after authentication, so only
        # a valid key has a budget of its own.
        middleware=middleware,
        cors_config=_cors_config(settings),
        state=State({"settings": settings}),
        lifespan=[lifespan],
        request_max_body_size=settings.max_body_bytes,  # larger is a 413
        exception_handlers=exception_handlers,
        openapi_config=OpenAPIConfig(
            title="Chipi",
            version="0.1.0",
            description=WEBSOCKET_DOC,
            path=SCHEMA_PATH,
            render_plugins=[SwaggerRenderPlugin()],
            components=SECURITY_COMPONENTS,
            openapi_router=Router(SCHEMA_PATH, route_handlers=[], include_in_schema=False, opt={PUBLIC: True}),
        ),
    )
    # Around the whole ASGI handler rather than as route middleware, so unrouted requests (404, 405) are logged too.
    app.asgi_handler = RequestLog(app.asgi_handler, json_format=settings.log_format == "json")
    return app
