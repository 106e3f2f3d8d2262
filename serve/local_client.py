"""LocalEngineClient: an in-process EngineClient that runs an LLMEngine loop in a background thread.

Request threads get a queue each; the loop thread alone touches the engine (add, step, abort) and
publishes EngineStats. Admission (max_concurrent_requests, draining) is decided in the caller's
thread at the first next(), so a 429 never waits on a step. Closing an iterator aborts its request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from serve.engine_protocol import (
    EngineClient,
    EngineError,
    EngineStats,
    GenerateRequest,
    GenerationError,
    ModelInfo,
    OverloadedError,
    TokenEvent,
    UnavailableError,
    ValidationError,
)
from serve.ipc import failure_message, token_event

logger = logging.getLogger(__name__)


class _Stream(Iterator[TokenEvent]):
    """One request's events; raises its admission or generation error from next()."""

    def __init__(self, client: LocalEngineClient, request: GenerateRequest) -> None:
        self.client = client
        self.request = request
        self.queue: queue.SimpleQueue[TokenEvent | EngineError] = queue.SimpleQueue()
        self.started = self.done = self.closed = self.released = False
        self.added_wall = 0.0  # time.time() when the engine took it

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> TokenEvent:
        if self.done or self.closed:
            raise StopIteration
        if not self.started:
            self.started = True
            try:
                self.client._admit(self)
            except EngineError:  # OverloadedError / UnavailableError: never admitted, nothing to release
                self.done = True
                raise
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


class LocalEngineClient(EngineClient):
    def __init__(
        self,
        engine: LLMEngine,
        max_concurrent_requests: int = 128,
        model_id: str | None = None,
        stats_interval_s: float = 0.2,
    ) -> None:
        self.engine = engine
        self.max_concurrent_requests = max_concurrent_requests
        self.stats_interval_s = stats_interval_s
        self._cond = threading.Condition(threading.RLock())
        self._pending: list[_Stream] = []  # admitted, not yet given to the engine
        self._aborts: list[_Stream] = []
        self._streams: dict[str, _Stream] = {}  # in the engine; loop thread only
        self._in_flight = 0
        self._draining = self._stopping = False
        self._stats: EngineStats | None = None
        self._stats_at = 0.0
        self._thread: threading.Thread | None = None
        self._num_threads = engine.config.num_threads
        self._info = ModelInfo(
            model_id=model_id or str(engine.config.model or "default"),
            model_dtype=str(engine.runner.dtype),
            model_device_type=engine.runner.device.type,
            max_input_tokens=engine.max_model_len - 1,
            max_total_tokens=engine.max_model_len,
            max_batch_total_tokens=engine.block_manager.num_blocks * engine.block_manager.block_size,
            max_batch_prefill_tokens=engine.config.max_batch_prefill_tokens,
            max_concurrent_requests=max_concurrent_requests,
            eos_token_ids=sorted(engine.eos_token_ids),
            extra={"quantize": engine.runner.plan.quant},
        )

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> LocalEngineClient:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llm-engine-loop", daemon=True)
            self._thread.start()
        return self

    def drain(self, draining: bool = True) -> None:
        """Refuse new requests (503) and report draining; running ones finish. drain(False) resumes."""
        with self._cond:
            self._draining = draining
            self._stats_at = 0.0  # publish the change at the next loop turn
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is in flight (503), abort it in the engine and join the loop thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> LocalEngineClient:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    # ---- EngineClient -----------------------------------------------------------------------

    def generate(self, request: GenerateRequest) -> Iterator[TokenEvent]:
        return _Stream(self, request)

    def stats(self) -> EngineStats | None:
        return self._stats

    def model_info(self) -> ModelInfo:
        return self._info

    # ---- request threads --------------------------------------------------------------------

    def _admit(self, stream: _Stream) -> None:
        with self._cond:
            if not self.running:
                raise UnavailableError("the engine is not running")
            if self._draining:
                raise UnavailableError("the server is draining")
            if self._in_flight >= self.max_concurrent_requests:
                raise OverloadedError("Model is overloaded")
            self._in_flight += 1
            self._pending.append(stream)
            self._cond.notify()

    def _abort(self, stream: _Stream) -> None:
        with self._cond:
            if stream in self._pending:
                self._pending.remove(stream)
                self._release(stream)
            elif not stream.released:
                self._aborts.append(stream)
                self._cond.notify()

    def _release(self, stream: _Stream) -> None:
        with self._cond:
            if not stream.released:
                stream.released = True
                self._in_flight -= 1

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        if self._num_threads:
            import torch

            torch.set_num_threads(self._num_threads)
        self._publish()
        try:
            while True:
                with self._cond:
                    while not (
                        self._stopping or self._pending or self._aborts or self.engine.has_unfinished_requests()
                    ):
                        self._cond.wait(self.stats_interval_s)
                        self._publish_if_due()
                    if self._stopping:
                        break
                    pending, self._pending = self._pending, []
                    aborts, self._aborts = self._aborts, []
                self._add(pending)
                for stream in aborts:
                    self._drop(stream)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_if_due()
        except BaseException:
            logger.exception("engine loop crashed")
        finally:
            self._shutdown()

    def _add(self, pending: list[_Stream]) -> None:
        for stream in pending:
            r = stream.request
            try:
                self.engine.add_request(r.prompt_token_ids, r.params, r.request_id)
            except ValueError as e:
                stream.queue.put(ValidationError(str(e)))
                self._release(stream)
                continue
            stream.added_wall = time.time()
            self._streams[r.request_id] = stream

    def _drop(self, stream: _Stream) -> None:
        if self._streams.get(stream.request.request_id) is stream:
            del self._streams[stream.request.request_id]
            self.engine.abort_request(stream.request.request_id)
        self._release(stream)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:  # the batch is lost: fail its requests, free their KV, keep serving
            logger.exception("engine step failed")
            for stream in list(self._streams.values()):
                stream.queue.put(GenerationError(f"Request failed during generation: {e}"))
                self._drop(stream)
            return
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.queue.put(GenerationError(failure_message(out.error)) if out.error else _event(stream, out))
            if out.finished:
                del self._streams[out.request_id]
                self._release(stream)

    def _shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            leftovers = self._pending + self._aborts
            self._pending, self._aborts = [], []
        for stream in list(self._streams.values()) + leftovers:
            stream.queue.put(UnavailableError("the engine stopped"))
            self._drop(stream)
        self._stats = None

    def _publish_if_due(self) -> None:
        if time.monotonic() - self._stats_at >= self.stats_interval_s:
            self._publish()

    def _publish(self) -> None:
        scheduler, blocks = self.engine.scheduler, self.engine.block_manager
        self._stats = EngineStats(
            ready=not self._stopping,
            draining=self._draining,
            queue_size=scheduler.num_waiting + len(self._pending),
            batch_size=scheduler.num_running,
            in_flight=self._in_flight,
            kv_cache_usage=blocks.usage,
            kv_cache_blocks=blocks.num_blocks,
            time=time.time(),
            prefix_cache_hit_tokens=blocks.hit_tokens,
        )
        self._stats_at = time.monotonic()


def _event(stream: _Stream, out: RequestOutput) -> TokenEvent:
    return token_event(stream.request, stream.added_wall, out)
