"""The one mapping from exceptions to (HTTP status, error message, error_type).

Used by the flask error handler and by streams that fail after their first byte (an SSE error
event), so both carry the same {"error", "error_type"} body.
"""

from __future__ import annotations

import logging

import pydantic
from werkzeug.exceptions import HTTPException

from serve.engine_protocol import EngineError

logger = logging.getLogger(__name__)

_HTTP_ERROR_TYPES = {
    400: "bad_request",
    401: "authentication",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class HttpError(Exception):
    """A request refused by the HTTP layer itself (auth, content type, body, route)."""

    def __init__(self, status: int, message: str, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _HTTP_ERROR_TYPES.get(status, "http")


def describe_pydantic(err: pydantic.ValidationError) -> str:
    """TGI's wording for a body that does not deserialize, naming the first bad field."""
    first = err.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"Failed to deserialize the JSON body into the target type: {where}: {first['msg']}"


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, message, error_type) for any exception a request can raise."""
    if isinstance(exc, EngineError):
        return exc.status, str(exc) or exc.__class__.__name__, getattr(exc, "error_type", "generation")
    if isinstance(exc, HttpError):
        return exc.status, exc.message, exc.error_type
    if isinstance(exc, pydantic.ValidationError):
        return 422, describe_pydantic(exc), "validation"
    if isinstance(exc, HTTPException):
        status = exc.code or 500
        return status, exc.description or exc.name, _HTTP_ERROR_TYPES.get(status, "http")
    logger.error("unhandled error", exc_info=exc)
    return 500, "Internal server error", "internal"
