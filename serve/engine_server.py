"""The engine process's transport: the one EngineLoop (serve/engine_loop.py) served to every gunicorn worker over zmq.

ROUTER: Submit/Abort from the workers' DEALERs in, lists of (tag, TokenEvent | Failure) out. PUB: EngineStats
from a heartbeat thread. A multiprocessing Pipe to the launcher: ready/error/drained out, drain/stop in.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import pickle
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

import zmq

from engine.config import EngineConfig
from serve.engine_loop import EngineFailed, EngineLoop
from serve.engine_protocol import EngineError, TokenEvent, UnavailableError
from serve.ipc import (
    STATS_INTERVAL_S,
    Abort,
    Addresses,
    Failure,
    Reply,
    Submit,
)
from serve.tracing import TracingConfig
from serve.tracing import setup as setup_tracing

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from serve.engine_tracing import EngineSpans
    from serve.tracing import Tracing

logger = logging.getLogger("serve.engine")
IDLE_POLL_MS = 100


@dataclass(frozen=True)
class EngineProcessConfig:
    engine: EngineConfig
    addresses: Addresses
    max_concurrent_requests: int
    log_level: str = "info"
    tokenizer_dir: str = ""  # where to export the tokenizer for the HTTP workers (a new dir); "": nowhere
    tracing: TracingConfig = TracingConfig()  # OpenTelemetry (off unless an endpoint is set)


class EngineServer:
    """The zmq transport over the one EngineLoop: submissions and aborts from the workers in, events out."""

    def __init__(self, engine: LLMEngine, config: EngineProcessConfig, conn: Connection) -> None:
        self.engine, self.config, self.conn = engine, config, conn
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        try:
            self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone worker raises instead of dropping silently
            self.router.setsockopt(zmq.SNDHWM, 0)
            self.router.setsockopt(zmq.RCVHWM, 0)
            self.router.setsockopt(zmq.LINGER, 2000)
            self.router.bind(config.addresses.requests)
            self.outbox: dict[bytes, list[Reply]] = defaultdict(list)
            self.tracing = setup_tracing(config.tracing, "engine")
            self.loop = EngineLoop(engine, config.max_concurrent_requests, self._reply, _spans(self.tracing))
            self._drained_reported = False
            self.stats = self.loop.stats()
        except BaseException:
            # Never leave a live context to the garbage collector: its finalizer may block in zmq_term.
            self.router.close(linger=0)
            self.ctx.term()
            raise
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._publish, name="stats", daemon=True)

    # ---- the loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until told to stop (0), the launcher goes away or the engine fails (1)."""
        self._heartbeat.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.conn.fileno(), zmq.POLLIN)
        next_parent_check = 0.0
        loop = self.loop
        while True:
            ready = dict(poller.poll(0 if loop.has_work() else IDLE_POLL_MS))
            if self.router in ready:
                self._receive()
            if self.conn.fileno() in ready and self._control() == "stop":
                self._stop_all("the server is shutting down")
                return 0
            try:
                if loop.has_work():
                    loop.step()
                if time.monotonic() >= next_parent_check:
                    next_parent_check = time.monotonic() + 1.0
                    if not parent_alive():
                        logger.error("the launcher is gone; exiting")
                        self._stop_all("the server is shutting down")
                        return 1
                    loop.check_health()  # a tensor-parallel rank that died while the engine idled
            except EngineFailed:
                self._flush()
                return 1
            self._flush()
            self.stats = loop.stats()
            if loop.draining and not loop.in_flight and not self._drained_reported:
                self._drained_reported = True
                self._tell_launcher(("drained",))

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=2)
        self.router.close()
        self.ctx.term()
        if self.tracing is not None:
            self.tracing.shutdown()  # exports what is left

    def _stop_all(self, reason: str) -> None:
        self.loop.fail_all(UnavailableError(reason))
        self._flush()

    def _tell_launcher(self, message: tuple) -> None:
        try:
            self.conn.send(message)
        except OSError:  # the launcher is gone: the parent check ends the loop
            pass

    def _control(self) -> str | None:
        try:
            command = self.conn.recv()
        except (EOFError, OSError):
            logger.error("the launcher's pipe closed; stopping")
            return "stop"
        if command == "drain":
            self.loop.drain()
        return command if isinstance(command, str) else None

    # ---- requests in ------------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                identity, payload = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames: not one of ours
                continue
            try:
                message = pickle.loads(payload)
            except Exception:
                logger.exception("undecodable message from worker %s", identity.hex())
                continue
            if isinstance(message, Submit):
                self.loop.submit((identity, message.tag), message.request)
            elif isinstance(message, Abort):
                self.loop.abort((identity, message.tag))

    # ---- events out -------------------------------------------------------------------------

    def _reply(self, key: tuple[bytes, int], item: TokenEvent | EngineError) -> None:
        identity, tag = key
        self.outbox[identity].append((tag, Failure.of(item) if isinstance(item, EngineError) else item))

    def _flush(self) -> None:
        for identity, replies in self.outbox.items():
            try:
                self.router.send_multipart([identity, pickle.dumps(replies)], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the worker is gone (restarted or killed): drop its requests
                logger.warning("worker %s unreachable (%s); aborting its requests", identity.hex(), e)
                for key in [k for k in self.loop.in_flight if k[0] == identity]:
                    self.loop.abort(key)
        self.outbox.clear()

    # ---- stats ------------------------------------------------------------------------------

    def _publish(self) -> None:
        """Heartbeat thread: publishes the latest snapshot, so stats stay fresh during a long step."""
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(self.config.addresses.stats)
        try:
            while not self._stop.is_set():
                pub.send_pyobj(dataclasses.replace(self.stats, time=time.time()))
                self._stop.wait(STATS_INTERVAL_S)
        finally:
            pub.close()


def _spans(tracing: Tracing | None) -> EngineSpans | None:
    if tracing is None:
        return None
    from serve.engine_tracing import EngineSpans

    return EngineSpans(tracing)


def parent_alive() -> bool:
    """False once the launcher is gone (we were re-parented); True outside a multiprocessing child."""
    parent = multiprocessing.parent_process()
    return parent is None or os.getppid() == parent.pid
