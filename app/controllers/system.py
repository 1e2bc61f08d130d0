"""Liveness endpoints."""

from __future__ import annotations

from litestar import Controller, get

from app.domain.schemas import Health, Pong
from app.services.chat import ChatService


class SystemController(Controller):
    path = "/api"
    tags = ["system"]

    @get("/ping", operation_id="ping", summary="Liveness check")
    async def ping(self) -> Pong:
        return Pong(response="pong")

    @get("/health", operation_id="health", summary="The loaded model and how many replies are being generated")
    async def health(self, chat: ChatService) -> Health:
        return Health(
            status="ok",
            model=chat.model.name,
            device=chat.model.device,
            active_generations=chat.active_generations,
            queued_generations=chat.queued_generations,
        )
