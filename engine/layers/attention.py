"""The attention layer models call: `Attention(...)(q, k, v)` writes the step's K/V into this layer's paged cache and
attends, through the backend the execution plan chose (engine/attention/). The layer holds the cache and its options;
the backend owns the layout and the kernels.

Options (each backend computes them or the plan does not pick it): `sliding_window` W (the query at position p sees
keys p-W+1..p), `logit_softcap` c (scores = c * tanh(scores / c) after scaling), `alibi_slopes` [H] (bias
slope_h * (key_pos - query_pos)), `position_bias` (a callable: key_pos - query_pos [q, n] int64 -> [H, q, n] bias
added to the scaled scores; T5's learned relative-position buckets).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.attention.base import current_metadata

if TYPE_CHECKING:
    from engine.attention.base import AttentionBackend


class Attention(nn.Module):
    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        *,
        sliding_window: int | None = None,
        logit_softcap: float | None = None,
        alibi_slopes: torch.Tensor | None = None,
        position_bias: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.alibi_slopes = None if alibi_slopes is None else alibi_slopes.detach().float()  # [H] of this rank
        self.position_bias = position_bias
        # Bound by the model runner once the plan is made and the cache allocated.
        self.backend: AttentionBackend | None = None
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    @property
    def has_options(self) -> bool:
        return bool(self.option_names)

    @property
    def option_names(self) -> frozenset[str]:
        names = {"sliding_window": self.sliding_window, "logit_softcap": self.logit_softcap}
        names["alibi"] = self.alibi_slopes
        names["position_bias"] = self.position_bias
        return frozenset(n for n, v in names.items() if v is not None)

    def bind(self, backend: AttentionBackend, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.backend, self.k_cache, self.v_cache = backend, k_cache, v_cache
        if self.alibi_slopes is not None:
            self.alibi_slopes = self.alibi_slopes.to(k_cache.device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        meta = current_metadata()
        if meta is None or self.backend is None:
            raise RuntimeError("Attention called outside a step (no metadata, or no backend bound)")
        self.backend.write_kv(self, k, v, meta)
        return self.backend.attend(self, q, k, v, meta)
