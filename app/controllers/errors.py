"""The one error mapper: every failure becomes a JSON error with the right status."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import msgspec
from advanced_alchemy.exceptions import NotFoundError as RepositoryNotFoundError
from advanced_alchemy.exceptions import RepositoryError
from litestar import Request, Response, WebSocket
from litestar.exceptions import HTTPException, InternalServerException, ValidationException
from sqlalchemy.exc import IntegrityError as SQLAlchemyIntegrityError
from sqlalchemy.exc import SQLAlchemyError

from app.db import database_unavailable
from app.domain.errors import BusyError, ChipiError
from app.domain.frames import ErrorFrame
from app.domain.openai import OpenAIError, OpenAIErrorBody
from app.domain.schemas import ErrorBody

logger = logging.getLogger(__name__)

DATABASE_RETRY_AFTER_SECONDS = 5
# Litestar's Request.stream raises InternalServerException with this message when the client hangs up before its
# body is complete (a cut upload): nobody is left to answer, and it is no server error. Logged as nginx's 499.
_CLIENT_GONE_DETAIL = "client disconnected prematurely"
CLIENT_CLOSED_REQUEST = 499
AUTHENTICATE_CHALLENGE = 'Bearer realm="chipi"'
# How a refused WebSocket closes: 4000 + the HTTP status where a client acts on it (a key to ask for, a conversation
# gone), 1013 "try again later" for a 503, else 1011 "unexpected condition".
_SOCKET_CLOSE_CODES = {401: 4401, 404: 4404, 503: 1013}
_SOCKET_CLOSE_REASONS = {4401: "an API key is required", 4404: "conversation not found"}

_CODES = {
    400: "invalid_input",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


@dataclass(frozen=True)
class ErrorInfo:
    """What went wrong, independent of how it is rendered."""

    status_code: int
    detail: str
    code: str
    field: str | None = None
    headers: dict[str, str] = dataclass_field(default_factory=dict)


def _invalid_field(exc: ValidationException) -> tuple[str, str | None]:
    """Name the offending field and say what is wrong with it, from Litestar's validation details."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    field = first.get("key")
    message = first.get("message")
    if field and message:
        return f"{field}: {message}", str(field)
    return str(exc.detail), None


def describe_error(exc: Exception) -> ErrorInfo:
    """Status, code and message for any exception; bad input is never a 500. A 401 always says how to
    authenticate (`WWW-Authenticate: Bearer`)."""
    info = _describe(exc)
    if info.status_code == 401:
        info.headers.setdefault("WWW-Authenticate", AUTHENTICATE_CHALLENGE)
    return info


def _describe(exc: Exception) -> ErrorInfo:
    if isinstance(exc, BusyError):
        return ErrorInfo(
            exc.status_code, exc.detail, exc.code, exc.field, {"Retry-After": str(exc.retry_after_seconds)}
        )
    if isinstance(exc, ChipiError):
        return ErrorInfo(exc.status_code, exc.detail, exc.code, exc.field)
    if isinstance(exc, ValidationException):
        detail, field = _invalid_field(exc)
        return ErrorInfo(400, detail, _CODES[400], field)
    if isinstance(exc, InternalServerException) and exc.detail == _CLIENT_GONE_DETAIL:
        return ErrorInfo(CLIENT_CLOSED_REQUEST, "the client closed the connection mid-request", "client_closed_request")
    if isinstance(exc, HTTPException):
        code = _CODES.get(exc.status_code, "error")
        return ErrorInfo(exc.status_code, str(exc.detail), code, None, dict(exc.headers or {}))
    if isinstance(exc, RepositoryNotFoundError):
        return ErrorInfo(404, "not found", _CODES[404])
    if database_unavailable(exc):
        logger.error("database unavailable: %s", str(exc.__cause__ or exc).partition("\n")[0])
        return ErrorInfo(
            503,
            "the database is unavailable; try again shortly",
            "database_unavailable",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, RepositoryError) and isinstance(exc.__cause__, SQLAlchemyError):
        # advanced-alchemy's repositories wrap every driver error in an IntegrityError or RepositoryError: what
        # happened is the error it wraps.
        exc = exc.__cause__
    if isinstance(exc, SQLAlchemyIntegrityError):  # e.g. a row another request wrote meanwhile
        return ErrorInfo(409, "the request conflicts with a change made meanwhile", _CODES[409])
    logger.exception("unhandled error", exc_info=exc)
    return ErrorInfo(500, "internal server error", "internal_error")


async def refuse_socket(socket: WebSocket[Any, Any, Any], exc: Exception) -> None:
    """Refuse a WebSocket for `exc`: accept it, say why in an `error` frame, and close it with a code that tells the
    kind of failure (browsers cannot read the HTTP status of a refused handshake, but they see the close code)."""
    info = describe_error(exc)
    await socket.accept()
    await socket.send_text(msgspec.json.encode(ErrorFrame(code=info.code, detail=info.detail)).decode())
    close_code = _SOCKET_CLOSE_CODES.get(info.status_code, 1011)
    await socket.close(code=close_code, reason=_SOCKET_CLOSE_REASONS.get(close_code, info.code))


def _openai_error_type(status_code: int) -> str:
    if status_code == 429:
        return "rate_limit_error"
    return "server_error" if status_code >= 500 else "invalid_request_error"


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The one exception handler: Chipi's ErrorBody, or OpenAI's error shape under /v1."""
    info = describe_error(exc)
    if request.url.path.startswith("/v1/"):
        content: Any = OpenAIErrorBody(
            OpenAIError(
                message=info.detail, type=_openai_error_type(info.status_code), param=info.field, code=info.code
            )
        )
    else:
        content = ErrorBody(status_code=info.status_code, detail=info.detail, code=info.code, field=info.field)
    return Response(content=content, status_code=info.status_code, media_type="application/json", headers=info.headers)


exception_handlers: dict[type[Exception] | int, Any] = {
    ChipiError: handle_error,
    HTTPException: handle_error,
    Exception: handle_error,
}
