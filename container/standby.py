"""The launcher's own listening socket and the 503 it answers whenever gunicorn cannot: while the model loads and the
workers boot, after a child died, and while the server stops. Gunicorn inherits the same socket (`--bind fd://N`), so
the port is open from start-up to exit and a health check is always answered at once, never left in the backlog.

States: loading (answering) -> serving (silent: the workers answer) -> failed or stopping (answering again). The
hand-over (serve.ipc.Handover): once a worker has booted, the standby stops answering, then tells the workers, whose
/ping may say 200 from then on: a client never sees 200 then a 503 from the standby.
"""

from __future__ import annotations

import http.server
import json
import logging
import socket
import threading
import time

from serve.ipc import Handover

logger = logging.getLogger("container.standby")
BACKLOG = 2048  # gunicorn's default
POLL_S = 0.02  # how often the hand-over looks for a booted worker
_MESSAGES = {
    "loading": "unhealthy: the model is loading",
    "failed": "unhealthy: the server failed and is stopping",
    "stopping": "unhealthy: the server is shutting down",
}


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, non-blocking (as gunicorn's gthread workers use it); OSError if taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


class _Handler(http.server.BaseHTTPRequestHandler):
    """Any method, any path: 503 with the JSON error body every route uses, then the connection closes."""

    server: _Server
    timeout = 5  # seconds a client may take to send its request
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = self.headers.get("Content-Length", "")
        if length.isdigit() and int(length) <= 1 << 20:  # read a small body, so the client sees the answer
            self.rfile.read(int(length))
        body = json.dumps({"error": _MESSAGES[self.server.state], "error_type": "unhealthy"}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.close_connection = True

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _answer

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        logger.debug(format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    state = "loading"

    def handle_error(self, request: object, client_address: object) -> None:
        logger.debug("standby: a connection failed", exc_info=True)


class Standby:
    """Answers 503 on `sock` from a thread while it is active; `serving()` hands the port to the workers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._server = _Server(("", 0), _Handler, bind_and_activate=False)
        self._server.socket.close()
        self._server.socket = sock  # shared with gunicorn: never closed by the server
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def answering(self) -> bool:
        return self._thread is not None

    def start(self) -> Standby:
        self._set("loading")
        return self

    def fail(self) -> None:
        self._set("failed")

    def stopping(self) -> None:
        """Answer again while the children stop (a failure keeps its message)."""
        self._set("failed" if self._server.state == "failed" else "stopping")

    def _set(self, state: str) -> None:
        with self._lock:
            self._server.state = state
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._server.serve_forever, args=(0.05,), name="standby", daemon=True
                )
                self._thread.start()

    def hand_over_when_ready(self, handover: Handover) -> None:
        """In a thread: once a worker has booted, stop answering (if still loading) and tell the workers."""
        threading.Thread(target=self._hand_over, args=(handover,), name="standby-handover", daemon=True).start()

    def _hand_over(self, handover: Handover) -> None:
        while not self._closed and self._server.state == "loading":
            if handover.any_booted():
                with self._lock:
                    if self._server.state != "loading" or self._closed:
                        return  # failed or stopping meanwhile: keep answering
                    if self._thread is not None:
                        self._server.shutdown()  # waits for serve_forever to return; the socket stays open
                        self._thread = None
                handover.hand_over()
                logger.info("a worker has booted: the port is handed over to gunicorn")
                return
            time.sleep(POLL_S)

    def close(self) -> None:
        """Stop answering, finish the answers under way, close the socket: the port closes."""
        with self._lock:
            self._closed = True
            if self._thread is not None:
                self._server.shutdown()
                self._thread = None
            self._server.server_close()  # closes the socket and joins the handler threads
