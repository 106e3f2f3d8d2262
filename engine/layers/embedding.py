"""Vocabulary-parallel token embedding and LM head: each rank holds a contiguous slice of the vocab.

The embedding masks ids outside its slice and all-reduces; the LM head all-gathers its logits slice. A GGUF-native
build serves the head from the file's own Q4_0 / Q4_1 / Q8_0 codes on the plan's int matmul (engine/quant/matmul.py);
an embedding tied to such a head dequantizes the rows it looks up from those codes (exactly as IntWeight.dequantize,
then the dtype), so no 16-bit table is kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.cpu_gemm import PackedWeight
from engine.layers.cpu_packing import pack_weight, packed_linear
from engine.parallel import get_parallel_state
from engine.quant import cpu_kernel
from engine.quant.cpu_kernel import PackedInt
from engine.quant.int_weight import IntWeight, concat_outputs
from engine.quant.layer import current_build
from engine.quant.matmul import IntMatmul
from engine.weight_slice import Weight, materialize, narrow_clamped

INT_KERNELS = (*cpu_kernel.KERNELS, "triton", "twin")  # the plan's matmuls for IntWeight (engine/plan.py)


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
        self.codes: PackedInt | None = None  # tied to a quantized head: rows gathered from its panels (share_codes)

    def weight_loader(self, param: nn.Parameter, loaded: Weight | IntWeight) -> None:
        """A quantized table (GGUF-native) is looked up dequantized: float32, then rounded to the dtype."""
        rows = narrow_clamped(loaded, 0, self.vocab_start, self.rows_per_rank)
        if rows.shape[1] != param.shape[1]:
            raise ValueError(f"embedding width {rows.shape[1]} != hidden size {param.shape[1]}")
        dense = rows.dequantize() if isinstance(rows, IntWeight) else materialize(rows)
        param.data[: rows.shape[0]].copy_(dense)
        param.data[rows.shape[0] :].zero_()

    def share_codes(self, head: ParallelLMHead) -> bool:
        """Look rows up in the tied head's codes (int8 or int4 panels) and drop the 16-bit table; False where the head
        is not quantized (or its inputs are permuted)."""
        qm = head.qmatmul
        if qm is None or qm.packed.perm is not None:
            return False
        self.codes, self.lookup_dtype, head.shares_dense_weight = qm.packed, self.weight.dtype, False
        self.weight = head.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)
        return True

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """[...] ids of this rank's rows -> [..., hidden] in the dtype."""
        p = self.codes
        if p is None:
            return F.embedding(ids, self.weight)
        # row r is panel r // 16, lane r % 16 (csrc/gemm_q.c); a lane holds its inputs in pairs
        panel, lane = ids // 16, ids % 16
        if p.bits == 8:  # panels [panels, k/2 pair steps, 16 lanes, 2]
            q = p.codes.view(torch.int8).view(-1, p.k // 2, 16, 2)[panel, :, lane]  # [..., k/2, 2]
        else:  # panels [panels, k/8 quads, 16 lanes, 2] uint16: nibble j is pair step 4t + j, inputs 8t + 2j + (0, 1)
            quads = p.codes.view(torch.int16).view(-1, p.k // 8, 16, 2)[panel, :, lane].int() & 0xFFFF
            q = torch.stack([(quads >> (4 * j)) & 15 for j in range(4)], dim=-2)  # [..., k/8, 4, 2]
        q = q.reshape(*ids.shape, p.k // p.group_size, p.group_size).float()  # [..., G, group]
        s = p.scales[panel, :, lane].float().unsqueeze(-1)  # [..., G, 1]
        offsets = None if p.offsets is None else p.offsets[panel, :, lane].float().unsqueeze(-1)
        if p.offset_kind == "zero":  # the operations of IntWeight.dequantize_stored, so its values bit for bit
            w = (q - offsets) * s
        else:
            w = q * s if offsets is None else q * s + offsets
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
    shares_dense_weight = False  # quantized, while its 16-bit weight stays for a tied embedding that kept its table

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
