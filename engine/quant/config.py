"""Which quantization a model is served with, resolved once at start-up from the requested method
(HF_MODEL_QUANTIZE / QUANTIZE, TGI's values plus int4 / int8 / gguf / none), the checkpoint's own
`quantization_config` and the device. A request that contradicts the checkpoint, or that the device cannot run,
raises QuantizationError with one line naming both.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

# What HF_MODEL_QUANTIZE accepts. None (unset): whatever the checkpoint holds.
METHODS = (
    "none", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq", "fp8", "int8", "int4", "gguf",
)  # fmt: skip
PRE_QUANTIZED = ("gptq", "awq", "fp8", "bitsandbytes")  # checkpoint formats read as they are
AT_LOAD = ("int4", "int8", "fp8", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4")  # made from 16-bit weights
GGUF_NATIVE_TYPES = ("Q4_0", "Q4_1", "Q8_0")  # GGUF tensor types kept quantized (others are dequantized)


class QuantizationError(ValueError):
    """The requested quantization contradicts the checkpoint or cannot run on this device."""


@dataclass(frozen=True)
class QuantConfig:
    method: str  # gptq | awq | fp8 | bitsandbytes | bitsandbytes-nf4 | bitsandbytes-fp4 | int4 | int8 | gguf
    bits: int = 4
    group_size: int = 128  # -1: one group over every input
    desc_act: bool = False  # GPTQ act-order: g_idx maps inputs to groups
    zero_offset: int = 0  # GPTQ v1 checkpoints store zero points minus one
    sym: bool = False
    fp8_block: tuple[int, int] | None = None  # fp8 checkpoints with block scales (weight_scale_inv)
    pre_quantized: bool = False  # read from a quantized checkpoint (else made at load)
    checkpoint: dict[str, Any] = field(default_factory=dict, compare=False)

    def describe(self) -> str:
        if self.method in ("int4", "int8"):
            return f"{self.method} g{self.group_size}"
        if self.method in ("gptq", "awq"):
            g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
            return f"{self.method} int{self.bits} {g}" + (" act-order" if self.desc_act else "")
        return self.method


def checkpoint_method(hf_config) -> tuple[str | None, dict[str, Any]]:
    """(format, its quantization_config) of a pre-quantized checkpoint, or (None, {})."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None, {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = str(qc.get("quant_method", "")).lower()
    if method == "compressed-tensors":
        method = _compressed_tensors_method(qc)
    if method in ("gptq", "awq", "fp8", "bitsandbytes"):
        return method, qc
    raise QuantizationError(
        f"the checkpoint's quantization_config has quant_method {qc.get('quant_method')!r}, which is not supported "
        f"(supported: gptq, awq, fp8, bitsandbytes, compressed-tensors holding one of those)"
    )


def _compressed_tensors_method(qc: dict[str, Any]) -> str:
    fmt = str(qc.get("format", ""))
    if fmt in ("float-quantized", "naive-quantized") or "fp8" in fmt:
        for group in (qc.get("config_groups") or {}).values():
            weights = group.get("weights") or {}
            if weights.get("type") == "float" and weights.get("num_bits") == 8:
                qc.setdefault("weight_block_size", weights.get("block_structure"))
                return "fp8"
    return f"compressed-tensors ({fmt or 'unknown format'})"


def _bnb_mode(qc: dict[str, Any]) -> str:
    if qc.get("load_in_4bit"):
        return "bitsandbytes-fp4" if qc.get("bnb_4bit_quant_type", "fp4") == "fp4" else "bitsandbytes-nf4"
    return "bitsandbytes"


def _from_checkpoint(method: str, qc: dict[str, Any]) -> QuantConfig:
    if method in ("gptq", "awq"):
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if bits != 4:
            raise QuantizationError(f"{method} checkpoints with {bits}-bit weights are not supported (4-bit only)")
        group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        version = str(qc.get("version", "gemm")).lower()
        if method == "awq" and version not in ("gemm", ""):
            raise QuantizationError(f"AWQ checkpoints of version {version!r} are not supported (GEMM only)")
        return QuantConfig(
            method, bits, group, bool(qc.get("desc_act", False)), 1 if method == "gptq" and fmt == "gptq" else 0,
            bool(qc.get("sym", False)), pre_quantized=True, checkpoint=qc,
        )  # fmt: skip
    if method == "fp8":
        block = qc.get("weight_block_size")
        return QuantConfig("fp8", 8, fp8_block=tuple(block) if block else None, pre_quantized=True,
                           checkpoint=qc)  # fmt: skip
    mode = _bnb_mode(qc)
    return QuantConfig(mode, 4 if "-" in mode else 8, pre_quantized=True, checkpoint=qc)


def resolve_quantization(
    requested: str | None,
    hf_config,
    gguf: bool,
    device: torch.device,
    variable: str = "quantize",
    group_size: int = 128,
) -> QuantConfig | None:
    """The quantization to serve with; None: the serving dtype throughout (GGUF dequantized)."""
    found, qc = checkpoint_method(hf_config)
    if requested is not None and requested not in METHODS:
        raise QuantizationError(f"quantization must be one of {', '.join(METHODS)}, got {requested!r}")
    if found is not None:
        conf = _from_checkpoint(found, qc)
        same = requested in (None, found, conf.method) or (found == "bitsandbytes" and requested == conf.method)
        if not same:
            raise QuantizationError(
                f"{requested} contradicts the checkpoint, which is {conf.method}-quantized "
                f"(quantization_config.quant_method={qc.get('quant_method')!r}); leave the quantization unset or set "
                f"{conf.method}"
            )
        check_device(conf, device)
        return conf
    if requested in ("gptq", "awq"):
        raise QuantizationError(
            f"{requested} needs a {requested.upper()} checkpoint (config.json quantization_config), "
            f"but the model has none; use int4 to quantize 16-bit weights at load"
        )
    if gguf:
        if requested is None or requested == "gguf":
            return QuantConfig("gguf", 4, 32, pre_quantized=True)
        if requested == "none":
            return None
    elif requested == "gguf":
        raise QuantizationError("gguf needs a .gguf model file")
    if requested in (None, "none"):
        return None
    bits = {"int4": 4, "int8": 8, "fp8": 8, "bitsandbytes": 8}.get(requested, 4)
    conf = QuantConfig(requested, bits, group_size, sym=requested == "int8")
    check_device(conf, device)
    return conf


def check_device(conf: QuantConfig, device: torch.device) -> None:
    if conf.method == "fp8" and not conf.pre_quantized:
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if cap is None or cap < (8, 9):
            where = "the CPU" if cap is None else f"a GPU of compute capability {cap[0]}.{cap[1]}"
            raise QuantizationError(f"fp8 needs a GPU with FP8 (compute capability 8.9+: L4, L40S, H100), not {where}")
    if conf.method.startswith("bitsandbytes") and importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError(
            f"{conf.method} needs the bitsandbytes package (pip install 'sagemaker-llm-server[quant]')"
        )
