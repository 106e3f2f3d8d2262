"""ctypes wrappers of csrc/fused_ops.c: the decoder layer's element-wise chains (residual add + RMSNorm,
SiLU * up, rotary in place) and the greedy pick, one compiled pass each on CPU. The torch code in norm.py,
activation.py, rotary.py and sampler.py is their twin (GPU, no compiler, `EngineConfig(cpu_fused_ops=False)`),
and tests/unit/test_fused_ops.py holds each op to it.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from engine.layers.cpu_build import bind, load_library

_P, _I64, _F, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}
_ARGTYPES = {
    "add_rms_norm": [_P, _I64, _P, _P, _P, _I64, _I64, _F, _INT, _INT],
    "silu_and_mul": [_P, _P, _I64, _I64, _INT],
    "rotary": [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _INT],
    "cache_kv": [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT],
}


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library("fused_ops")
    return None if lib is None else bind_ops(lib)


def bind_ops(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the argument types of a build of csrc/fused_ops.c (tests: the portable build)."""
    for op, argtypes in _ARGTYPES.items():
        bind(lib, [f"{op}_{s}" for s in _SUFFIX.values()], argtypes)
    bind(lib, ["greedy_f32", "greedy_bf16"], [_P, _I64, _I64, _I64, _P, _P, _I64, _P, _P, _INT])
    return lib


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tensors of `dtype` on `device` can run the fused ops here."""
    return device.type == "cpu" and dtype in _SUFFIX and _lib() is not None


def _fn(op: str, dtype: torch.dtype):
    lib = _lib()
    if lib is None:
        raise RuntimeError("the fused CPU ops are not available; check supports() first")
    return getattr(lib, f"{op}_{_SUFFIX[dtype]}")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, n] with unit stride along n (rows may be strided)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def add_rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, n] -> (norm(x + residual) * weight, x + residual); `residual` (contiguous) is updated in place.
    Without a residual: (norm(x) * weight, x)."""
    x = _rows(x)
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=x.dtype)
    has_residual = residual is not None
    res = residual if residual is not None else x
    if has_residual and not res.is_contiguous():
        raise ValueError("the residual must be contiguous")
    _fn("add_rms_norm", x.dtype)(
        x.data_ptr(), x.stride(0), res.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, n, eps,
        int(has_residual), torch.get_num_threads(),
    )  # fmt: skip
    return out, res


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[T, 2 * I] (contiguous) -> silu(x[:, :I]) * x[:, I:] as [T, I]."""
    x = x.contiguous()
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((rows, n), dtype=x.dtype)
    _fn("silu_and_mul", x.dtype)(x.data_ptr(), out.data_ptr(), rows, n, torch.get_num_threads())
    return out


def rotary_(
    x: torch.Tensor, heads: int, head_dim: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """Rotate the first `heads` heads of each row of x [T, >= heads * head_dim] in place (rows may be strided)
    by the float32 tables cos / sin [max_position, head_dim] (sin's first half negated, see rotary.py) at int64
    `positions` [T]."""
    if x.stride(-1) != 1 or head_dim % 2:
        raise ValueError("rotary_ needs unit-stride rows and an even head_dim")
    pos = positions.to(torch.int64).contiguous()  # the kernel reads int64 (Triton's step inputs are int32)
    _fn("rotary", x.dtype)(
        x.data_ptr(), x.stride(0), pos.data_ptr(), cos.data_ptr(), sin.data_ptr(), x.shape[0], heads, head_dim,
        torch.get_num_threads(),
    )  # fmt: skip


def cache_kv_(
    k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, paired: bool
) -> None:
    """Write k/v [T, Hkv, hd] (rows may be strided, heads contiguous) at int64 flat `slots` [T] (block * bs +
    offset) into the plain or paired caches (layouts in attention.py)."""
    t, hkv, hd = k.shape
    if k.stride(2) != 1 or k.stride(1) != hd or v.stride(2) != 1 or v.stride(1) != hd:
        raise ValueError("cache_kv_ needs contiguous heads within each row")
    bs = k_cache.shape[3]  # tokens are dim 3 of K in both layouts
    _fn("cache_kv", k.dtype)(
        k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), slots.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), t, hkv, hd, bs, int(paired), torch.get_num_threads(),
    )  # fmt: skip


def greedy(
    logits: torch.Tensor, masks: torch.Tensor | None = None, mask_rows: list[int] | None = None
) -> tuple[list[int], list[float]]:
    """float32 or bfloat16 logits [N, V] -> (first argmax of each row, its log-softmax, computed in float32).
    Grammar rows: `masks` [G, W] int32 token bitmasks (engine/grammar/bitmask.py's layout) and `mask_rows` [N], the
    mask of each row (-1: none); such a row picks its best allowed id, as argmax after apply_token_mask does, and
    keeps the model's log-softmax of it."""
    lib = _lib()
    if lib is None:
        raise RuntimeError("the fused CPU ops are not available; check supports() first")
    logits = _rows(logits)
    rows, n = logits.shape
    ids = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    masks_ptr, rows_ptr, words = None, None, 0
    if masks is not None:
        if mask_rows is None or len(mask_rows) != rows or masks.dtype != torch.int32 or masks.dim() != 2:
            raise ValueError("masks must be [G, W] int32 with one mask_rows entry per row of logits")
        masks = masks.contiguous()
        which = torch.tensor(mask_rows, dtype=torch.int64)
        if bool((which >= masks.shape[0]).any()):
            raise ValueError("mask_rows points past the masks")
        masks_ptr, rows_ptr, words = masks.data_ptr(), which.data_ptr(), masks.shape[1]
    getattr(lib, f"greedy_{_SUFFIX[logits.dtype]}")(
        logits.data_ptr(), logits.stride(0), rows, n, masks_ptr, rows_ptr, words, ids.data_ptr(), logprobs.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    return ids.tolist(), logprobs.tolist()
