"""Errors in OpenAI's shape, with the HTTP status codes clients retry on.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

OpenAI's clients retry 408, 409, 429 and 5xx (honouring Retry-After) and never retry other 4xx, so
the status says whether trying again can help: 400/404/401/403/413 never, 429 (queue full, rate
limit) and 503 (Redis unreachable, worker overloaded) after a pause, 504 (deadline) at will.
"""

from __future__ import annotations

from typing import Any

from lorafleet.producer.errors import JobFailed
from lorafleet.producer.protocol import ErrorCode

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVER = "server_error"
TIMEOUT = "timeout_error"


class APIError(Exception):
    """An error answered to the client: HTTP `status`, OpenAI error `kind` (its ``type``), the
    `param` at fault where one is, a machine-readable `code`, and `retry_after` seconds for 429/503."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        """The JSON body (also the ``data`` of an error event in a stream)."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """Retry-After (whole seconds, at least 1) where the client should wait."""
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after + 0.499)))}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """400 naming the field at fault."""
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, why: str = "") -> APIError:
    """404 for a `model` that is neither the base model nor a served adapter."""
    detail = f": {why}" if why else ""
    message = f"The model {model!r} does not exist{detail}"
    return APIError(404, message, kind=NOT_FOUND, param="model", code="model_not_found")


# How a worker's error reply reads over HTTP: (status, OpenAI type, retry after).
_JOB_ERRORS: dict[str, tuple[int, str, float | None]] = {
    ErrorCode.INVALID_REQUEST: (400, INVALID_REQUEST, None),
    ErrorCode.PROMPT_TOO_LONG: (400, INVALID_REQUEST, None),
    ErrorCode.ADAPTER_NOT_FOUND: (404, NOT_FOUND, None),
    ErrorCode.ADAPTER_INVALID: (422, INVALID_REQUEST, None),
    ErrorCode.DEADLINE_EXCEEDED: (504, TIMEOUT, None),
    ErrorCode.CANCELLED: (499, INVALID_REQUEST, None),
    ErrorCode.OVERLOADED: (503, SERVER, 1.0),
}


def from_job_failure(exc: JobFailed) -> APIError:
    """The HTTP answer to a worker's error reply; unknown codes by their `retryable` flag."""
    default = (503, SERVER, 1.0) if exc.retryable else (500, SERVER, None)
    status, kind, retry_after = _JOB_ERRORS.get(exc.code, default)
    code = "model_not_found" if exc.code == ErrorCode.ADAPTER_NOT_FOUND else exc.code
    param = "model" if status == 404 else None
    message = exc.message or exc.code
    return APIError(status, message, kind=kind, param=param, code=code, retry_after=retry_after)
