"""How a linear layer is quantized: built under `building_quantized`, a LinearBase gets no 16-bit weight but
placeholder parameters named as the checkpoint's tensors (GPTQ's qweight / qzeros / scales / g_idx, FP8's weight /
weight_scale, or a plain `weight` quantized at load), whose loaders gather each part, turn it into the format's
canonical weight (IntWeight, Fp8Weight, or a plain tensor) and hand it to the layer's own weight loader, which
slices it for this rank as it slices a 16-bit weight. When every output row has arrived the layer is finalized:
its parts are stacked and packed for the plan's kernel, and the placeholders are dropped.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.quant import awq, bnb, fp8, gptq
from engine.quant.config import QuantConfig
from engine.quant.int_weight import IntWeight, concat_outputs, default_group_size, quantize
from engine.quant.matmul import BnbMatmul, Fp8Matmul, IntMatmul, QuantMatmul
from engine.weight_slice import materialize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantBuild:
    config: QuantConfig
    kernel: str  # the plan's choice (engine/plan.py: resolve_quant_kernel)
    device: torch.device
    dtype: torch.dtype


_building: QuantBuild | None = None


@contextmanager
def building_quantized(build: QuantBuild | None) -> Iterator[None]:
    """Linear layers built inside this block are quantized as `build` says (None: not at all)."""
    global _building
    previous, _building = _building, build
    try:
        yield
    finally:
        _building = previous


def current_build() -> QuantBuild | None:
    return _building


def checkpoint_parts(method: str, pre_quantized: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) checkpoint tensor suffixes of a layer's weight in this format (an optional plain
    `weight`: a layer the checkpoint left in 16 bits)."""
    if method == "gptq":
        return gptq.PARTS, gptq.OPTIONAL + ("weight",)
    if method == "awq":
        return awq.PARTS, awq.OPTIONAL + ("weight",)
    if method == "fp8" and pre_quantized:
        return ("weight",), ("weight_scale", "weight_scale_inv", "input_scale")
    if method.startswith("bitsandbytes") and pre_quantized:
        return bnb.checkpoint_parts(method)
    return ("weight",), ()


class QuantTarget:
    """Rows [offset, offset + rows) of a quantized layer's [out, in] weight, as its weight loaders see a parameter."""

    def __init__(self, state: LayerQuant, shape: tuple[int, int], offset: int = 0) -> None:
        self.state, self.shape, self.offset = state, torch.Size(shape), offset

    def dim(self) -> int:
        return 2

    def narrow(self, dim: int, start: int, length: int) -> QuantTarget:
        if dim != 0:
            raise ValueError("a quantized weight is filled by whole output rows")
        return QuantTarget(self.state, (length, self.shape[1]), self.offset + start)

    def assign(self, loaded) -> None:
        self.state.receive(self.offset, loaded)


