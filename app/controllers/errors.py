"""The one error mapper: every failure becomes a JSON ErrorBody with the right status."""

from __future__ import annotations

import logging
from typing import Any

from advanced_alchemy.exceptions import NotFoundError as RepositoryNotFoundError
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from sqlalchemy.exc import InterfaceError, OperationalError

from app.domain.errors import BusyError, ChipiError
from app.domain.schemas import ErrorBody

logger = logging.getLogger(__name__)

_CODES = {
    400: "invalid_input",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def error_response(
    status_code: int, detail: str, *, code: str | None = None, field: str | None = None
) -> Response[Any]:
    body = ErrorBody(status_code=status_code, detail=detail, code=code or _CODES.get(status_code, "error"), field=field)
    return Response(content=body, status_code=status_code, media_type="application/json")


def _invalid_field(exc: ValidationException) -> tuple[str, str | None]:
    """Name the offending field and say what is wrong with it, from Litestar's validation details."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    field = first.get("key")
    message = first.get("message")
    if field and message:
        return f"{field}: {message}", str(field)
    return str(exc.detail), None


def handle_chipi_error(_: Request[Any, Any, Any], exc: ChipiError) -> Response[Any]:
    response = error_response(exc.status_code, exc.detail, code=exc.code, field=exc.field)
    if isinstance(exc, BusyError):
        response.headers["Retry-After"] = str(exc.retry_after_seconds)
    return response


def handle_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ValidationException):
        detail, field = _invalid_field(exc)
        return error_response(400, detail, field=field)
    headers = exc.headers or None
    response = error_response(exc.status_code, str(exc.detail))
    if headers:
        response.headers.update(headers)
    return response


def handle_repository_not_found(_: Request[Any, Any, Any], exc: RepositoryNotFoundError) -> Response[Any]:
    return error_response(404, "not found")


def handle_database_unavailable(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.error("database unavailable: %s", exc)
    return error_response(503, "the database is unavailable; try again shortly", code="database_unavailable")


def handle_unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", code="internal_error")


exception_handlers: dict[type[Exception] | int, Any] = {
    ChipiError: handle_chipi_error,
    HTTPException: handle_http_exception,
    RepositoryNotFoundError: handle_repository_not_found,
    OperationalError: handle_database_unavailable,
    InterfaceError: handle_database_unavailable,
    Exception: handle_unexpected,
}
