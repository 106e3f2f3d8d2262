"""What the benchmarks measure of the host besides the engines: CPU taken by other processes, memory bandwidth, the
bytes of weights a decode step reads, and the CPU's name (engine/benchmark.py; the results JSON records them).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch

from engine.layers.cpu_gemm import PackedWeight


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, CPU seconds this process used), from /proc/stat and os.times."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def wait_for_quiet(timeout: float, threshold: float = 0.1) -> float:
    """Wait (up to `timeout` s) until other processes use under `threshold` of the CPU over 0.5 s; returns it."""
    deadline, share = time.monotonic() + timeout, 1.0
    while time.monotonic() < deadline:
        busy0, own0 = cpu_snapshot()
        time.sleep(0.5)
        busy1, own1 = cpu_snapshot()
        share = max(0.0, (busy1 - busy0) - (own1 - own0)) / (0.5 * (os.cpu_count() or 1))
        if share < threshold:
            break
    return share


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes read per decode step, bytes resident) of the weights: parameters plus tensors a module keeps as
    plain attributes (packed copies for oneDNN or the GEMM kernel; KV caches excluded), tied weights counted
    once. A plain weight that also has a packed or quantized copy (a tied embedding kept for lookups) is resident
    but not read whole per step."""
    tensors: dict[int, tuple[torch.Tensor, bool]] = {}
    for mod in model.modules():
        packed = isinstance(getattr(mod, "packed", None), (torch.Tensor, PackedWeight))
        packed = packed or getattr(mod, "qmatmul", None) is not None  # its matmul reads the quantized copy
        own = [(n, t, not (packed and n == "weight")) for n, t in mod.named_parameters(recurse=False)]
        attrs = {n: t.data if isinstance(t, PackedWeight) else t for n, t in vars(mod).items()}
        own += [(n, t, True) for n, t in attrs.items() if isinstance(t, torch.Tensor) and "cache" not in n]
        for _, t, read in own:
            if t.numel():
                key = id(t) if t.is_mkldnn else t.untyped_storage().data_ptr()
                tensors[key] = (t, read and tensors.get(key, (t, True))[1])
    sizes = [(t.numel() * t.element_size(), read) for t, read in tensors.values()]
    return sum(n for n, read in sizes if read), sum(n for n, _ in sizes)


def memory_bandwidth(gib: float, repeats: int = 5) -> tuple[float, float]:
    """Best-of-N GB/s (read: sum of a big tensor; copy: copy_ into a preallocated one, read + write bytes)."""
    src = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    dst = torch.zeros_like(src)  # preallocated and touched: a fresh clone() would time page faults

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    return src.nbytes / best(src.sum) / 1e9, 2 * src.nbytes / best(lambda: dst.copy_(src)) / 1e9


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()
