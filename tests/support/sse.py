"""Server-sent events as the tests read them: the `data:` payload of every frame of a whole body, or of one line read
off a live stream. The server writes only `data:` frames (TGI `data:{...}`, OpenAI `data: {...}` and `data: [DONE]`);
payloads are JSON-decoded, "[DONE]" kept as a string.
"""

from __future__ import annotations

import json
from typing import Any

DONE = "[DONE]"


def _decode(data: str) -> Any:  # noqa: ANN401 (a JSON value)
    data = data.strip()
    return data if data == DONE else json.loads(data)


def sse_events(body: bytes | str) -> list[Any]:
    """The payloads of a whole SSE body, in order; every frame must be a `data:` frame."""
    text = body.decode() if isinstance(body, bytes) else body
    events = []
    for frame in text.split("\n\n"):
        if not frame:
            continue
        assert frame.startswith("data:"), frame
        events.append(_decode(frame[len("data:") :]))
    return events


def sse_line(line: bytes | str) -> Any | None:  # noqa: ANN401 (a JSON value)
    """The payload of one line of a live stream if it is a `data:` line, else None (blank separators)."""
    text = line.decode() if isinstance(line, bytes) else line
    return _decode(text[len("data:") :]) if text.startswith("data:") else None
