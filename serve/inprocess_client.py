"""InProcessEngineClient: the in-process transport over the one EngineLoop, which it runs in a background thread (the
HTTP tests and offline use; production runs the same loop in the engine process behind zmq, serve/engine_server.py).

Request threads hand submissions and aborts to the loop thread, which alone touches the engine and delivers each
request's events into its queue. Admission, failures and stats are the loop's, exactly as in production: a failed
step fails every request in flight and stops the loop (stats turn None, so /ping answers 503).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from engine.llm_engine import LLMEngine
from serve.engine_loop import EngineFailed, EngineLoop
from serve.engine_process import facts
from serve.engine_protocol import (
    EngineClient,
    EngineError,
    EngineRequest,
    EngineStats,
    ModelInfo,
    TokenEvent,
    UnavailableError,
)
from serve.ipc import model_info

if TYPE_CHECKING:
    from serve.engine_tracing import EngineSpans

logger = logging.getLogger(__name__)


class _Stream(Iterator[TokenEvent]):
    """One request's events; raises its admission or generation error from next()."""

    def __init__(self, client: InProcessEngineClient, request: EngineRequest) -> None:
        self.client, self.request, self.key = client, request, next(client._keys)
        self.queue: queue.SimpleQueue[TokenEvent | EngineError] = queue.SimpleQueue()
        self.started = self.done = self.closed = False

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> TokenEvent:
        if self.done or self.closed:
            raise StopIteration
        if not self.started:
            self.started = True
            self.client._submit(self)
        item: TokenEvent | EngineError | None = None
        while item is None:
            try:
                item = self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.client.running:
                    item = UnavailableError("the engine loop stopped")
        if isinstance(item, EngineError):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.started and not self.done:
                self.client._abort(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class InProcessEngineClient(EngineClient):
    def __init__(
        self,
        engine: LLMEngine,
        max_concurrent_requests: int = 128,
        model_id: str | None = None,
        stats_interval_s: float = 0.2,
        spans: EngineSpans | None = None,
    ) -> None:
        """`spans`: the engine's tracing spans (serve/engine_tracing.py); None: no tracing."""
        self.engine = engine
        self.stats_interval_s = stats_interval_s
        self._streams: dict[int, _Stream] = {}  # submitted, until their last event; loop thread only
        self.loop = EngineLoop(engine, max_concurrent_requests, self._deliver, spans)
        self._cond = threading.Condition()
        self._pending: list[_Stream] = []
        self._before_drain: set[int] = set()  # keys queued when a drain began (served, not refused)
        self._aborts: list[_Stream] = []
        self._keys = itertools.count()
        self._stopping = False
        self._stats: EngineStats | None = None
        self._thread: threading.Thread | None = None
        label = model_id or str(engine.config.model or "default")
        limit = engine.max_model_len
        self._info = model_info(facts(engine), label, limit - 1, limit, max_concurrent_requests)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> InProcessEngineClient:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
            self._thread.start()
        return self

    def drain(self, draining: bool = True) -> None:
        """Refuse new requests (503) and report draining; running ones finish. drain(False) resumes."""
        with self._cond:
            if draining and not self.loop.draining:  # queued, not yet taken by the loop: in flight, so served
                self._before_drain = {stream.key for stream in self._pending}
            self.loop.drain(draining)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is in flight (503), abort it in the engine and join the loop thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> InProcessEngineClient:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_in_flight(self) -> int:
        """Requests submitted and not finished (those the loop has not taken yet included), read live."""
        with self._cond:
            return len(self.loop.in_flight) + len(self._pending)

    # ---- EngineClient -----------------------------------------------------------------------

    def generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        return _Stream(self, request)

    def stats(self) -> EngineStats | None:
        return self._stats

    def model_info(self) -> ModelInfo:
        return self._info

    # ---- request threads --------------------------------------------------------------------

    def _submit(self, stream: _Stream) -> None:
        with self._cond:
            if not self.running:
                raise UnavailableError("the engine is not running")
            self._pending.append(stream)
            self._cond.notify()

    def _abort(self, stream: _Stream) -> None:
        with self._cond:
            self._aborts.append(stream)
            self._cond.notify()

    # ---- the loop thread --------------------------------------------------------------------

    def _deliver(self, key: int, item: TokenEvent | EngineError) -> None:
        stream = self._streams.get(key)
        if stream is None:
            return
        if isinstance(item, EngineError) or item.finished:
            del self._streams[key]
        stream.queue.put(item)

    def _run(self) -> None:
        if self.engine.config.num_threads:
            import torch

            torch.set_num_threads(self.engine.config.num_threads)
        loop = self.loop
        self._publish()
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._pending or self._aborts or loop.has_work()):
                        self._cond.wait(self.stats_interval_s)
                        self._publish()
                    if self._stopping:
                        break
                    pending, self._pending = self._pending, []
                    aborts, self._aborts = self._aborts, []
                    # draining: only those drain() found queued were queued before it (None: not draining, all)
                    early = self._before_drain if loop.draining else None
                    self._before_drain = set()
                for stream in pending:
                    self._streams[stream.key] = stream
                    loop.submit(stream.key, stream.request, before_drain=early is None or stream.key in early)
                for stream in aborts:
                    self._streams.pop(stream.key, None)
                    loop.abort(stream.key)
                if pending or aborts:
                    self._publish()
                if loop.has_work():
                    loop.step()
                self._publish()
        except EngineFailed:
            pass  # every request in flight has its GenerationError; the loop stops, as the engine process exits
        except BaseException:
            logger.exception("engine loop crashed")
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            leftovers = self._pending
            self._pending, self._aborts = [], []
        self.loop.fail_all(UnavailableError("the engine stopped"))
        for stream in leftovers:
            stream.queue.put(UnavailableError("the engine stopped"))
        self._stats = None

    def _publish(self) -> None:
        with self._cond:
            pending = len(self._pending)
        self._stats = self.loop.stats(pending=pending, ready=not self._stopping)
