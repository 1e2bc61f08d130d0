"""Observability: one access log line per request (JSON or text, with a request id) and Prometheus metrics.

Request counts and latencies come from Litestar's Prometheus middleware, labelled by route template (not the raw
path); the model's own figures (tokens, time to first token, running and waiting replies, readiness) are here.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from litestar.plugins.prometheus import PrometheusConfig
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

    from app.services.readiness import Readiness

access_logger = logging.getLogger("chipi.access")

REQUEST_ID_HEADER = "X-Request-ID"
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # a caller's id is kept only if it is this tame

GENERATED_TOKENS = Counter("chipi_generated_tokens", "Tokens the model generated, over all replies")
TIME_TO_FIRST_TOKEN = Histogram(
    "chipi_time_to_first_token_seconds",
    "Seconds from the start of a reply's generation (after any wait for a slot) to its first token",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
ACTIVE_GENERATIONS = Gauge("chipi_active_generations", "Replies being generated now")
QUEUED_GENERATIONS = Gauge("chipi_queued_generations", "Replies waiting for a free generation slot")
READY = Gauge("chipi_ready", "1 when the part (database, model, speech) is ready, else 0", ["component"])


def prometheus_config() -> PrometheusConfig:
    """Request counts and latencies by method, route template and status (`chipi_requests_total`, ...)."""
    return PrometheusConfig(app_name="chipi", prefix="chipi", group_path=True)


def record_first_token(seconds: float) -> None:
    TIME_TO_FIRST_TOKEN.observe(seconds)


def record_generated_tokens(count: int) -> None:
    GENERATED_TOKENS.inc(count)


def watch_readiness(readiness: Readiness) -> None:
    """Let the gauges read the live figures of this server's parts at every scrape."""

    def active() -> float:
        chat = readiness.chat.value
        return chat.active_generations if chat else 0

    def queued() -> float:
        chat = readiness.chat.value
        return chat.queued_generations if chat else 0

    ACTIVE_GENERATIONS.set_function(active)
    QUEUED_GENERATIONS.set_function(queued)
    READY.labels("database").set_function(lambda: float(readiness.database_ready))
    READY.labels("model").set_function(lambda: float(readiness.chat.ready))
    READY.labels("speech").set_function(lambda: float(readiness.speech.ready))


async def render_metrics(readiness: Readiness) -> bytes:
    """Every metric in Prometheus' text format, the database checked afresh."""
    await readiness.health()
    return generate_latest(REGISTRY)


class WithoutQueryStrings(logging.Filter):
    """uvicorn logs each WebSocket handshake (`"WebSocket /path?query" [accepted]`) with its query string, where a
    browser's API key travels (and a prompt may): the paths in those lines lose their query string."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and "WebSocket %s" in str(record.msg):
            record.args = tuple(arg.split("?", 1)[0] if isinstance(arg, str) else arg for arg in record.args)
        return True


def configure_access_log(level: str) -> None:
    """Access lines go to stderr as they are (a JSON object or a text line), not through the root logger's format;
    uvicorn's own lines never carry a query string."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access_logger.handlers[:] = [handler]
    access_logger.propagate = False
    access_logger.setLevel(logging.getLevelNamesMapping().get(level.upper(), logging.INFO))
    uvicorn_logger = logging.getLogger("uvicorn.error")  # runs after uvicorn configured its logging: the filter stays
    if not any(isinstance(existing, WithoutQueryStrings) for existing in uvicorn_logger.filters):
        uvicorn_logger.addFilter(WithoutQueryStrings())


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class RequestLog:
    """Wraps the whole ASGI app (so 404s are logged too): a request id for each request, echoed in X-Request-ID,
    and one access log line when the response (or the WebSocket session) ends. The query string is never logged:
    prompts travel in it."""

    def __init__(self, app: ASGIApp, *, json_format: bool) -> None:
        self.app = app
        self.json_format = json_format

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER.lower().encode())
        request_id = given if given and _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] in ("http.response.start", "websocket.accept"):
                status = message.get("status", 101)  # type: ignore[assignment]
                message = cast("Message", {**message, "headers": [*message.get("headers", ()), header]})
            elif message["type"] == "websocket.close" and status == 0:
                status = 403  # closed before it was accepted
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, status or 500, (time.perf_counter() - started) * 1000, request_id)

    def _log(self, scope: Scope, status: int, duration_ms: float, request_id: str) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return
        method = scope.get("method", "WEBSOCKET")
        client = scope.get("client")
        host = client[0] if client else None
        if self.json_format:
            record: dict[str, Any] = {
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "method": method,
                "path": scope["path"],
                "status": status,
                "duration_ms": round(duration_ms, 1),
                "request_id": request_id,
                "client": host,
            }
            access_logger.info(json.dumps(record))
        else:
            path = scope["path"]
            access_logger.info(f'{host} - "{method} {path}" {status} {duration_ms:.1f}ms id={request_id}')
