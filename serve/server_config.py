"""The HTTP layer's limits and switches, as one frozen dataclass (TGI's router arguments).

Built by the container's settings module (which reads the environment) or by hand; this module
never reads the environment itself. `from_model_info` fills the context limits from the engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from serve.engine_protocol import ModelInfo


@dataclass(frozen=True)
class ServerConfig:
    model_id: str
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    max_client_batch_size: int = 4
    payload_limit: int = 6 * 2**20  # bytes; SageMaker's own request limit is 6 MB
    api_key: str | None = field(default=None, repr=False)
    log_prompts: bool = False
    messages_api_enabled: bool = True  # SageMaker's /invocations takes OpenAI chat bodies (`messages`)
    metrics_dir: str | None = None  # prometheus_client multiprocess directory (gunicorn workers)
    # Cap on max_new_tokens when a request gives none; None = TGI: max_total_tokens - input tokens.
    default_max_new_tokens: int | None = None
    # return_full_text when a TGI-shaped /invocations or / request does not say (TGI: True for hub
    # models tagged text-generation). /generate always defaults to False.
    default_return_full_text: bool = False
    compute_type: str | None = None  # x-compute-type header; None = the engine's device type

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        positive = (
            "max_input_tokens",
            "max_total_tokens",
            "max_concurrent_requests",
            "max_best_of",
            "max_client_batch_size",
            "payload_limit",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_stop_sequences", "max_top_n_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.max_input_tokens >= self.max_total_tokens:
            raise ValueError(
                f"max_input_tokens ({self.max_input_tokens}) must be < max_total_tokens ({self.max_total_tokens})"
            )
        if self.default_max_new_tokens is not None and (
            not isinstance(self.default_max_new_tokens, int) or self.default_max_new_tokens < 1
        ):
            raise ValueError(f"default_max_new_tokens must be a positive integer, got {self.default_max_new_tokens!r}")
        if not self.api_key:
            object.__setattr__(self, "api_key", None)  # an empty key means no authentication

    @classmethod
    def from_model_info(cls, info: ModelInfo, **overrides: Any) -> ServerConfig:
        """Limits taken from what the engine reports; keyword arguments override any field."""
        values: dict[str, Any] = {
            "model_id": info.model_id,
            "max_input_tokens": info.max_input_tokens,
            "max_total_tokens": info.max_total_tokens,
            "max_concurrent_requests": info.max_concurrent_requests,
        }
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)
