"""The engine process: owns the one LLMEngine and serves every gunicorn worker over zmq.

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
from serve.engine_protocol import (
    EngineError,
    EngineStats,
    GenerateRequest,
    GenerationError,
    OverloadedError,
    TokenEvent,
    UnavailableError,
    ValidationError,
)
from serve.ipc import (
    STATS_INTERVAL_S,
    Abort,
    Addresses,
    Failure,
    Reply,
    Submit,
    failure_message,
    token_event,
)

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.outputs import RequestOutput

logger = logging.getLogger("serve.engine")
IDLE_POLL_MS = 100


@dataclass(frozen=True)
class EngineProcessConfig:
    engine: EngineConfig
    addresses: Addresses
    max_concurrent_requests: int
    log_level: str = "info"


@dataclass
class _InFlight:
    identity: bytes
    tag: int
    request: GenerateRequest
    added_wall: float  # time.time() at add_request


class EngineServer:
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
            self.in_flight: dict[str, _InFlight] = {}
            self.outbox: dict[bytes, list[Reply]] = defaultdict(list)
            self.draining = False
            self._drained_reported = False
            self.stats = self._snapshot()
        except BaseException:
            # Never leave a live context to the garbage collector: its finalizer may block in zmq_term.
            self.router.close(linger=0)
            self.ctx.term()
            raise
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(target=self._publish, name="stats", daemon=True)

    # ---- the loop ---------------------------------------------------------------------------

    def serve(self) -> int:
        """Run until told to stop (0), the launcher goes away or a step fails (1)."""
        self._heartbeat.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.conn.fileno(), zmq.POLLIN)
        next_parent_check = 0.0
        while True:
            busy = self.engine.has_unfinished_requests()
            ready = dict(poller.poll(0 if busy else IDLE_POLL_MS))
            if self.router in ready:
                self._receive()
            if self.conn.fileno() in ready and self._control() == "stop":
                self._fail_all(UnavailableError("the server is shutting down"))
                return 0
            if self.engine.has_unfinished_requests():
                try:
                    self._deliver(self.engine.step())
                except Exception as e:
                    logger.exception("engine step failed; failing %d requests and exiting", len(self.in_flight))
                    self._fail_all(GenerationError(f"the engine failed: {type(e).__name__}: {e}"))
                    return 1
            self._flush()
            self.stats = self._snapshot()
            if self.draining and not self.in_flight and not self._drained_reported:
                self._drained_reported = True
                self._tell_launcher(("drained",))
            if time.monotonic() >= next_parent_check:
                next_parent_check = time.monotonic() + 1.0
                if not parent_alive():
                    logger.error("the launcher is gone; exiting")
                    self._fail_all(UnavailableError("the server is shutting down"))
                    return 1
                try:  # a tensor-parallel rank that died while the engine idled
                    self.engine.check_health()
                except RuntimeError as e:
                    logger.error("%s; exiting", e)
                    self._fail_all(GenerationError(f"the engine failed: {e}"))
                    return 1

    def close(self) -> None:
        self._stop.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(timeout=2)
        self.router.close()
        self.ctx.term()

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
        if command == "drain" and not self.draining:
            logger.info("draining: %d requests in flight, new requests are refused", len(self.in_flight))
            self.draining = True
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
                self._submit(identity, message)
            elif isinstance(message, Abort):
                self._abort(f"{identity.hex()}/{message.tag}")

    def _submit(self, identity: bytes, message: Submit) -> None:
        request, key = message.request, f"{identity.hex()}/{message.tag}"
        if self.draining:
            return self._reply(identity, message.tag, UnavailableError("the server is shutting down"))
        if len(self.in_flight) >= self.config.max_concurrent_requests:
            return self._reply(identity, message.tag, OverloadedError("Model is overloaded"))
        try:
            self.engine.add_request(list(request.prompt_token_ids), request.params, key)
        except ValueError as e:
            return self._reply(identity, message.tag, ValidationError(str(e)))
        except Exception as e:  # a bug for this request only: the engine state is unchanged
            logger.exception("add_request failed")
            return self._reply(identity, message.tag, GenerationError(f"{type(e).__name__}: {e}"))
        self.in_flight[key] = _InFlight(identity, message.tag, request, time.time())

    def _abort(self, key: str) -> None:
        if self.in_flight.pop(key, None) is not None:
            self.engine.abort_request(key)

    # ---- events out -------------------------------------------------------------------------

    def _reply(self, identity: bytes, tag: int, item: TokenEvent | EngineError) -> None:
        self.outbox[identity].append((tag, Failure.of(item) if isinstance(item, EngineError) else item))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            record = self.in_flight.get(out.request_id)
            if record is None:
                continue
            if out.finished:
                del self.in_flight[out.request_id]
            if out.error is not None:  # this request alone failed; the engine goes on
                self._reply(record.identity, record.tag, GenerationError(failure_message(out.error)))
                continue
            self._reply(record.identity, record.tag, token_event(record.request, record.added_wall, out))

    def _fail_all(self, error: EngineError) -> None:
        for key, record in list(self.in_flight.items()):
            self.engine.abort_request(key)
            self._reply(record.identity, record.tag, error)
        self.in_flight.clear()
        self._flush()

    def _flush(self) -> None:
        for identity, replies in self.outbox.items():
            try:
                self.router.send_multipart([identity, pickle.dumps(replies)], zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the worker is gone (restarted or killed): drop its requests
                logger.warning("worker %s unreachable (%s); aborting its requests", identity.hex(), e)
                for key in [k for k, r in self.in_flight.items() if r.identity == identity]:
                    self._abort(key)
        self.outbox.clear()

    # ---- stats ------------------------------------------------------------------------------

    def _snapshot(self) -> EngineStats:
        engine = self.engine
        return EngineStats(
            ready=True,
            draining=self.draining,
            queue_size=engine.scheduler.num_waiting,
            batch_size=engine.scheduler.num_running,
            in_flight=len(self.in_flight),
            kv_cache_usage=engine.block_manager.usage,
            kv_cache_blocks=engine.block_manager.num_blocks,
            time=time.time(),
            prefix_cache_hit_tokens=engine.block_manager.hit_tokens,
            preemptions=engine.scheduler.num_preemptions,
        )

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


def parent_alive() -> bool:
    """False once the launcher is gone (we were re-parented); True outside a multiprocessing child."""
    parent = multiprocessing.parent_process()
    return parent is None or os.getppid() == parent.pid
