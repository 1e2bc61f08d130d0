"""Per-client rate limits on the API (`CHIPI_RATE_LIMIT` requests per minute; 0: none).

A client is the API key the request was authenticated with (its id), else its address: the middleware runs after
authentication, so a key that is made up or sent while authentication is off (OpenAI's clients always send one)
spends its address's budget rather than getting one of its own. Liveness, readiness, metrics, the OpenAPI schema
and the web page's files are not counted. An HTTP request over the budget gets 429 with `Retry-After` through the
error mapper; a WebSocket over it is accepted and closed at once with code 4429 and the wait in the reason.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from litestar.datastructures import MutableScopeHeaders
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware

from app.domain.auth import Caller
from app.domain.errors import RateLimitedError
from app.domain.rate_limit import RateLimiter

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Message, Receive, Scope, Send

RATE_LIMITED_CLOSE_CODE = 4429
_UNCOUNTED_PATHS = frozenset({"/api/ping", "/api/health"})


def is_rate_limited_path(path: str) -> bool:
    """True for the API's paths (`/api/...`, `/v1/...`) except liveness and readiness."""
    return path.startswith(("/api/", "/v1/")) and path.rstrip("/") not in _UNCOUNTED_PATHS


def client_identity(scope: Scope) -> str:
    """Whose budget a request spends: `key:<id of the key it was authenticated with>`, else `address:<host>`."""
    caller = scope.get("user")
    if isinstance(caller, Caller) and caller.key_id is not None:
        return f"key:{caller.key_id}"
    client = scope.get("client")
    return f"address:{client[0] if client else 'unknown'}"


class RateLimitMiddleware(ASGIMiddleware):
    """Spends one unit of the client's budget per API request; over budget, the request is refused unprocessed."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)

    def __init__(self, per_minute: int) -> None:
        self.limiter = RateLimiter(per_minute)
        self.should_bypass_for_scope = lambda scope: not is_rate_limited_path(scope["path"])

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        client = client_identity(scope)
        wait = self.limiter.acquire(client)
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            if scope["type"] == ScopeType.WEBSOCKET:
                await self._refuse_socket(receive, send, retry_after)
                return
            raise RateLimitedError(
                f"too many requests; at most {self.limiter.per_minute} a minute per client", retry_after
            )
        await next_app(scope, receive, self._with_budget_headers(send, client))

    def _with_budget_headers(self, send: Send, client: str) -> Send:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableScopeHeaders.from_message(message)
                headers["RateLimit-Limit"] = str(self.limiter.per_minute)
                headers["RateLimit-Remaining"] = str(self.limiter.remaining(client))
            await send(message)

        return send_with_headers

    @staticmethod
    async def _refuse_socket(receive: Receive, send: Send, retry_after: int) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        reason = f"too many requests; retry after {retry_after} s"
        await send({"type": "websocket.close", "code": RATE_LIMITED_CLOSE_CODE, "reason": reason})
