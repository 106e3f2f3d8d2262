"""Attention backends behind one seam (base.AttentionBackend): the torch twin, the compiled CPU kernels (plain and
paired layouts), Triton's paged kernels and flash-attn. `create_backend` builds the one the execution plan chose.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.attention.base import AttentionBackend

if TYPE_CHECKING:
    from engine.plan import ExecutionPlan


def create_backend(plan: ExecutionPlan, block_size: int) -> AttentionBackend:
    name, device, dtype = plan.attention, plan.device, plan.dtype
    if name == "torch":
        from engine.attention.torch_twin import TorchBackend

        return TorchBackend(device, dtype, block_size)
    if name in ("cpu", "cpu_paired"):
        from engine.attention.cpu import CpuBackend, CpuPairedBackend

        cls = CpuPairedBackend if name == "cpu_paired" else CpuBackend
        return cls(device, dtype, block_size, fused_write=plan.fused_ops)
    if name == "triton":
        from engine.attention.triton import TritonBackend

        return TritonBackend(device, dtype, block_size)
    if name == "flash_attn":
        from engine.attention.flash import FlashAttnBackend

        return FlashAttnBackend(device, dtype, block_size)
    raise ValueError(f"unknown attention backend {name!r}")


__all__ = ["AttentionBackend", "create_backend"]
