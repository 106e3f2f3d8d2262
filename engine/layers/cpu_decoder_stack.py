"""ctypes wrapper of csrc/decoder_stack.c: every decoder layer of a step in one compiled call (bf16 CPU with the GEMM
kernel, the fused ops and the paired cache). It calls the very kernels the per-module path calls, in the same order,
so its output is bit-identical to that path (tests/engine/test_decoder_stack.py); it only drops ~300 Python calls
and tensor allocations per step. Weight and cache pointers are taken once: `build` runs after the caches are bound.
"""

from __future__ import annotations

import ctypes
import functools
from typing import TYPE_CHECKING

import torch

from engine.layers import cpu_attention_kernels, cpu_fused_ops, cpu_gemm
from engine.layers.cpu_build import bind, load_library
from engine.layers.cpu_gemm import PackedWeight
from engine.quant import cpu_kernel

if TYPE_CHECKING:
    from engine.attention.cpu import PairedMetadata

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Kernels(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("gemm", "norm", "silu", "rotary", "cache", "attn")]


class _Layer(ctypes.Structure):
    _fields_ = [
        (name, _P) for name in ("ln1", "ln2", "w_qkv", "b_qkv", "w_o", "b_o", "w_gu", "b_gu", "w_down", "b_down")
    ] + [("kc", _P), ("vc", _P)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("hidden", "heads", "kv_heads", "head_dim", "inter", "block_size")] + [
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        ("T", _I64), ("positions", _P), ("cos", _P), ("sin", _P), ("slots", _P), ("tables", _P),
        ("max_blocks", _I64), ("group_starts", _P), ("group_tables", _P), ("num_groups", _I64), ("row_ctx", _P),
    ]  # fmt: skip


@functools.cache
def _lib() -> ctypes.CDLL | None:
    lib = load_library("decoder_stack")
    if lib is not None:
        bind(lib, ["decoder_stack"], [_P, _P, _I64, _P, _P] + [_P] * 9 + [ctypes.c_int])
    return lib


def _addr(fn) -> int:
    return ctypes.cast(fn, _P).value


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _on_kernel(lin, quantized: bool) -> bool:
    """The layer's matmul is what the stack calls: every one on the bf16 GEMM kernel, or every one on the int kernel
    (engine/quant: weight-only int4 / int8, no act-order gather)."""
    if not quantized:
        return lin.qmatmul is None and isinstance(lin.packed, PackedWeight)
    q = lin.qmatmul
    return q is not None and getattr(q, "kernel", None) in cpu_kernel.KERNELS and q.packed.perm is None


