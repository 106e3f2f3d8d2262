"""bitsandbytes modes, quantized at load with bitsandbytes' own functions and multiplied with its own kernels
(CUDA, and its CPU backend): `bitsandbytes` is LLM.int8 (int8 rows, absmax scales, outlier activations above 6.0
in 16-bit), `bitsandbytes-nf4` / `-fp4` are 4-bit blocks of 64 with float32 absmax. The twin dequantizes with
bitsandbytes and runs `F.linear`. Pre-quantized bitsandbytes checkpoints are dequantized, then quantized again per
rank (the same blocks, so the same codes, where a rank holds whole rows or a multiple of 64 inputs).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch

THRESHOLD = 6.0  # LLM.int8 outlier threshold (TGI's and transformers' default)
BLOCK = 64


@dataclass
class BnbWeight:
    mode: str  # bitsandbytes | bitsandbytes-nf4 | bitsandbytes-fp4
    data: torch.Tensor  # int8 [N, K] (LLM.int8) or packed uint8 [N * K / 2, 1]
    state: Any  # bitsandbytes QuantState (4-bit) or the row scales SCB [N] (LLM.int8)
    n: int
    k: int

    @property
    def nbytes(self) -> int:
        if self.mode == "bitsandbytes":
            return self.data.numel() + self.state.numel() * 4
        s = self.state
        extra = s.absmax.numel() * s.absmax.element_size() + s.code.numel() * 4
        return self.data.numel() + extra


class _Int8CastNotice(logging.Filter):
    """bitsandbytes logs a warning on every LLM.int8 call whose input is not float16 (it quantizes a float16 copy,
    as meant here; bf16 outliers and output stay bf16): one line per layer per step otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@functools.cache
def _quiet_int8_cast_notice() -> None:
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Int8CastNotice())


def quantize(w: torch.Tensor, mode: str, device: torch.device, dtype: torch.dtype) -> BnbWeight:
    import bitsandbytes.functional as BF

    _quiet_int8_cast_notice()
    n, k = w.shape
    w = w.to(device=device, dtype=dtype).contiguous()
    if mode == "bitsandbytes":
        cb, scb, _ = BF.int8_vectorwise_quant(w.to(torch.float16))
        return BnbWeight(mode, cb, scb, n, k)
    q, state = BF.quantize_4bit(
        w, quant_type=mode.removeprefix("bitsandbytes-"), blocksize=BLOCK, quant_storage=torch.uint8
    )
    return BnbWeight(mode, q, state, n, k)


def dequantize(w: BnbWeight) -> torch.Tensor:
    import bitsandbytes.functional as BF

    if w.mode == "bitsandbytes":
        return w.data.float() * (w.state.float().unsqueeze(1) / 127.0)
    return BF.dequantize_4bit(w.data, w.state).float()


def matmul(x: torch.Tensor, w: BnbWeight, bias: torch.Tensor | None) -> torch.Tensor:
    import bitsandbytes as bnb

    if w.mode == "bitsandbytes":
        state = bnb.MatmulLtState()
        state.CB, state.SCB, state.threshold = w.data, w.state, THRESHOLD
        state.has_fp16_weights, state.is_training = False, False
        return bnb.matmul(x, w.data, state=state, bias=bias).to(x.dtype)
    return bnb.matmul_4bit(x, w.data.t(), quant_state=w.state, bias=bias).to(x.dtype)


def checkpoint_parts(mode: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) tensor suffixes of a pre-quantized bitsandbytes weight, named as engine/loader.py
    normalizes them (`weight.absmax` -> `weight_absmax`)."""
    if mode == "bitsandbytes":
        return ("weight", "SCB"), ("weight_format",)
    qs = f"weight_quant_state_bitsandbytes__{mode.removeprefix('bitsandbytes-')}"
    return ("weight", "weight_absmax", "weight_quant_map", qs), ("weight_nested_absmax", "weight_nested_quant_map")


def complete(parts: dict[str, torch.Tensor], mode: str) -> bool:
    """Whether every part has arrived (double-quantized 4-bit states also need their nested parts)."""
    if mode == "bitsandbytes":
        return True
    from bitsandbytes.utils import unpack_tensor_to_dict

    qs = next(v for k, v in parts.items() if k.startswith("weight_quant_state"))
    nested = "nested_blocksize" in unpack_tensor_to_dict(qs)
    return not nested or all(k in parts for k in ("weight_nested_absmax", "weight_nested_quant_map"))


def from_checkpoint(parts: dict[str, torch.Tensor], mode: str) -> torch.Tensor:
    """A pre-quantized bitsandbytes weight dequantized (float32 [N, K])."""
    if mode == "bitsandbytes":
        return parts["weight"].float() * (parts["SCB"].float().unsqueeze(1) / 127.0)
    import bitsandbytes.functional as BF

    state: dict[str, torch.Tensor] = {}
    for key, value in parts.items():
        if key.startswith("weight_quant_state_"):
            state["quant_state." + key.removeprefix("weight_quant_state_")] = value
        elif key != "weight":
            state[key.removeprefix("weight_")] = value
    quant_state = BF.QuantState.from_dict(state, device=torch.device("cpu"))
    return BF.dequantize_4bit(parts["weight"], quant_state).float()
