"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the vocab.

The embedding masks ids outside its slice and all-reduces; the LM head all-gathers its logits slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.cpu_gemm import PackedWeight
from engine.layers.cpu_packing import pack_weight, packed_linear
from engine.parallel import get_parallel_state
from engine.weight_slice import Weight, materialize, narrow_clamped


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = get_parallel_state()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.vocab_size = vocab_size
        # Pad so every rank holds the same number of rows; padded rows are never looked up.
        self.rows_per_rank = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader  # type: ignore[attr-defined]

    def weight_loader(self, param: nn.Parameter, loaded: Weight) -> None:
        rows = narrow_clamped(loaded, 0, self.vocab_start, self.rows_per_rank)
        if rows.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width {rows.shape[1]} != hidden size {param.shape[1]}")
        param.data[: rows.shape[0]].copy_(materialize(rows))
        param.data[rows.shape[0] :].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        y = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    packed: torch.Tensor | PackedWeight | None = None

    def pack_for_cpu(self, keep_plain: bool, gemm_kernel: bool = True) -> None:
        """Pack for CPU matmuls; `keep_plain` when the weight is shared with the embedding."""
        self.packed = pack_weight(self.weight.data, gemm_kernel)
        if self.packed is not None and not keep_plain:
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[N, hidden] -> [N, vocab_size] logits."""
        if self.packed is not None:
            local = packed_linear(hidden, self.packed, None)
        else:
            local = F.linear(hidden, self.weight)
        logits = self.tp.all_gather_last_dim(local)
        return logits[..., : self.vocab_size]
