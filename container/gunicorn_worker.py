"""The gunicorn worker class `serve` runs: gthread, with health checks served by a small thread pool of their own.

A gthread worker gives each connection a pool thread for as long as its request runs: streams hold theirs for their
whole length, and slow clients for as long as they dawdle. With more such connections than threads, a /ping would
wait in the pool's queue behind them (SageMaker gives it 2 s). Here the worker peeks at a connection's first bytes
before handing it to a pool: `GET /ping` and `GET /health` go to the probe pool, everything else to the usual one.
A connection with nothing to read yet waits on the worker's poller (as gthread's own deferral does), not in a thread.
"""

from __future__ import annotations

import selectors
import socket
import time
from concurrent import futures
from functools import partial
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

PROBE_THREADS = 4
_PROBES = (b"GET /ping", b"GET /health", b"HEAD /ping", b"HEAD /health")
_PEEK = max(len(p) for p in _PROBES) + 1


def _first_bytes(sock: socket.socket) -> bytes | None:
    """What the client has sent so far, left unread; None when nothing has arrived yet."""
    try:
        return sock.recv(_PEEK, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""  # broken: the usual path closes it


def is_probe(head: bytes) -> bool:
    return any(head.startswith(p) and head[len(p) : len(p) + 1] in (b" ", b"?") for p in _PROBES)


class ProbeFirstWorker(ThreadWorker):
    def init_process(self) -> None:
        self.probe_pool = futures.ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="probe")
        super().init_process()  # runs the worker loop until the worker stops

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.probe_pool.shutdown(wait=False)

    def enqueue_req(self, conn: Any) -> None:
        """Main loop: route the connection by its first bytes (a probe, or anything else)."""
        head = _first_bytes(conn.sock)
        if head is None and self._can_defer():
            return self._defer(conn)
        if head is not None and is_probe(head):
            pool, self.tpool = self.tpool, self.probe_pool  # the base class submits to self.tpool
            try:
                return super().enqueue_req(conn)
            finally:
                self.tpool = pool
        return super().enqueue_req(conn)

    def _can_defer(self) -> bool:
        return all(hasattr(self, name) for name in ("pending_conns", "poller", "on_pending_socket_readable"))

    def _defer(self, conn: Any) -> None:
        """Wait for the request's first bytes on the poller; enqueue_req runs again when they come."""
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + self.cfg.keepalive  # murder_pending closes it if nothing comes
        self.pending_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self.on_pending_socket_readable, conn))
