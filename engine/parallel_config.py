"""The tensor-parallel plan, resolved once at start-up: how many ranks, which backend (NCCL on CUDA, gloo on
CPU: one code path, one switch), where they meet. Checks that the model divides across the ranks and
that enough GPUs are visible, with one-line errors naming the numbers and the degrees that would work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.device import resolve_device
from engine.models import model_implementation, tp_shape
from engine.models.transformers_tp import tp_plan_problem


class ParallelConfigError(ValueError):
    """The requested tensor-parallel degree cannot work for this model or machine."""


@dataclass(frozen=True)
class ParallelConfig:
    world_size: int = 1
    backend: str = "gloo"  # "nccl" when the ranks run on GPUs
    port_range: tuple[int, int] | None = None  # where rank 0's rendezvous store may listen
    timeout_s: float = 600.0  # collectives (and the rendezvous) fail after waiting this long on a rank


def model_shape(hf_config) -> tuple[int, int, int]:
    """(attention heads, key/value heads, intermediate size): what a tensor-parallel degree must divide."""
    return tp_shape(hf_config)


def divides(degree: int, heads: int, kv_heads: int, intermediate: int) -> bool:
    """Heads and the MLP split evenly; key/value heads either split evenly or, fewer than the ranks, are
    replicated (then the degree must be a multiple of them). The vocabulary is padded, so it never blocks."""
    kv_ok = kv_heads % degree == 0 if kv_heads >= degree else degree % kv_heads == 0
    return heads % degree == 0 and intermediate % degree == 0 and kv_ok


def valid_degrees(heads: int, kv_heads: int, intermediate: int) -> list[int]:
    return [d for d in range(1, heads + 1) if divides(d, heads, kv_heads, intermediate)]


def check_model_divides(hf_config, degree: int) -> None:
    heads, kv_heads, intermediate = model_shape(hf_config)
    if divides(degree, heads, kv_heads, intermediate):
        return
    works = ", ".join(map(str, valid_degrees(heads, kv_heads, intermediate)))
    raise ParallelConfigError(
        f"tensor-parallel degree {degree} does not divide the model ({heads} attention heads, {kv_heads} key/value "
        f"heads, intermediate size {intermediate}); degrees that work: {works}"
    )


def check_gpu_count(degree: int, visible: int) -> None:
    if degree > visible:
        raise ParallelConfigError(
            f"tensor-parallel degree {degree} needs {degree} GPUs, but {visible} "
            f"{'is' if visible == 1 else 'are'} visible (check the instance type and CUDA_VISIBLE_DEVICES)"
        )


def resolve_parallel_config(
    config: EngineConfig, hf_config, device: torch.device | None = None, gpu_count: int | None = None
) -> ParallelConfig:
    """Validate the requested degree against the model and the machine (`device`, `gpu_count`: injectable)."""
    device = device or resolve_device(config.device)
    on_gpu = device.type == "cuda"
    if gpu_count is None:
        gpu_count = torch.cuda.device_count() if on_gpu else 0
    # the transformers fallback shards by the model's declared plan (base_model_tp_plan); without a plan it runs on
    # one rank: one GPU by default, an error when more are asked for
    fallback = model_implementation(hf_config, config.model_implementation) == "transformers"
    why = tp_plan_problem(hf_config) if fallback else None
    degree = config.tensor_parallel_size or (max(1, gpu_count) if on_gpu and why is None else 1)
    if why is not None and degree > 1:
        raise ParallelConfigError(
            f"tensor-parallel degree {degree}: this model is served through the transformers fallback, which cannot "
            f"shard it: {why} (set SM_NUM_GPUS / tensor_parallel_size to 1)"
        )
    if on_gpu:
        check_gpu_count(degree, gpu_count)
        if degree > 1 and device.index is not None:
            raise ParallelConfigError(
                f"device {config.device!r} names one GPU, but tensor-parallel degree {degree} uses cuda:0..{degree - 1}"
                "; use device 'cuda' or 'auto' (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
    if degree > 1 or not fallback:
        check_model_divides(hf_config, degree)
    return ParallelConfig(
        world_size=degree,
        backend="nccl" if on_gpu else "gloo",
        port_range=config.port_range,
        timeout_s=float(config.collective_timeout_s),
    )
