"""GGUF Q4_0, Q4_1 and Q8_0 tensors onto IntWeight, losslessly: blocks of 32 inputs with fp16 d (and m) become
groups of 32 with fp16 scales (and mins), so IntWeight.dequantize() equals `gguf.dequantize` bit for bit:

    Q4_0: 2-byte d, 16 bytes of nibbles (element j low, j + 16 high); w = (q - 8) * d  (zero point 8)
    Q4_1: 2-byte d, 2-byte m, 16 bytes of nibbles;                   w = q * d + m
    Q8_0: 2-byte d, 32 int8;                                          w = q * d
"""

from __future__ import annotations

import numpy as np
import torch

from engine.quant.int_weight import IntWeight

BLOCK = 32
NATIVE = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # type name -> bytes per block


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: the low nibbles, then the high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def to_int_weight(data: np.ndarray, type_name: str, n: int, k: int) -> IntWeight:
    """`data`: the tensor's raw blocks (uint8, n rows of k / 32 blocks) as GGUFReader gives them."""
    if type_name not in NATIVE or k % BLOCK:
        raise ValueError(f"GGUF {type_name} [{n}, {k}] has no native mapping")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // BLOCK, NATIVE[type_name])
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])  # [n, G]
    if type_name == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return IntWeight(8, q, d, None, "none", BLOCK)
    if type_name == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        q = torch.from_numpy(_nibbles(blocks[..., 4:]).reshape(n, k).copy())
        return IntWeight(4, q, d, m, "min", BLOCK)
    q = torch.from_numpy(_nibbles(blocks[..., 2:]).reshape(n, k).copy())
    return IntWeight(4, q, d, torch.full_like(d, 8), "zero", BLOCK)


def permute_rows(w: IntWeight, order: np.ndarray) -> IntWeight:
    """Reorder outputs (undo llama.cpp's rotary row order): codes, scales and offsets move together."""
    idx = torch.from_numpy(np.ascontiguousarray(order))
    return IntWeight(
        w.bits, w.codes[idx], w.scales[idx], None if w.offsets is None else w.offsets[idx], w.offset_kind,
        w.group_size, w.perm,
    )  # fmt: skip
