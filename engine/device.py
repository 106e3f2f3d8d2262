"""Where and in what precision a rank runs: the device from the config (`cuda:<rank>` when sharded over
GPUs), the dtype `auto` resolves to, and the CPU threads each of N ranks gets.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def rank_device(name: str, rank: int, world_size: int) -> torch.device:
    """Rank r of a sharded engine runs on cuda:r (or the CPU); a single rank on the configured device."""
    device = resolve_device(name)
    if world_size > 1 and device.type == "cuda":
        return torch.device("cuda", rank)
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_threads(configured: int | None, world_size: int, cores: int | None = None) -> int | None:
    """Torch threads for one rank: the configured number, else an equal share of the cores when sharded
    (N ranks on one CPU must not oversubscribe it), else None (torch's default)."""
    if configured is not None:
        return configured
    if world_size == 1:
        return None
    return max(1, (cores or usable_cores()) // world_size)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside make their parameters in `dtype` (torch's default dtype, restored on the way out)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
