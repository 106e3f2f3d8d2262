"""The one engine loop: admission (the concurrency limit, draining), add and abort, the step, delivery of each
request's events and failures, and the stats snapshot. Two thin transports drive it: the zmq EngineServer in the
engine process (production) and the in-process InProcessEngineClient (tests, offline use). Single-threaded: only the
thread that calls `step()` touches the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING

from serve.engine_protocol import (
    REQUEST_CLOCK,
    EngineError,
    EngineRequest,
    EngineStats,
    GenerationError,
    OverloadedError,
    TokenEvent,
    UnavailableError,
    ValidationError,
)
from serve.ipc import failure_message, token_event

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from serve.engine_tracing import EngineSpans

logger = logging.getLogger("serve.engine")
Key = Hashable
Deliver = Callable[[Key, "TokenEvent | EngineError"], None]


class EngineFailed(RuntimeError):
    """A step failed (the model or the device): every request in flight got a GenerationError; the engine is done."""


class EngineLoop:
    def __init__(
        self, engine: LLMEngine, max_concurrent_requests: int, deliver: Deliver, spans: EngineSpans | None = None
    ) -> None:
        self.engine, self.max_concurrent_requests, self.deliver = engine, max_concurrent_requests, deliver
        self.spans = spans  # tracing on: the engine's spans (serve/engine_tracing.py); None: no tracing work at all
        self.in_flight: dict[Key, EngineRequest] = {}
        self._ids: dict[str, Key] = {}  # engine request id -> transport key
        self.draining = False

    # ---- requests in ------------------------------------------------------------------------

    def submit(self, key: Key, request: EngineRequest, before_drain: bool = False) -> bool:
        """Admit and add a request; a refusal is delivered (503 draining, 429 overloaded, 422 invalid).
        `before_drain`: the request was queued before the drain began, so it is served like those in flight."""
        if self.draining and not before_drain:
            self.deliver(key, UnavailableError("the server is shutting down"))
            return False
        if len(self.in_flight) >= self.max_concurrent_requests:
            self.deliver(key, OverloadedError("Model is overloaded"))
            return False
        rid = str(key)
        try:
            self.engine.add_request(list(request.prompt_token_ids), request.params, rid)
        except ValueError as e:
            self.deliver(key, ValidationError(str(e)))
            return False
        except Exception as e:  # a bug for this request only: the engine's state is unchanged
            logger.exception("add_request failed")
            self.deliver(key, GenerationError(f"{type(e).__name__}: {e}"))
            return False
        self.in_flight[key] = request
        self._ids[rid] = key
        if self.spans is not None:
            self.spans.started(rid, request, REQUEST_CLOCK())
        return True

    def abort(self, key: Key) -> None:
        """Drop a request (its client went away); its KV blocks are freed. Unknown keys are ignored."""
        if self.in_flight.pop(key, None) is not None:
            rid = str(key)
            self._ids.pop(rid, None)
            self.engine.abort_request(rid)
            if self.spans is not None:
                self.spans.cancelled(rid)

    def drain(self, draining: bool = True) -> None:
        if draining and not self.draining:
            logger.info("draining: %d requests in flight, new requests are refused", len(self.in_flight))
        self.draining = draining

    # ---- the step ---------------------------------------------------------------------------

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> None:
        """One engine step and the delivery of its events. A failed step fails every request in flight and raises
        EngineFailed: the transport stops, and the process exits to be replaced."""
        spans = self.spans
        started_ns = time.time_ns() if spans is not None else 0
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing %d requests", len(self.in_flight))
            self.fail_all(GenerationError(f"the engine failed: {type(e).__name__}: {e}"))
            raise EngineFailed(str(e)) from e
        if spans is not None:
            spans.step(self.engine, started_ns)
        for out in outputs:
            key = self._ids.get(out.request_id)
            request = None if key is None else self.in_flight.get(key)
            if request is None:
                continue
            if spans is not None:
                spans.output(out.request_id, out)
            if out.finished:
                del self.in_flight[key]
                del self._ids[out.request_id]
            if out.error is not None:  # this request alone failed; the engine goes on
                self.deliver(key, GenerationError(failure_message(out.error)))
            else:
                self.deliver(key, token_event(request, out))

    def check_health(self) -> None:
        """Between steps: a tensor-parallel rank that died while the engine idled fails it (EngineFailed)."""
        try:
            self.engine.check_health()
        except RuntimeError as e:
            logger.error("%s", e)
            self.fail_all(GenerationError(f"the engine failed: {e}"))
            raise EngineFailed(str(e)) from e

    def fail_all(self, error: EngineError) -> None:
        for key in list(self.in_flight):
            self.engine.abort_request(str(key))
            self.deliver(key, error)
            if self.spans is not None:
                self.spans.failed(str(key), error)
        self.in_flight.clear()
        self._ids.clear()

    # ---- stats ------------------------------------------------------------------------------

    def stats(self, pending: int = 0, ready: bool = True) -> EngineStats:
        """`pending`: requests a transport holds that the loop has not seen yet (they count as queued)."""
        engine = self.engine
        return EngineStats(
            ready=ready,
            draining=self.draining,
            queue_size=engine.scheduler.num_waiting + pending,
            batch_size=engine.scheduler.num_running,
            in_flight=len(self.in_flight) + pending,
            kv_cache_usage=engine.block_manager.usage,
            kv_cache_blocks=engine.block_manager.num_blocks,
            time=time.time(),
            prefix_cache_hit_tokens=engine.block_manager.hit_tokens,
            preemptions=engine.scheduler.num_preemptions,
        )