class DecoderStack:
    """The compiled twin of LlamaModel's layer loop and final norm for one model (see `build`)."""

    def __init__(self, model) -> None:  # model: engine.models.llama.LlamaModel
        fused, paired = cpu_fused_ops._lib(), cpu_attention_kernels.load_paired_kernel()
        first = model.layers[0]
        quantized = first.mlp.down_proj.qmatmul is not None  # every matmul on the int kernel (see build)
        gemm = cpu_kernel._lib().gemm_q_desc if quantized else cpu_gemm._lib().gemm_bf16
        self._kernels = _Kernels(
            _addr(gemm), _addr(fused.add_rms_norm_bf16), _addr(fused.silu_and_mul_bf16),
            _addr(fused.rotary_bf16), _addr(fused.cache_kv_bf16), _addr(paired.paired_attention_bf16),
        )  # fmt: skip
        attn = first.self_attn
        self._descs: list[cpu_kernel.QDesc] = []  # quantized weights' descriptors, kept alive with the stack

        def weight(lin) -> int:
            if lin.qmatmul is None:
                return _ptr(lin.packed.data)
            self._descs.append(lin.qmatmul.packed.desc())
            return ctypes.addressof(self._descs[-1])

        down = first.mlp.down_proj
        self.hidden = first.input_layernorm.weight.shape[0]
        self.inter = down.qmatmul.k if quantized else down.packed.k
        self.q_size, self.kv_size = attn.q_size, attn.kv_size
        self._shape = _Shape(
            self.hidden, attn.num_heads, attn.num_kv_heads, attn.head_dim, self.inter, attn.attn.k_cache.shape[3],
            first.input_layernorm.eps, attn.attn.scale,
        )  # fmt: skip
        self._layers = (_Layer * len(model.layers))()
        for entry, layer in zip(self._layers, model.layers):
            a, m = layer.self_attn, layer.mlp
            entry.ln1, entry.ln2 = _ptr(layer.input_layernorm.weight), _ptr(layer.post_attention_layernorm.weight)
            entry.w_qkv, entry.b_qkv = weight(a.qkv_proj), _ptr(a.qkv_proj.bias)
            entry.w_o, entry.b_o = weight(a.o_proj), _ptr(a.o_proj.bias)
            entry.w_gu, entry.b_gu = weight(m.gate_up_proj), _ptr(m.gate_up_proj.bias)
            entry.w_down, entry.b_down = weight(m.down_proj), _ptr(m.down_proj.bias)
            entry.kc, entry.vc = _ptr(a.attn.k_cache), _ptr(a.attn.v_cache)
        self._final_norm = model.norm.weight
        self._cos, self._sin = model.rotary.cos, model.rotary.sin_signed
        self._model = model  # keeps every pointed-to tensor alive

    @staticmethod
    def build(model) -> DecoderStack | None:
        """The stack for `model` (LlamaModel), or None where it cannot run: no compiler, not bf16, tensor parallel,
        matmuls not all on the bf16 GEMM kernel nor all on the int kernel, the fused ops off, or a plain-layout
        cache."""
        if _lib() is None or cpu_fused_ops._lib() is None or cpu_attention_kernels.load_paired_kernel() is None:
            return None
        if not model.rotary.fused or model.rotary.cos.dtype != torch.float32:
            return None
        norms = [model.norm]
        norms += [n for layer in model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        if any(not n.fused or n.weight.dtype != torch.bfloat16 or n.eps != model.norm.eps for n in norms):
            return None
        quantized = model.layers[0].mlp.down_proj.qmatmul is not None
        for layer in model.layers:
            a, m = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
            if any(lin.tp_size != 1 or not _on_kernel(lin, quantized) for lin in linears):
                return None
            if any(lin.bias is not None and lin.bias.dtype != torch.bfloat16 for lin in linears):
                return None
            paired = getattr(a.attn.backend, "paired", False) and a.attn.backend.compiled_write
            if not (paired and not a.attn.has_options and m.act.fused and a.attn.k_cache.is_contiguous()):
                return None
        return DecoderStack(model)

    @staticmethod
    def runs(meta: object) -> bool:
        """Whether this step's metadata is the compiled path's (paired kernel rows, flat slots)."""
        return getattr(meta, "kernel_rows", None) is not None and getattr(meta, "fused_slots", None) is not None

    def __call__(self, x: torch.Tensor, positions: torch.Tensor, meta: PairedMetadata) -> torch.Tensor:
        """x [T, hidden] bf16 embeddings (used as the residual stream) -> the final norm's output [T, hidden]."""
        rows = meta.kernel_rows
        t = x.shape[0]
        if x.dtype != torch.bfloat16 or positions.dtype != torch.int64 or meta.fused_slots.dtype != torch.int64:
            raise ValueError("the decoder stack takes bf16 embeddings and int64 positions and slots")
        x = x.contiguous()
        positions = positions.contiguous()
        step = _Step(
            t, positions.data_ptr(), self._cos.data_ptr(), self._sin.data_ptr(), meta.fused_slots.data_ptr(),
            rows.tables.data_ptr(), rows.tables.shape[1], rows.group_starts.data_ptr(), rows.group_tables.data_ptr(),
            rows.group_tables.shape[0], rows.row_ctx.data_ptr(),
        )  # fmt: skip
        empty = functools.partial(torch.empty, dtype=torch.bfloat16)
        out, h, y = empty((t, self.hidden)), empty((t, self.hidden)), empty((t, self.hidden))
        qkv, attn = empty((t, self.q_size + 2 * self.kv_size)), empty((t, self.q_size))
        gu, act = empty((t, 2 * self.inter)), empty((t, self.inter))
        _lib().decoder_stack(
            ctypes.byref(self._kernels), self._layers, len(self._layers), ctypes.byref(self._shape),
            ctypes.byref(step), x.data_ptr(), self._final_norm.data_ptr(), out.data_ptr(), h.data_ptr(),
            qkv.data_ptr(), attn.data_ptr(), gu.data_ptr(), act.data_ptr(), y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out
