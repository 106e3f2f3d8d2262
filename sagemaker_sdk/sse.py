"""Server-sent events from bytes that arrive in arbitrary pieces (one PayloadPart may end mid-line, mid-character,
or hold several events): a line buffer that gives back the `data` of each complete event.
"""

from __future__ import annotations


class SseDecoder:
    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event completed by `chunk` (a blank line ends an event; `data:` lines join with \\n)."""
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        events = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8")  # whole lines only: a split character is complete by now
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif not line.startswith(":"):  # ':' starts a comment
                name, _, value = line.partition(":")
                if name == "data":
                    self._data.append(value[1:] if value.startswith(" ") else value)
        return events

    def close(self) -> list[str]:
        """At the end of the stream: an event the server did not end with a blank line."""
        events = self.feed(b"\n\n") if self._buffer or self._data else []
        self._buffer, self._data = b"", []
        return events
