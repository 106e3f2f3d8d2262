"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the vocab.

The embedding masks ids outside its slice and all-reduces; the LM head all-gathers its logits slice. A GGUF-native
build serves the head from the file's own Q4_0 / Q4_1 / Q8_0 codes on the plan's int matmul (engine/quant/matmul.py);
an embedding tied to an int8 head dequantizes the rows it looks up from those codes (exactly: q * d, then the dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.cpu_gemm import PackedWeight
from engine.layers.cpu_packing import pack_weight, packed_linear
from engine.parallel import get_parallel_state
from engine.quant.cpu_kernel import PackedInt
from engine.quant.int_weight import IntWeight, concat_outputs
from engine.quant.layer import current_build
from engine.quant.matmul import IntMatmul
from engine.weight_slice import Weight, materialize, narrow_clamped

INT_KERNELS = ("cpu_kernel", "cpu_amx", "triton", "twin")  # the plan's matmuls for IntWeight (engine/plan.py)


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
        self.codes: PackedInt | None = None  # tied to an int8 head: rows gathered from its panels (share_codes)

    def weight_loader(self, param: nn.Parameter, loaded: Weight | IntWeight) -> None:
        """A quantized table (GGUF-native) is looked up dequantized: float32, then rounded to the dtype."""
        rows = narrow_clamped(loaded, 0, self.vocab_start, self.rows_per_rank)
        if rows.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width {rows.shape[1]} != hidden size {param.shape[1]}")
        dense = rows.dequantize() if isinstance(rows, IntWeight) else materialize(rows)
        param.data[: rows.shape[0]].copy_(dense)
        param.data[rows.shape[0] :].zero_()

    def share_codes(self, head: ParallelLMHead) -> bool:
        """Look rows up in the tied head's int8 codes and drop the 16-bit table; False (the table stays) for int4
        codes, whose nibble panels are not gathered here."""
        qm = head.qmatmul
        if qm is None or qm.bits != 8 or qm.packed.perm is not None or qm.packed.offsets is not None:
            return False
        self.codes, self.lookup_dtype, head.shares_dense_weight = qm.packed, self.weight.dtype, False
        self.weight = head.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """[...] ids of this rank's rows -> [..., hidden] in the dtype."""
        p = self.codes
        if p is None:
            return F.embedding(ids, self.weight)
        # codes panels [panels, k/2 pair steps, 16 rows, 2]: row r is panel r // 16, lane r % 16 (csrc/gemm_q.c)
        panel, lane = ids // 16, ids % 16
        q = p.codes.view(torch.int8).view(-1, p.k // 2, 16, 2)[panel, :, lane]  # [..., k/2, 2]
        s = p.scales[panel, :, lane]  # [..., G] float16
        w = q.reshape(*ids.shape, -1, p.group_size).float() * s.float().unsqueeze(-1)  # as IntWeight.dequantize
        return w.reshape(*ids.shape, p.k).to(self.lookup_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        y = self._lookup(local.masked_fill(outside, 0))
        return self.tp.all_reduce(y.masked_fill(outside.unsqueeze(-1), 0))


def _pad_rows(w: IntWeight, rows: int) -> IntWeight:
    """`w` with zero rows (zero scales: zero logits) up to `rows` outputs."""
    n = rows - w.shape[0]
    if n <= 0:
        return w
    zero = IntWeight(
        w.bits, w.codes.new_zeros(n, w.shape[1]), w.scales.new_zeros(n, w.num_groups),
        None if w.offsets is None else w.offsets.new_zeros(n, w.num_groups), w.offset_kind, w.group_size, w.perm,
    )  # fmt: skip
    return concat_outputs([w, zero])


class ParallelLMHead(VocabParallelEmbedding):
    packed: torch.Tensor | PackedWeight | None = None
    shares_dense_weight = False  # quantized, while its 16-bit weight stays for the tied embedding's lookups (int4)

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(vocab_size, hidden_size)
        self.build = current_build()  # a quantized build: a quantized head may keep its codes
        self.qmatmul: IntMatmul | None = None  # the checkpoint's own quantized head (GGUF-native), on the plan's kernel

    def load_quantized(self, w: IntWeight, tied: bool) -> bool:
        """Serve this rank's rows of `w` [vocab, hidden] on the build's int matmul; False where the build has none
        (the head then loads dequantized, in the dtype). `tied`: the 16-bit weight stays for the embedding."""
        build = self.build
        if build is None or build.kernel not in INT_KERNELS:
            return False
        rows = narrow_clamped(w, 0, self.vocab_start, self.rows_per_rank)
        if rows.shape[1] != self.weight.shape[1]:
            raise ValueError(f"LM head width {rows.shape[1]} != hidden size {self.weight.shape[1]}")
        self.qmatmul = IntMatmul(_pad_rows(rows, self.rows_per_rank), build.kernel, build.device)
        self.shares_dense_weight = tied
        if not tied:
            self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True

    def pack_for_cpu(self, keep_plain: bool, gemm_kernel: bool = True) -> None:
        """Pack for CPU matmuls; `keep_plain` when the weight is shared with the embedding."""
        if self.qmatmul is not None:
            return
        self.packed = pack_weight(self.weight.data, gemm_kernel)
        if self.packed is not None and not keep_plain:
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def local_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, rows_per_rank]: this rank's slice of the vocabulary (padded rows give 0)."""
        if self.qmatmul is not None:
            return self.qmatmul(hidden, None)
        if self.packed is not None:
            return packed_linear(hidden, self.packed, None)
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[N, hidden] -> [N, vocab_size] logits."""
        logits = self.tp.all_gather_last_dim(self.local_logits(hidden))
        return logits[..., : self.vocab_size]
