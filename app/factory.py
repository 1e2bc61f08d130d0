"""The Litestar application factory and its lifespan (migrations, the model, running replies)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from advanced_alchemy.extensions.litestar import SQLAlchemyPlugin
from advanced_alchemy.extensions.litestar.providers import create_service_provider
from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin

from app.controllers.conversations import ConversationController
from app.controllers.errors import exception_handlers
from app.controllers.socket import chat_socket
from app.controllers.system import SystemController
from app.db import create_db_config, upgrade_database
from app.services.chat import ChatService
from app.services.conversations import ConversationService
from app.services.model import ModelService
from app.settings import Settings, get_settings

logger = logging.getLogger("app")


WEBSOCKET_DOC = """A local chatbot backend: stored conversations, replies streamed from a local model.

**WebSocket** `/api/conversations/{session_id}/ws`: JSON frames named by `type`.
Client: `message` {content, max_tokens?, temperature?, top_p?, thinking?}, `regenerate` {message_id?},
`stop` {}, `resume` {last_seq}. Server: `user_message` {message}, `token` {text, seq}, `reasoning` {text, seq},
`done` {message, usage, finish_reason, seq}, `error` {code, detail}, `heartbeat` {}.
A malformed frame gets an `error` frame and the socket stays usable; a client that reconnects sends `resume` with
the last `seq` it saw and receives every later event exactly once, then the live rest.
"""


def _provide_chat(state: State) -> ChatService:
    return state.chat  # type: ignore[no-any-return]


def _provide_settings(state: State) -> Settings:
    return state.settings  # type: ignore[no-any-return]


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the app for `settings` (by default, those of the environment)."""
    settings = settings or get_settings()
    db_config = create_db_config(settings)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await upgrade_database(settings)
        async with ConversationService.new(config=db_config) as conversations:
            interrupted = await conversations.finish_interrupted_replies()
        if interrupted:
            logger.warning("marked %d reply(ies) interrupted by an earlier stop as error", interrupted)
        model = await anyio.to_thread.run_sync(ModelService.load, settings)
        app.state.chat = ChatService(model, db_config, settings)
        try:
            yield
        finally:
            await app.state.chat.shutdown()
            model.close()
            await db_config.get_engine().dispose()

    return Litestar(
        route_handlers=[SystemController, ConversationController, chat_socket],
        plugins=[SQLAlchemyPlugin(config=db_config)],
        dependencies={
            "conversations": Provide(create_service_provider(ConversationService)),
            "chat": Provide(_provide_chat, sync_to_thread=False),
            "settings": Provide(_provide_settings, sync_to_thread=False),
        },
        state=State({"settings": settings}),
        lifespan=[lifespan],
        exception_handlers=exception_handlers,
        openapi_config=OpenAPIConfig(
            title="Chipi",
            version="0.1.0",
            description=WEBSOCKET_DOC,
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
    )
