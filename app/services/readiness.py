"""What the server loads after it starts accepting connections, and whether each part it needs is ready.

The model and the speech models load in the background, so `/api/ping` and `/api/health` answer at once. This is
the one place that decides what a request gets while a part is not ready: `Part.get` raises NotReadyError (503 with
Retry-After), and `/api/health` reports each part with its state (a load error included).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import TYPE_CHECKING, Generic, TypeVar

from advanced_alchemy.config import SQLAlchemyAsyncConfig
from sqlalchemy import text

from app.domain.errors import NotReadyError
from app.domain.schemas import ComponentHealth, Health
from app.services.chat import ChatService
from app.services.own_thread import run_in_own_thread
from app.services.remote import RemoteModelService
from app.services.speech import SpeechService, VoiceChatService
from app.settings import Settings

if TYPE_CHECKING:
    from app.services.model import ModelService

logger = logging.getLogger(__name__)

T = TypeVar("T")

LOADING_RETRY_AFTER_SECONDS = 5
FAILED_RETRY_AFTER_SECONDS = 60  # a failed load needs an operator; clients need not hammer
DATABASE_CHECK_SECONDS = 3.0


class Part(Generic[T]):
    """A part loaded in the background: its value once loaded, or why it is not there."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.value: T | None = None
        self.error: str | None = None

    @property
    def ready(self) -> bool:
        return self.value is not None

    def get(self) -> T:
        """The loaded value; NotReadyError while it loads or after it failed to load."""
        if self.value is not None:
            return self.value
        if self.error is not None:
            # Not the error itself: it may name files on the server. /api/health and the log have it for the operator.
            raise NotReadyError(
                f"the {self.name} failed to load; /api/health and the server log say why", FAILED_RETRY_AFTER_SECONDS
            )
        raise NotReadyError(f"the {self.name} is still loading; try again shortly", LOADING_RETRY_AFTER_SECONDS)

    @property
    def health(self) -> ComponentHealth:
        if self.value is not None:
            return ComponentHealth("ready")
        if self.error is not None:
            return ComponentHealth("failed", self.error)
        return ComponentHealth("loading")


class Readiness:
    """Loads the model (as the ChatService that uses it) and the speech models, and checks the database."""

    def __init__(self, settings: Settings, db_config: SQLAlchemyAsyncConfig) -> None:
        self._settings = settings
        self._db_config = db_config
        self.chat: Part[ChatService] = Part("model")
        self.speech: Part[SpeechService] = Part("speech models")
        self._voice_chat: VoiceChatService | None = None
        self._model: ModelService | RemoteModelService | None = None
        self._loader: asyncio.Task[None] | None = None
        self.database_ready = False

    def start_loading(self) -> None:
        self._loader = asyncio.create_task(self._load())

    async def _load(self) -> None:
        """The model and the speech models, side by side: each is ready (and reported so) when its own load ends."""
        try:
            await asyncio.gather(self._load_model(), self._load_speech())
        finally:
            _resume_garbage_collection()

    async def _load_model(self) -> None:
        try:
            if self._settings.remote_base_url:
                self._model = await RemoteModelService.connect(self._settings)
            else:
                # Threads of their own (see app/services/own_thread.py); cancelling abandons a load, it runs on.
                self._model = await run_in_own_thread(_load_model, self._settings, abandon_on_cancel=True)
            chat = ChatService(self._model, self._db_config, self._settings)
            chat.start()
            self.chat.value = chat
            logger.info("model ready: %s on %s", self._model.name, self._model.device)
        except Exception as exc:
            self.chat.error = str(exc) or type(exc).__name__
            logger.exception("the model failed to load")

    async def _load_speech(self) -> None:
        try:
            self.speech.value = await run_in_own_thread(SpeechService.load, self._settings, abandon_on_cancel=True)
        except Exception as exc:
            self.speech.error = str(exc) or type(exc).__name__
            logger.exception("the speech models failed to load")

    def voice_chat(self) -> VoiceChatService:
        """Voice chat needs both the model and the speech models."""
        chat, speech = self.chat.get(), self.speech.get()
        if self._voice_chat is None:
            self._voice_chat = VoiceChatService(chat, speech)
        return self._voice_chat

    async def _database_health(self) -> ComponentHealth:
        try:
            async with asyncio.timeout(DATABASE_CHECK_SECONDS), self._db_config.get_engine().connect() as connection:
                await connection.execute(text("SELECT 1"))
        except Exception as exc:
            self.database_ready = False
            detail = f"no answer within {DATABASE_CHECK_SECONDS}s" if isinstance(exc, TimeoutError) else str(exc)
            logger.error("database unreachable: %s", detail)
            return ComponentHealth("unreachable", detail.splitlines()[0] if detail else type(exc).__name__)
        self.database_ready = True
        return ComponentHealth("ready")

    async def health(self) -> Health:
        """Each part's state; `status` is `ok` only when every part is ready."""
        components = {
            "database": await self._database_health(),
            "model": self.chat.health,
            "speech": self.speech.health,
        }
        not_ready = [name for name, part in components.items() if part.state != "ready"]
        chat = self.chat.value
        return Health(
            status="unavailable" if not_ready else "ok",
            model=chat.model.name if chat else self._configured_model_name(),
            device=chat.model.device if chat else self._settings.device,
            active_generations=chat.active_generations if chat else 0,
            queued_generations=chat.queued_generations if chat else 0,
            components=components,
            not_ready=not_ready,
        )

    def _configured_model_name(self) -> str:
        if self._settings.remote_base_url:
            return self._settings.remote_model or self._settings.remote_base_url
        return self._settings.model

    async def drain(self, grace_seconds: float) -> None:
        """Before the server closes its connections: running replies get up to `grace_seconds` to finish, then are
        stopped and stored, so their streams end with a last event instead of being cut."""
        if self.chat.value is not None:
            await self.chat.value.drain(grace_seconds)

    async def shutdown(self) -> None:
        """Stop loading, stop every running reply (each is stored as cancelled) and release the model."""
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            await asyncio.gather(self._loader, return_exceptions=True)
        if self.chat.value is not None:
            await self.chat.value.shutdown()
        if self._model is not None:
            await self._model.aclose()


def _resume_garbage_collection() -> None:
    """After `chipi serve`'s start (app/cli.py pauses collection for it): what the start loaded moves to the
    permanent generation, so that no later full collection walks it (a pause of 100-160 ms each here), and
    collection resumes for what serving allocates. Cyclic garbage of the requests answered during the load (health
    polls, 503s) is frozen with it: a few objects a request, for the seconds a load takes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _load_model(settings: Settings) -> ModelService:
    """The local model, with its stack (PyTorch, transformers) imported here, in the loading thread: the server
    starts answering (health, conversations) about 2 s sooner than if the web layer imported it."""
    from app.services.model import ModelService

    return ModelService.load(settings)
