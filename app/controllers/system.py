"""Liveness, readiness and metrics: public, no API key needed (no conversation data in them)."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST

from app.controllers.auth import PUBLIC
from app.domain.schemas import Health, Pong
from app.observability import render_metrics
from app.services.readiness import Readiness


class SystemController(Controller):
    path = "/api"
    tags = ["system"]
    opt = {PUBLIC: True}

    @get("/ping", operation_id="ping", summary="Liveness check: answers as soon as the server accepts connections")
    async def ping(self) -> Pong:
        return Pong(response="pong")

    @get(
        "/health",
        operation_id="health",
        summary="Readiness: the database, the model and the speech models; 503 while any is loading or unreachable",
        responses={503: ResponseSpec(Health, description="A part is not ready; `not_ready` names it")},
    )
    async def health(self, readiness: Readiness) -> Response[Health]:
        health = await readiness.health()
        return Response(health, status_code=200 if health.status == "ok" else 503)


class MetricsController(Controller):
    path = "/metrics"
    tags = ["system"]
    opt = {PUBLIC: True}

    @get(operation_id="metrics", summary="Prometheus metrics (text exposition format)", media_type=CONTENT_TYPE_LATEST)
    async def metrics(self, readiness: Readiness) -> bytes:
        return await render_metrics(readiness)
