"""The reference side of the quantized test checkpoints (written by engine/quant/export.py): their weights
dequantized under the 16-bit names.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.quant import awq, gptq
from engine.quant.export import LINEARS, is_linear, write_awq, write_fp8, write_gptq

__all__ = ["LINEARS", "dequantized_state", "is_linear", "write_awq", "write_fp8", "write_gptq"]


def dequantized_state(path: Path, method: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights dequantized to float32 under their 16-bit names (the reference)."""
    state = load_file(str(path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        base, _, part = name.rpartition(".")
        if method in ("gptq", "awq") and part in ("qzeros", "scales", "g_idx"):
            continue
        if method in ("gptq", "awq") and part == "qweight":
            parts = {
                p: state[f"{base}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx") if f"{base}.{p}" in state
            }
            if method == "gptq":
                w = gptq.to_int_weight(parts, config["group_size"], 1)
            else:
                w = awq.to_int_weight(parts, config["group_size"])
            out[f"{base}.weight"] = w.dequantize()
        elif method == "fp8" and part == "weight_scale":
            continue
        elif method == "fp8" and t.dtype == torch.float8_e4m3fn:
            out[name] = t.float() * state[f"{base}.weight_scale"].float()
        else:
            out[name] = t.float()
    return out