class LayerQuant:
    """One linear layer's quantization: collects the checkpoint's parts, then finalizes the layer's matmul."""

    def __init__(self, layer: nn.Module, build: QuantBuild, shape: tuple[int, int]) -> None:
        self.layer, self.build, self.shape = layer, build, shape
        self.parts: dict[object, dict[str, torch.Tensor]] = {}
        self.rows: dict[int, object] = {}  # offset -> canonical piece
        self.names: list[str] = []
        method = build.config.method
        required, optional = checkpoint_parts(method, build.config.pre_quantized)
        if method == "gptq" and build.config.desc_act:  # act-order: the input order must be in before converting
            required, optional = required + ("g_idx",), tuple(o for o in optional if o != "g_idx")
        self.required = required
        for name in required + optional:
            p = nn.Parameter(torch.empty(0, device="cpu"), requires_grad=False)
            p.weight_loader = functools.partial(self.collect, name)  # type: ignore[attr-defined]
            p.optional = name in optional  # type: ignore[attr-defined]
            layer.register_parameter(name, p)
            self.names.append(name)

    @property
    def target(self) -> QuantTarget:
        return QuantTarget(self, self.shape)

    def collect(self, part: str, _param: nn.Parameter, loaded, shard=None) -> None:
        """A placeholder's loader: keep the part; once a shard's required parts are all in, convert and load it."""
        if part == "weight" and "weight" not in self.required:  # a layer the checkpoint left unquantized
            self._load(loaded, shard)
            return
        got = self.parts.setdefault(shard, {})
        got[part] = loaded
        if any(p not in got for p in self.required):
            return
        cfg = self.build.config
        if cfg.method.startswith("bitsandbytes") and cfg.pre_quantized:
            parts = {k: materialize(v) for k, v in got.items()}
            if not bnb.complete(parts, cfg.method):
                return
            canonical = bnb.from_checkpoint(parts, cfg.method)
        elif cfg.method in ("gptq", "awq") or (cfg.method == "fp8" and cfg.pre_quantized):
            if cfg.method == "fp8" and not any(k in got for k in ("weight_scale", "weight_scale_inv")):
                return  # the scale may come after the weight
            parts = {k: materialize(v) for k, v in got.items()}
            if cfg.method == "gptq":
                canonical = gptq.to_int_weight(parts, cfg.group_size, cfg.zero_offset)
            elif cfg.method == "awq":
                canonical = awq.to_int_weight(parts, cfg.group_size)
            else:
                canonical = fp8.from_checkpoint(parts, cfg.fp8_block)
        else:
            canonical = got["weight"]  # plain (or IntWeight from GGUF): the layer's loader slices it unread
        del self.parts[shard]
        self._load(canonical, shard)

    def _load(self, canonical, shard) -> None:
        loader = self.layer.weight_loader
        if shard is None:
            loader(self.target, canonical)
        else:
            loader(self.target, canonical, shard)

    def receive(self, offset: int, loaded) -> None:
        if not isinstance(loaded, (IntWeight, fp8.Fp8Weight)):
            loaded = materialize(loaded)
            if self.build.config.method in ("int4", "int8"):  # quantized as it arrives: no whole 16-bit model kept
                group = default_group_size(loaded.shape[1], self.build.config.group_size)  # this rank's inputs
                loaded = quantize(loaded, self.build.config.bits, group)
        self.rows[offset] = loaded
        if sum(p.shape[0] for p in self.rows.values()) >= self.shape[0]:
            self.finalize()

    def finalize(self) -> None:
        pieces = [self.rows[o] for o in sorted(self.rows)]
        b, layer = self.build, self.layer
        matmul: QuantMatmul | None = None
        if all(isinstance(p, IntWeight) for p in pieces):
            matmul = IntMatmul(concat_outputs(pieces), b.kernel, b.device)
        elif all(isinstance(p, fp8.Fp8Weight) for p in pieces) and b.kernel in ("scaled_mm", "twin"):
            matmul = Fp8Matmul(fp8.concat(pieces), b.kernel, b.device)
        else:  # plain rows: quantized now (bitsandbytes, fp8 at load), or served plain (FP8 without an FP8 GPU, GGUF
            # types without a kernel)
            plain = torch.cat([p.dequantize() if hasattr(p, "dequantize") else p.float() for p in pieces])
            if b.config.method.startswith("bitsandbytes"):
                matmul = BnbMatmul(bnb.quantize(plain, b.config.method, b.device, b.dtype), b.kernel)
            elif b.config.method == "fp8" and b.kernel == "scaled_mm":
                matmul = Fp8Matmul(fp8.quantize(plain), b.kernel, b.device)
            else:
                layer.weight = nn.Parameter(plain.to(device=b.device, dtype=b.dtype), requires_grad=False)
        for name in self.names:
            if name != "weight" or matmul is not None:
                layer._parameters.pop(name, None)
        layer.qmatmul = matmul
        layer.quant = None  # done: the collector and its parts go


def finish(model: nn.Module) -> None:
    """After loading: every quantized layer must have been completed by the checkpoint."""
    for name, module in model.named_modules():
        if getattr(module, "quant", None) is not None:
            raise ValueError(f"checkpoint is missing quantized weights of {name!r}")
