"""Server-sent events: framing, and a response body whose close() aborts the engine requests.

Werkzeug/gunicorn call close() on the response iterable when the body is done or the client went
away; `EventStream.close` then closes the frame generator and runs the cleanup even if the
generator never started. A failure after the first byte becomes an SSE error event.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response
from pydantic import BaseModel

from serve.errors import classify

logger = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _json(payload: Any) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def sse(payload: Any, space: bool = False) -> bytes:
    """One `data:` event. TGI writes `data:{...}`; OpenAI writes `data: {...}` (both valid SSE)."""
    body = payload if isinstance(payload, str) else _json(payload)
    return f"data:{' ' if space else ''}{body}\n\n".encode()


def error_event(exc: BaseException, space: bool = False) -> tuple[bytes, str]:
    """(the SSE error frame, its error_type) for a failure after the stream began."""
    _, message, error_type = classify(exc)
    return sse({"error": message, "error_type": error_type}, space), error_type


class EventStream:
    """The response iterable: frames from `frames`; `close()` closes it and runs `on_close` once."""

    def __init__(self, frames: Iterator[bytes], on_close: Callable[[], None]) -> None:
        self._frames = frames
        self._on_close: Callable[[], None] | None = on_close

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> bytes:
        return next(self._frames)

    def close(self) -> None:
        try:
            close = getattr(self._frames, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def guarded(frames: Iterator[bytes], on_error: Callable[[BaseException], bytes]) -> Iterator[bytes]:
    """Pass frames through; an exception mid-stream ends the stream with `on_error`'s frame."""
    try:
        yield from frames
    except GeneratorExit:
        raise
    except Exception as exc:  # the status line is gone: report in-band
        logger.warning("stream failed after it began: %s", exc)
        yield on_error(exc)


def sse_response(frames: Iterator[bytes], on_close: Callable[[], None], headers: dict[str, str]) -> Response:
    body = EventStream(frames, on_close)
    response = Response(body, status=200, mimetype="text/event-stream")
    response.headers.update(SSE_HEADERS)
    response.headers.update(headers)
    return response
