"""Authentication at the HTTP edge: which key a request presents, and who it then acts for (`owner`).

Every route requires a key while authentication is on (see app/services/keys.py for when it is), except those whose
handler, controller or router carries `opt={PUBLIC: True}`: liveness, readiness, metrics, the web page's files and
the OpenAPI schema. A key travels as `Authorization: Bearer KEY`, or as the `api_key` query parameter for clients
that cannot set headers (browsers' EventSource and WebSocket); the access log never records query strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from litestar import WebSocket
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.openapi.spec import Components, SecurityRequirement, SecurityScheme

from app.controllers.errors import refuse_socket
from app.domain.auth import Caller
from app.services.keys import Authenticator

if TYPE_CHECKING:
    from litestar.types import ASGIApp, Receive, Scope, Send

PUBLIC = "public"  # the opt key of routes that need no key
API_KEY_QUERY_PARAMETER = "api_key"

BEARER_SCHEME = "bearer"
QUERY_SCHEME = "apiKeyQuery"
SECURITY_COMPONENTS = Components(
    security_schemes={
        BEARER_SCHEME: SecurityScheme(
            type="http",
            scheme="bearer",
            description="An API key from `chipi keys create`, as `Authorization: Bearer KEY`. Needed only once a key "
            "exists (or with CHIPI_AUTH=on); until then every request acts for the local owner.",
        ),
        QUERY_SCHEME: SecurityScheme(
            type="apiKey",
            name=API_KEY_QUERY_PARAMETER,
            security_scheme_in="query",
            description="The same key as a query parameter, for clients that cannot set headers (EventSource, "
            "WebSocket in browsers).",
        ),
    }
)
# Either scheme satisfies a route.
KEY_REQUIRED: list[SecurityRequirement] = [{BEARER_SCHEME: []}, {QUERY_SCHEME: []}]


def presented_key(scope: Scope) -> str | None:
    """The key a request presents: the Authorization header's bearer token, else the `api_key` query parameter."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            scheme, _, token = bytes(value).decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    keys = parse_qs(scope.get("query_string", b"").decode("latin-1")).get(API_KEY_QUERY_PARAMETER)
    return keys[0] if keys else None


def _skip(scope: Scope) -> bool:
    return scope["type"] == ScopeType.HTTP and scope.get("method") == "OPTIONS"  # CORS preflights, Allow lists


class ApiKeyAuthMiddleware(ASGIMiddleware):
    """Sets `scope["user"]` to the request's Caller, or refuses it: 401 JSON with `WWW-Authenticate: Bearer` (the
    error mapper), and on a WebSocket an `error` frame `unauthorized`, then close code 4401."""

    scopes = (ScopeType.HTTP, ScopeType.WEBSOCKET)
    exclude_opt_key = PUBLIC
    should_bypass_for_scope = staticmethod(_skip)

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        try:
            scope["user"] = await self.authenticator.authenticate(presented_key(scope))
        except Exception as exc:  # unauthorized, or the database is down
            if scope["type"] != ScopeType.WEBSOCKET:
                raise  # to the error mapper
            await refuse_socket(WebSocket(scope, receive, send), exc)
            return
        await next_app(scope, receive, send)


def provide_owner(scope: Scope) -> str:
    """The owner the request acts for, as the auth middleware found it."""
    caller = scope.get("user")
    if not isinstance(caller, Caller):
        raise RuntimeError(f"{scope['path']} is public (opt {PUBLIC}) but asks who the caller is")
    return caller.owner
