"""Domain errors. One mapper (app/controllers/errors.py) turns each into a JSON response."""

from __future__ import annotations


class ChipiError(Exception):
    """Base of every error a client can cause; `status_code` and `code` say how it is reported."""

    status_code = 500
    code = "internal_error"

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class InvalidInputError(ChipiError):
    status_code = 400
    code = "invalid_input"


class UnauthorizedError(ChipiError):
    """No valid API key while authentication is on: 401 with `WWW-Authenticate: Bearer`."""

    status_code = 401
    code = "unauthorized"


class NotFoundError(ChipiError):
    status_code = 404
    code = "not_found"


class ConflictError(ChipiError):
    status_code = 409
    code = "conflict"


class TooLargeError(ChipiError):
    status_code = 413
    code = "too_large"


class BusyError(ChipiError):
    """Every generation slot is taken: 429 when the waiting queue is full, 503 when the wait timed out."""

    code = "busy"

    def __init__(self, detail: str, status_code: int, retry_after_seconds: int) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.retry_after_seconds = retry_after_seconds


class ModelUnavailableError(ChipiError):
    status_code = 503
    code = "model_unavailable"


class NotReadyError(BusyError):
    """A part the request needs (the model, the speech models) is still loading or failed to load: 503 with
    Retry-After, like a busy model."""

    code = "not_ready"

    def __init__(self, detail: str, retry_after_seconds: int) -> None:
        super().__init__(detail, 503, retry_after_seconds)


class ShuttingDownError(BusyError):
    """The server is stopping and starts no new replies: 503 with Retry-After (a restarted or another instance
    will answer)."""

    code = "shutting_down"

    def __init__(self, retry_after_seconds: int) -> None:
        super().__init__("the server is shutting down; try again shortly", 503, retry_after_seconds)


class RateLimitedError(BusyError):
    """A client sent more requests than its per-minute budget: 429 with Retry-After."""

    code = "rate_limited"

    def __init__(self, detail: str, retry_after_seconds: int) -> None:
        super().__init__(detail, 429, retry_after_seconds)
