"""What travels between the launcher, the engine process and the gunicorn workers: socket addresses, the
pickled messages (both ends are ours), the engine's start-up report and the config each worker reads.

Workers' DEALER sockets talk to the engine's ROUTER (requests in, token events out); stats come on a PUB.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serve.engine_protocol import (
    EngineError,
    EngineRequest,
    GenerationError,
    ModelInfo,
    OverloadedError,
    TokenEvent,
    UnavailableError,
    ValidationError,
)
from serve.server_config import ServerConfig
from serve.tracing import TracingConfig

if TYPE_CHECKING:
    from engine.outputs import RequestOutput

STATS_INTERVAL_S = 0.25  # the engine publishes EngineStats this often
STATS_STALE_AFTER_S = 3.0  # a worker treats the engine as gone when it heard nothing for this long
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux

_ERRORS: dict[str, type[EngineError]] = {
    cls.error_type: cls for cls in (GenerationError, ValidationError, OverloadedError, UnavailableError)
}


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig))


@dataclass(frozen=True)
class Addresses:
    requests: str  # the engine's ROUTER: Submit/Abort in, [(tag, TokenEvent | Failure)] out
    stats: str  # the engine's PUB: EngineStats

    @classmethod
    def in_dir(cls, runtime_dir: str) -> Addresses:
        paths = [os.path.join(runtime_dir, name) for name in ("engine.sock", "stats.sock")]
        too_long = [p for p in paths if len(p.encode()) > _MAX_UNIX_PATH]
        if too_long:
            raise ValueError(f"unix socket path {too_long[0]!r} is too long; use a shorter TMPDIR")
        return cls(*(f"ipc://{p}" for p in paths))


@dataclass(frozen=True)
class Submit:
    tag: int  # unique per worker connection; events come back under it
    request: EngineRequest


@dataclass(frozen=True)
class Abort:
    tag: int


@dataclass(frozen=True)
class Failure:
    """The request failed or was refused; `error_type` is an EngineError subclass's error_type."""

    error_type: str
    message: str

    @classmethod
    def of(cls, error: EngineError) -> Failure:
        return cls(error.error_type, str(error))

    def exception(self) -> EngineError:
        return _ERRORS.get(self.error_type, GenerationError)(self.message)


Reply = tuple[int, "TokenEvent | Failure"]


@dataclass(frozen=True)
class EngineFacts:
    """What the engine process reports to the launcher once the model is loaded and warmed up."""

    model_dir: str
    gguf_file: str | None
    model_context: int  # the model's own max_position_embeddings
    max_model_len: int  # the engine's context (capped by MAX_TOTAL_TOKENS)
    dtype: str
    device_type: str
    kv_cache_tokens: int
    max_batch_prefill_tokens: int
    quantize: str = "none"  # the plan's quantization: "none" or "<method> on <kernel>"
    tokenizer_dir: str | None = None  # the tokenizer exported for the workers (serve.tokenizer); None: not exported
    model_implementation: str = "native"  # "native" or "transformers" (the fallback)


@dataclass(frozen=True)
class WorkerConfig:
    addresses: Addresses
    server: ServerConfig
    model_info: ModelInfo
    tokenizer_dir: str
    tokenizer_gguf: str | None
    trust_remote_code: bool
    log_level: str
    worker_tokenizer: str | None = None  # EngineFacts.tokenizer_dir; None: load tokenizer_dir with transformers
    tracing: TracingConfig = TracingConfig()  # OpenTelemetry (off unless an endpoint is set)

    def write(self, path: str) -> None:
        with open(path, "wb") as f:
            pickle.dump(self, f)

    @staticmethod
    def read(path: str) -> WorkerConfig:
        with open(path, "rb") as f:
            config = pickle.load(f)
        if not isinstance(config, WorkerConfig):
            raise TypeError(f"{path} does not hold a WorkerConfig")
        return config


def model_info(
    facts: EngineFacts,
    model_id: str,
    max_input_tokens: int,
    max_total_tokens: int,
    max_concurrent_requests: int,
    extra: dict | None = None,
) -> ModelInfo:
    """What /info reports: the engine's facts with the HTTP limits (the one builder, for both transports)."""
    return ModelInfo(
        model_id=model_id,
        model_dtype=facts.dtype,
        model_device_type=facts.device_type,
        max_input_tokens=max_input_tokens,
        max_total_tokens=max_total_tokens,
        max_batch_total_tokens=facts.kv_cache_tokens,
        max_batch_prefill_tokens=facts.max_batch_prefill_tokens,
        max_concurrent_requests=max_concurrent_requests,
        extra={
            "model_context": facts.model_context,
            "quantize": facts.quantize,
            "model_implementation": facts.model_implementation,
            **(extra or {}),
        },
    )


def failure_message(error: str) -> str:
    """The 424 message of a request the engine failed alone."""
    return f"Request failed during generation: {error}"


class Handover:
    """The port passing from the launcher's standby (which answers 503 while the model loads) to the workers, through
    files in the runtime dir: a worker writes `booted-<pid>` once its app is built; the launcher, once it has stopped
    answering, writes `serving`; a worker's /ping says 200 only from then on, so no 200 is ever followed by a 503
    from the standby."""

    def __init__(self, runtime_dir: str) -> None:
        self.dir = runtime_dir
        self._serving = False

    def booted(self) -> None:
        open(os.path.join(self.dir, f"booted-{os.getpid()}"), "w").close()

    def any_booted(self) -> bool:
        return any(name.startswith("booted-") for name in os.listdir(self.dir))

    def hand_over(self) -> None:
        open(os.path.join(self.dir, "serving"), "w").close()

    def serving(self) -> bool:
        if not self._serving:
            self._serving = os.path.exists(os.path.join(self.dir, "serving"))
        return self._serving


def token_event(request: EngineRequest, out: RequestOutput) -> TokenEvent:
    """The TokenEvent for one RequestOutput; the final one carries timings from the HTTP arrival (seconds).

    The engine's RequestMetrics and `request.arrival_time` are on the one REQUEST_CLOCK, so they subtract directly.
    """
    timings: dict[str, float] = {}
    m = out.metrics
    if out.finished and m is not None and m.finished_time is not None:
        arrival = min(request.arrival_time, m.arrival_time)  # the HTTP arrival precedes add_request
        scheduled = m.first_scheduled_time if m.first_scheduled_time is not None else m.arrival_time
        first_token = m.first_token_time if m.first_token_time is not None else m.finished_time
        timings = {
            "queue": scheduled - arrival,
            "first_token": first_token - arrival,
            "inference": m.finished_time - scheduled,
            "total": m.finished_time - arrival,
        }
    return TokenEvent(
        request_id=request.request_id,
        token_ids=list(out.new_token_ids),
        text=out.new_text,
        logprobs=list(out.new_logprobs),
        top_tokens=list(out.new_top_tokens),
        finished=out.finished,
        finish_reason=out.finish_reason,
        generated_text=out.text if out.finished else None,
        num_generated_tokens=out.num_generated_tokens,
        seed=out.seed,
        timings=timings,
    )
