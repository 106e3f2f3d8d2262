"""RequestRecord: what one HTTP request did (counts, latencies, outcome), filled in by the handlers and read by
the metrics, the access log and TGI's timing response headers (`timing_headers`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve.engine_protocol import REQUEST_CLOCK


@dataclass
class RequestRecord:
    """What one HTTP request did, for its metrics and its access-log line."""

    request_id: str
    route: str
    method: str
    arrival: float = field(default_factory=REQUEST_CLOCK)  # becomes EngineRequest.arrival_time
    generation: bool = False
    validated: float | None = None  # REQUEST_CLOCK when validation finished
    prompt_tokens: int = 0
    generated_tokens: int = 0
    max_new_tokens: int | None = None
    finish_reason: str | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    inference_s: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    status: int = 200
    error_type: str | None = None
    stream: bool = False
    prompt: str | None = None  # only when config.log_prompts
    custom_attributes: bool = False
    trace_id: str | None = None  # tracing on: the request's trace (response header, access log)
    trace_context: dict[str, str] | None = None  # tracing on: the HTTP span's W3C context, for the engine's spans
    done: bool = False

    def validation_done(self) -> None:
        self.validated = REQUEST_CLOCK()

    @property
    def elapsed_s(self) -> float:
        return REQUEST_CLOCK() - self.arrival

    @property
    def validation_s(self) -> float:
        return (self.validated or self.arrival) - self.arrival

    def time_per_token_s(self, inference_s: float) -> float:
        """Inference time per generated token (TGI's mean time per token); 0 without tokens."""
        return inference_s / self.generated_tokens if self.generated_tokens else 0.0


def timing_headers(record: RequestRecord, compute_type: str, characters: int) -> dict[str, str]:
    """TGI's response headers: x-compute-time in seconds, the other times in whole milliseconds."""
    total = record.elapsed_s
    validation = record.validation_s
    queue = record.queue_s or 0.0
    inference = record.inference_s if record.inference_s is not None else max(0.0, total - validation - queue)
    per_token = record.time_per_token_s(inference)

    def ms(seconds: float) -> str:
        return str(int(seconds * 1000))

    return {
        "x-compute-type": compute_type,
        "x-compute-time": f"{total:.6f}",
        "x-compute-characters": str(characters),
        "x-total-time": ms(total),
        "x-validation-time": ms(validation),
        "x-queue-time": ms(queue),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(record.prompt_tokens),
        "x-generated-tokens": str(record.generated_tokens),
    }
