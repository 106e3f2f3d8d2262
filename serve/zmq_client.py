"""ZmqEngineClient: the EngineClient each gunicorn worker uses to reach the engine process.

One background thread per process owns the zmq sockets (DEALER to the engine, SUB for stats, an inproc PULL
fed by request threads under a lock) and routes token events into per-request queues. Sockets are created
lazily in the process that uses them, so a client built before gunicorn forks still works after.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import zmq
from zmq.utils.monitor import recv_monitor_message

from serve.engine_protocol import (
    EngineClient,
    EngineRequest,
    EngineStats,
    GenerationError,
    ModelInfo,
    TokenEvent,
    UnavailableError,
)
from serve.ipc import STATS_STALE_AFTER_S, Abort, Addresses, Failure, Submit

logger = logging.getLogger(__name__)
_GONE = object()  # put in a request's queue when the engine stops answering
_POLL_MS = 250


class ZmqEngineClient(EngineClient):
    def __init__(self, addresses: Addresses, info: ModelInfo, stale_after: float = STATS_STALE_AFTER_S) -> None:
        self.addresses = addresses
        self._info = info
        self.stale_after = stale_after
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._closed = threading.Event()
        self._queues: dict[int, queue.Queue] = {}
        self._tags = itertools.count()
        self._stats: EngineStats | None = None
        self._stats_at = 0.0  # time.monotonic() when the latest stats arrived
        self._gone = False  # the engine dropped our connection: it exited (it never comes back)
        self._ctx: zmq.Context | None = None
        self._push: zmq.Socket | None = None
        self._thread: threading.Thread | None = None

    # ---- EngineClient -----------------------------------------------------------------------

    def generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        return self._generate(request)  # a generator: nothing is sent before the first next()

    def stats(self) -> EngineStats | None:
        self.start()
        if self._stats is None or self._gone or time.monotonic() - self._stats_at > self.stale_after:
            return None
        return self._stats

    def model_info(self) -> ModelInfo:
        return self._info

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Create the sockets and the receiver thread in this process (again after a fork)."""
        if self._pid == os.getpid():
            return
        with self._lock:
            if self._pid == os.getpid():
                return
            # After a fork the parent's context and thread are unusable here: never touch them, start over.
            self._queues, self._stats, self._stats_at, self._gone = {}, None, 0.0, False
            self._closed = threading.Event()
            ctx = zmq.Context()
            inbox = f"inproc://engine-client-{uuid.uuid4().hex}"
            bound = threading.Event()
            thread = threading.Thread(target=self._run, args=(ctx, inbox, bound), name="engine-client", daemon=True)
            thread.start()
            bound.wait()
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            push.connect(inbox)
            self._ctx, self._push, self._thread, self._pid = ctx, push, thread, os.getpid()

    def wait_for_stats(self, timeout: float) -> EngineStats | None:
        deadline = time.monotonic() + timeout
        while (stats := self.stats()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return stats

    def close(self) -> None:
        if self._pid != os.getpid() or self._thread is None:
            return
        self._closed.set()
        self._thread.join(timeout=2)
        with self._lock:
            if self._push is not None:
                self._push.close()
            self._pid = None

    # ---- request side -----------------------------------------------------------------------

    def _generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        self.start()
        stats = self.stats()
        if stats is None or not stats.ready:
            raise UnavailableError("the engine is not available")
        if stats.draining:
            raise UnavailableError("the server is shutting down")
        tag, events = next(self._tags), queue.Queue()
        self._queues[tag] = events
        done = False
        try:
            self._send(Submit(tag, request))
            started = False
            while True:
                item = self._get(events)
                if item is _GONE:
                    done = True
                    error = GenerationError if started else UnavailableError
                    raise error("the engine process stopped answering")
                if isinstance(item, Failure):
                    done = True
                    error = item.exception()
                    raise error if not started or isinstance(error, GenerationError) else GenerationError(str(error))
                started, done = True, item.finished
                yield item
                if done:
                    return
        finally:
            self._queues.pop(tag, None)
            if not done:  # closed early (client went away): free the engine's KV blocks
                try:
                    self._send(Abort(tag))
                except (UnavailableError, zmq.ZMQError):
                    pass  # closed client: nothing to abort through

    def _get(self, events: queue.Queue) -> object:
        while True:
            try:
                return events.get(timeout=1.0)
            except queue.Empty:
                if self._thread is None or not self._thread.is_alive():
                    return _GONE

    def _send(self, message: Submit | Abort) -> None:
        payload = pickle.dumps(message)
        with self._lock:
            if self._push is None:
                raise UnavailableError("the engine client is closed")
            self._push.send(payload)

    # ---- the receiver thread ----------------------------------------------------------------

    def _run(self, ctx: zmq.Context, inbox_address: str, bound: threading.Event) -> None:
        inbox = ctx.socket(zmq.PULL)
        inbox.bind(inbox_address)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, f"{os.getpid()}-{uuid.uuid4().hex[:8]}".encode())
        for option in (zmq.SNDHWM, zmq.RCVHWM, zmq.LINGER):
            dealer.setsockopt(option, 0)
        dealer.connect(self.addresses.requests)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.CONFLATE, 1)  # only the latest stats matter
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.addresses.stats)
        bound.set()
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)  # the engine process went away
        poller = zmq.Poller()
        for socket in (inbox, dealer, sub, monitor):
            poller.register(socket, zmq.POLLIN)
        try:
            while not self._closed.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if inbox in ready:
                    _drain(inbox, dealer.send)
                if dealer in ready:
                    _drain(dealer, self._route)
                if sub in ready:
                    _drain(sub, self._on_stats)
                if monitor in ready and _disconnected(monitor):
                    logger.error("the engine process closed its connection")
                    self._gone = True
                if self._queues and (self._gone or time.monotonic() - self._stats_at > self.stale_after):
                    for events in list(self._queues.values()):
                        events.put(_GONE)
        except Exception:
            logger.exception("engine client receiver failed")
        finally:
            for events in list(self._queues.values()):
                events.put(_GONE)
            dealer.disable_monitor()
            for socket in (inbox, dealer, sub, monitor):
                socket.close(linger=0)

    def _route(self, payload: bytes) -> None:
        for tag, item in pickle.loads(payload):
            events = self._queues.get(tag)
            if events is not None:
                events.put(item)

    def _on_stats(self, payload: bytes) -> None:
        self._stats, self._stats_at = pickle.loads(payload), time.monotonic()


def _drain(socket: zmq.Socket, handle: Callable[[bytes], object]) -> None:
    while True:
        try:
            payload = socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        handle(payload)


def _disconnected(monitor: zmq.Socket) -> bool:
    """Drain the monitor socket; True if it reported a disconnection."""
    seen = False
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return seen
        seen |= event["event"] == zmq.EVENT_DISCONNECTED
