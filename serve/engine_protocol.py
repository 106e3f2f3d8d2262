"""The contract between the HTTP workers and the engine process: what a request carries, what comes
back for it, and the client interface the flask app is written against.

Messages are plain dataclasses of builtins (msgpack/pickle-safe); the engine process owns the only
LLMEngine, and workers never touch a model.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams

# Request timing uses one clock, time.monotonic: the HTTP arrival (worker), token arrivals (worker) and the engine's
# RequestMetrics (engine process) all subtract. CLOCK_MONOTONIC is one clock for every process on the host.
REQUEST_CLOCK = time.monotonic


class EngineError(Exception):
    """Base of the errors an EngineClient raises; `status` is the HTTP status the app answers with."""

    status = 500
    error_type = "generation"


class ValidationError(EngineError):
    status, error_type = 422, "validation"


class OverloadedError(EngineError):
    status, error_type = 429, "overloaded"


class UnavailableError(EngineError):
    """Engine not ready, dead, or draining for shutdown."""

    status, error_type = 503, "unhealthy"


class GenerationError(EngineError):
    status, error_type = 424, "generation"


@dataclass(frozen=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.monotonic() when the HTTP request arrived (see REQUEST_CLOCK)
    trace_context: dict[str, str] | None = None  # W3C traceparent/tracestate of the HTTP span (tracing on)


@dataclass(frozen=True)
class TokenEvent:
    """What one engine step produced for one request (usually one token)."""

    request_id: str
    token_ids: list[int]
    text: str  # text completed by these tokens (may be "" while held back for stop strings)
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]
    finished: bool = False
    finish_reason: str | None = None  # "length" | "eos_token" | "stop_sequence"
    generated_text: str | None = None  # the whole text, on the final event
    num_generated_tokens: int = 0
    seed: int | None = None
    # Timings on the final event, seconds from the HTTP arrival: queue (-> first scheduled), first_token, total;
    # inference (first scheduled -> finished). Computed by serve.ipc.token_event only.
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineStats:
    """Published by the engine process a few times a second; /ping and /metrics read the latest."""

    ready: bool
    draining: bool
    queue_size: int  # waiting requests
    batch_size: int  # running requests
    in_flight: int
    kv_cache_usage: float  # 0..1
    kv_cache_blocks: int
    time: float  # time.time() when published
    prefix_cache_hit_tokens: int = 0  # prompt tokens served from the prefix cache since start
    preemptions: int = 0  # running requests preempted for KV blocks (recomputed later) since start


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_dtype: str
    model_device_type: str
    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int
    max_batch_prefill_tokens: int
    max_concurrent_requests: int
    extra: dict[str, Any] = field(default_factory=dict)


class EngineClient(abc.ABC):
    """How the flask app reaches the engine. Thread-safe: many request threads share one client."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> Iterator[TokenEvent]:
        """Submit and iterate the request's events until the finished one.

        Admission errors (OverloadedError, UnavailableError, ValidationError) raise from the first
        `next()`, before any event; a failure mid-generation raises GenerationError. Closing the
        iterator early (client disconnect) aborts the request and frees its KV blocks.
        """

    @abc.abstractmethod
    def stats(self) -> EngineStats | None:
        """The latest published stats without waiting on the engine loop; None if none yet."""

    @abc.abstractmethod
    def model_info(self) -> ModelInfo: ...
