"""Plain HTTP for the reliability tests: requests with any body, framing and content type (Content-Length, chunked, a
raw socket for headers that lie), the checks every error answer must pass, and a /ping probe that records status and
latency while something else happens.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.support.sse import sse_events

POST_ROUTES = ("/invocations", "/", "/generate", "/generate_stream", "/v1/chat/completions", "/v1/completions",
               "/tokenize")  # fmt: skip


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def events(self) -> list[Any]:
        """The `data:` payloads of an SSE body ("[DONE]" kept as a string)."""
        return sse_events(self.body)


def request(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    content_type: str | None = "application/json",
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """One request on a fresh connection; an iterable body goes chunked (no Content-Length)."""
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["Content-Type"] = content_type
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        chunked = body is not None and not isinstance(body, bytes)
        conn.request(method, path, body=body, headers=all_headers, encode_chunked=chunked)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def post_json(port: int, path: str, payload: Any, timeout: float = 60) -> Reply:
    return request(port, "POST", path, json.dumps(payload).encode(), timeout=timeout)


def raw(port: int, head: bytes, body: bytes = b"", shut_write: bool = False, timeout: float = 30) -> Reply:
    """Send `head` (request line and headers, ending with a blank line) and `body` as given, then read the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(head + body)
        if shut_write:
            sock.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        sock.close()


def head(path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def error_body(reply: Reply, status: int, error_type: str | None = None) -> str:
    """Check an error answer: the status, a JSON {"error", "error_type"} body; returns the message."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    body = reply.json()
    assert set(body) == {"error", "error_type"} and isinstance(body["error"], str) and body["error"], body
    if error_type is not None:
        assert body["error_type"] == error_type, body
    return body["error"]


@dataclass
class Probe:
    """GET /ping every `interval` seconds in a thread: (seconds since start, status or exception name, latency)."""

    port: int
    interval: float = 0.02
    timeout: float = 3.0
    samples: list[tuple[float, int | str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            status: int | str
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                conn.request("GET", "/ping")
                response = conn.getresponse()
                response.read()
                status = response.status
                conn.close()
            except OSError as e:
                status = type(e).__name__
            self.samples.append((began - self.started, status, time.monotonic() - began))
            self._stop.wait(self.interval)

    def start(self) -> Probe:
        self._thread.start()
        return self

    def stop(self) -> list[tuple[float, int | str, float]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples

    def since(self, t: float) -> list[tuple[float, int | str, float]]:
        """Samples sent at or after monotonic time `t`."""
        return [s for s in self.samples if s[0] >= t - self.started]


def summary(samples: list[tuple[float, int | str, float]]) -> list[tuple[float, int | str, int]]:
    """Runs of equal outcomes: (start, outcome, count), to print in an assertion message."""
    runs: list[tuple[float, int | str, int]] = []
    for t, status, _ in samples:
        if runs and runs[-1][1] == status:
            runs[-1] = (runs[-1][0], status, runs[-1][2] + 1)
        else:
            runs.append((round(t, 2), status, 1))
    return runs
