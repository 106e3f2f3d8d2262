"""Linear layers that shard across tensor-parallel ranks, each parameter with its own weight loader.

Column-parallel layers split the output dimension (no communication); row-parallel layers split the
input dimension and all-reduce the output. Merged (gate/up) and QKV layers pack several checkpoint
tensors into one matmul; `weight_loader(param, tensor, shard_id)` places each part. Loaders narrow a
checkpoint tensor (or a not-yet-read safetensors slice) to this rank's part before reading it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.cpu_gemm import PackedWeight
from engine.layers.cpu_packing import pack_weight, packed_linear
from engine.parallel import divide, get_parallel_state
from engine.quant.layer import LayerQuant, QuantTarget, current_build
from engine.weight_slice import Weight, materialize


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader  # type: ignore[attr-defined]
    return p


class LinearBase(nn.Module):
    """Holds `weight` [out, in] and `bias`; on CPU in 16-bit, matmuls run on a packed copy (the compiled bf16
    kernel's or oneDNN's).

    `pack_for_cpu` is called once after loading (see layers/cpu_packing.py). Built under `building_quantized`, the
    layer holds no 16-bit weight: engine/quant/layer.py loads the checkpoint's parts and sets `qmatmul`.
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    packed: torch.Tensor | PackedWeight | None = None
    quant: LayerQuant | None = None  # while loading a quantized layer

    def __init__(self) -> None:
        super().__init__()
        self.qmatmul: nn.Module | None = None  # the quantized layer's matmul, once loaded

    def _quantize_if_building(self) -> None:
        """Under `building_quantized`: drop the 16-bit weight for the checkpoint's quantized parts."""
        build = current_build()
        if build is None:
            return
        shape = tuple(self.weight.shape)
        del self.weight
        self.quant = LayerQuant(self, build, shape)

    def pack_for_cpu(self, gemm_kernel: bool = True) -> None:
        if self.qmatmul is not None:
            return
        self.packed = pack_weight(self.weight.data, gemm_kernel)
        if self.packed is not None:  # the plain copy is no longer read
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype), requires_grad=False)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.qmatmul is not None:
            return self.qmatmul(x, bias)
        if self.packed is None:
            return F.linear(x, self.weight, bias)
        return packed_linear(x, self.packed, bias)


def _mark_shards(layer: LinearBase, shards: list) -> None:
    """The shard ids a packed parameter loads from separate checkpoint tensors (all of them make it complete)."""
    for p in layer.parameters(recurse=False):  # weight, bias, and a quantized format's placeholders
        p.shards = shards  # type: ignore[attr-defined]


def _copy(param: nn.Parameter | torch.Tensor, loaded: Weight) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor shape {tuple(loaded.shape)} != parameter shape {tuple(param.shape)}")
    if isinstance(param, QuantTarget):
        param.assign(loaded)
        return
    param.data.copy_(materialize(loaded))


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = _param((output_size, input_size), self.weight_loader)
        self.bias = _param((output_size,), self.weight_loader) if bias else None
        self._quantize_if_building()

    def weight_loader(self, param: nn.Parameter, loaded: Weight) -> None:
        _copy(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (outputs) split across ranks; each rank returns its slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = get_parallel_state()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.output_size_per_rank = divide(output_size, self.tp_size, "linear output size")
        self.weight = _param((self.output_size_per_rank, input_size), self.weight_loader)
        self.bias = _param((self.output_size_per_rank,), self.weight_loader) if bias else None
        self._quantize_if_building()

    def weight_loader(self, param: nn.Parameter, loaded: Weight) -> None:
        size = param.shape[0]
        _copy(param, loaded.narrow(0, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate_proj + up_proj)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)
        _mark_shards(self, list(range(len(output_sizes))))

    def weight_loader(self, param: nn.Parameter, loaded: Weight, shard_id: int | None = None) -> None:
        """One part (`shard_id`), or all parts fused one after the other in one checkpoint tensor (None)."""
        if shard_id is None:
            offset = 0
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, loaded.narrow(0, offset, size), i)
                offset += size
            return
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _copy(param.narrow(0, offset, size), loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul. KV heads fewer than ranks are replicated.

    Checkpoints hold q, k and v as three tensors (loaded with shard ids "q", "k", "v") or as one fused tensor
    (shard id None) laid out as `fused_layout` says: "contiguous" [q; k; v], "per_head" [H, 3, hd] (q, k, v of
    each head together; H == Hkv), or "grouped" [Hkv, H / Hkv + 2, hd] (each KV group's queries, then its k, v).
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        fused_layout: str = "contiguous",
    ) -> None:
        tp = get_parallel_state().world_size
        if fused_layout not in ("contiguous", "per_head", "grouped"):
            raise ValueError(f"unknown fused qkv layout {fused_layout!r}")
        self.head_dim, self.fused_layout = head_dim, fused_layout
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = divide(num_heads, tp, "number of attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = divide(num_kv_heads, tp, "number of key/value heads")
        else:
            divide(tp, num_kv_heads, "tensor-parallel degree over key/value heads")
            self.num_kv_heads = 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)
        _mark_shards(self, ["q", "k", "v"])

    def weight_loader(self, param: nn.Parameter, loaded: Weight, shard_id: str | None = None) -> None:
        if shard_id is None:
            for part, tensor in self._split_fused(loaded).items():
                self.weight_loader(param, tensor, part)
            return
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        if shard_id == "q":
            rank_index = self.tp_rank
        else:  # with replicated KV heads, ranks sharing a head load the same slice
            total_kv_heads = loaded.shape[0] // self.head_dim
            rank_index = (
                self.tp_rank * total_kv_heads // self.tp_size if total_kv_heads < self.tp_size else self.tp_rank
            )
        _copy(param.narrow(0, offset, size), loaded.narrow(0, rank_index * size, size))

    def _split_fused(self, loaded: Weight) -> dict[str, Weight]:
        """A fused qkv checkpoint tensor [(H + 2 Hkv) * hd, ...] -> the full q, k and v tensors."""
        h, hkv, hd = self.total_num_heads, self.total_num_kv_heads, self.head_dim
        if self.fused_layout == "contiguous":  # a slice narrows without reading
            return {"q": loaded.narrow(0, 0, h * hd), "k": loaded.narrow(0, h * hd, hkv * hd),
                    "v": loaded.narrow(0, (h + hkv) * hd, hkv * hd)}  # fmt: skip
        w = materialize(loaded)  # interleaved layouts: read whole, then regroup
        rest = w.shape[1:]
        if self.fused_layout == "per_head":
            w = w.view(h, 3, hd, *rest)
            return {part: w[:, i].reshape(h * hd, *rest) for i, part in enumerate("qkv")}
        g = h // hkv
        w = w.view(hkv, g + 2, hd, *rest)
        return {"q": w[:, :g].reshape(h * hd, *rest), "k": w[:, g].reshape(hkv * hd, *rest),
                "v": w[:, g + 1].reshape(hkv * hd, *rest)}  # fmt: skip


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (inputs) split across ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__()
        self.tp = get_parallel_state()
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.input_size_per_rank = divide(input_size, self.tp_size, "linear input size")
        self.weight = _param((output_size, self.input_size_per_rank), self.weight_loader)
        self.bias = _param((output_size,), self.weight_loader) if bias else None
        self._quantize_if_building()

    def weight_loader(self, param: nn.Parameter, loaded: Weight) -> None:
        if param.dim() == 1:  # bias: added once, after the reduction
            _copy(param, loaded)
            return
        size = param.shape[1]
        _copy(param, loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, None)
        if self.tp_size > 1:
            y = self.tp.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y
