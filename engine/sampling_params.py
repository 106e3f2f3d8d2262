"""Per-request generation parameters, named as in TGI.

Validation raises ValueError naming the bad field, so the HTTP layer can turn it into a 422 unchanged. Values the
float32 sampler cannot represent act as their limit: see MIN_TEMPERATURE and REPETITION_PENALTY_RANGE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.grammar.spec import GrammarSpec

# Below this temperature sampling is argmax (the limit as temperature -> 0, as vLLM does): dividing float32 logits by
# a smaller value can overflow, and 1e-300 is 0 in float32.
MIN_TEMPERATURE = 1e-5
# A repetition penalty acts as the nearest bound of this range: 1e-300 (0 in float32) would divide logits by zero.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)
MAX_SEED = 2**64  # torch generators take 64-bit seeds


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    top_n_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    grammar: GrammarSpec | None = None  # constrain the output to a JSON schema or a regex (engine/grammar/)

    def __post_init__(self) -> None:
        if self.stop is None:
            object.__setattr__(self, "stop", ())
        elif isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be strictly positive, got {self.max_new_tokens!r}")
        for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"`temperature` must be strictly positive, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"`top_k` must be strictly positive, got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"`top_p` must be > 0.0 and <= 1.0, got {self.top_p!r}")
        if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
            raise ValueError(f"`typical_p` must be > 0.0 and <= 1.0, got {self.typical_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"`repetition_penalty` must be strictly positive, got {self.repetition_penalty!r}")
        if self.frequency_penalty is not None and not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"`frequency_penalty` must be >= -2.0 and <= 2.0, got {self.frequency_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED):
            raise ValueError(f"`seed` must be >= 0 and < 2^64, got {self.seed!r}")
        if not isinstance(self.top_n_tokens, int) or self.top_n_tokens < 0:
            raise ValueError(f"`top_n_tokens` must be >= 0, got {self.top_n_tokens!r}")
        if self.grammar is not None and not isinstance(self.grammar, GrammarSpec):
            raise ValueError(f"`grammar` must be a GrammarSpec, got {type(self.grammar).__name__}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"`stop` sequences must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding. As in TGI, setting any warper (temperature != 1, top_k, top_p < 1,
        typical_p < 1) turns sampling on even without `do_sample`; top_k == 1 and a temperature below
        MIN_TEMPERATURE are argmax."""
        if self.top_k == 1 or (self.temperature is not None and self.temperature < MIN_TEMPERATURE):
            return True
        warped = (
            (self.temperature is not None and self.temperature != 1.0)
            or self.top_k is not None
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )
        return not (self.do_sample or warped)

    @property
    def needs_processing(self) -> bool:
        """Whether logits must be changed before argmax (penalties) even when greedy."""
        return bool((self.repetition_penalty is not None and self.repetition_penalty != 1.0) or self.frequency_penalty)

    @property
    def effective_repetition_penalty(self) -> float | None:
        """The penalty the sampler applies: None when off, else clamped to REPETITION_PENALTY_RANGE."""
        p = self.repetition_penalty
        if p is None or p == 1.0:
            return None
        low, high = REPETITION_PENALTY_RANGE
        return min(max(float(p), low), high)
