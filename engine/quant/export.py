"""Quantized checkpoints written from a 16-bit safetensors one, in each format's on-disk layout: GPTQ (v1: zero
points stored minus one; optionally act-order with a shuffled g_idx), AWQ (GEMM, interleaved nibbles) and FP8
(compressed-tensors' float-quantized: e4m3 weights, per-channel weight_scale). Round-to-nearest codes, not GPTQ's or
AWQ's search: for tests and benchmarks, which need the layouts and the kernels' work, not the best accuracy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.quant import awq, fp8, gptq
from engine.quant.int_weight import IntWeight

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _zero_point_int4(w: torch.Tensor, group: int, perm: torch.Tensor | None) -> tuple[IntWeight, torch.Tensor | None]:
    """Asymmetric int4 with integer zero points 1..15 (GPTQ v1 cannot store 0), groups over `perm` order."""
    n, k = w.shape
    x = (w if perm is None else w[:, perm]).float().view(n, k // group, group)
    lo, hi = x.amin(-1).clamp(max=-1e-4), x.amax(-1).clamp(min=1e-4)
    scale = ((hi - lo) / 14).half()
    zero = torch.round(-lo / scale.float()).clamp(1, 15)
    q = torch.round(x / scale.float().unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    iw = IntWeight(4, q.view(n, k), scale, zero.half(), "zero", group, perm)
    g_idx = None
    if perm is not None:  # input perm[j] is in group j // group
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
    return iw, g_idx


def _copy_model(src: Path, dst: Path) -> dict[str, torch.Tensor]:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / "model.safetensors").unlink()
    return load_file(str(src / "model.safetensors"))


def _write(dst: Path, tensors: dict[str, torch.Tensor], quantization_config: dict, dtype: str = "float16") -> None:
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    config["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2))


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def write_gptq(src: Path, dst: Path, group: int = 32, act_order: bool = False, seed: int = 0) -> Path:
    state = _copy_model(src, dst)
    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(seed)
    perms: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if not is_linear(name):
            out[name] = w.half()
            continue
        # act-order: one input order per input (q, k and v see the same activations, so GPTQ orders them alike)
        proj = name.split(".")[-2]
        key = name.split(".")[2] + {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(proj, proj)
        if act_order and key not in perms:
            perms[key] = torch.randperm(w.shape[1], generator=g)
        perm = perms.get(key) if act_order else None
        iw, g_idx = _zero_point_int4(w, group, perm)
        for part, t in gptq.from_int_weight(iw, zero_offset=1, g_idx=g_idx).items():
            out[name.removesuffix("weight") + part] = t
    _write(dst, out, {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order, "sym": False,
                      "checkpoint_format": "gptq", "true_sequential": True})  # fmt: skip
    return dst


def write_awq(src: Path, dst: Path, group: int = 32) -> Path:
    state = _copy_model(src, dst)
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if not is_linear(name):
            out[name] = w.half()
            continue
        iw, _ = _zero_point_int4(w, group, None)
        for part, t in awq.from_int_weight(iw).items():
            out[name.removesuffix("weight") + part] = t
    _write(dst, out, {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    return dst


def write_fp8(src: Path, dst: Path) -> Path:
    state = _copy_model(src, dst)
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if not is_linear(name):
            out[name] = w.bfloat16()
            continue
        f = fp8.quantize(w)
        out[name] = f.q
        out[name.removesuffix("weight") + "weight_scale"] = f.scale.view(-1, 1)
    # compressed-tensors' float-quantized format (llm-compressor's FP8 checkpoints): per-channel weight_scale [N, 1]
    scheme = {"type": "float", "num_bits": 8, "strategy": "channel", "symmetric": True, "dynamic": False}
    group = {"targets": ["Linear"], "weights": scheme, "input_activations": None, "output_activations": None}
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": group}, "ignore": ["lm_head"]}  # fmt: skip
    _write(dst, out, config, dtype="bfloat16")
    return dst
