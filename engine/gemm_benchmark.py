"""bf16 matmuls of SmolLM2-135M's shapes with cold weights: oneDNN's packed matmul vs csrc/gemm_bf16.c (and any
other builds of it named on the command line), interleaved, best of N. A "step" is 30 distinct layers x (qkv, o,
gate_up, down) = 212 MB of weights, then the LM head [49152 x 576] after a 64 MB cache flush.

    python -m engine.gemm_benchmark 1,8,32,64 [reps] [other_build.so ...]

Prints a table per M (ms, and oneDNN / kernel ratios) and writes bench_results/gemm_benchmark.json.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

import torch

from engine.layers import cpu_gemm
from engine.layers.cpu_packing import packed_linear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}


def onednn_pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, None)


def main() -> None:
    torch.manual_seed(0)
    ms = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1, 8, 32, 64]
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    variants = [("onednn", None), ("kernel", cpu_gemm._lib())]
    variants += [(p.split("/")[-1], cpu_gemm.bind_gemm(ctypes.CDLL(p))) for p in sys.argv[3:]]
    layers = []
    for _ in range(30):
        ws = {name: (torch.randn(n, k) * 0.05).bfloat16() for name, (n, k) in SHAPES.items()}
        layers.append({name: (onednn_pack(w), cpu_gemm.pack(w)) for name, w in ws.items()})
    w = (torch.randn(49152, 576) * 0.05).bfloat16()
    head = (onednn_pack(w), cpu_gemm.pack(w))
    flush = torch.empty(64 << 20, dtype=torch.uint8)

    def matmul(lib, x, pair):
        return packed_linear(x, pair[0], None) if lib is None else cpu_gemm.linear(x, pair[1], lib=lib)

    def step(lib, xs) -> dict[str, float]:
        t = dict.fromkeys([*SHAPES, "head"], 0.0)
        for layer in layers:
            for name in SHAPES:
                t0 = time.perf_counter()
                matmul(lib, xs[name], layer[name])
                t[name] += time.perf_counter() - t0
        flush.add_(1)
        t0 = time.perf_counter()
        matmul(lib, xs["o"], head)
        t["head"] = time.perf_counter() - t0
        t["layers"] = sum(t[name] for name in SHAPES)
        return t

    report: dict[str, dict[str, dict[str, float]]] = {}
    for m in ms:
        xs = {name: torch.randn(m, k).bfloat16() for name, (n, k) in SHAPES.items()}
        best: dict[str, dict[str, float]] = {}
        for _ in range(reps):
            for label, lib in variants:
                t = step(lib, xs)
                best[label] = {k: min(best[label][k], v) for k, v in t.items()} if label in best else t
        print(f"M={m}, best of {reps} (ms)  " + "".join(f"{k:>9}" for k in best["onednn"]))
        for label, t in best.items():
            print(f"  {label:>20} " + "".join(f"{v * 1e3:9.2f}" for v in t.values()))
        ratios = {k: best["onednn"][k] / v for k, v in best["kernel"].items()}
        print(f"  {'onednn / kernel':>20} " + "".join(f"{r:8.2f}x" for r in ratios.values()))
        report[str(m)] = {**{label: {k: v * 1e3 for k, v in t.items()} for label, t in best.items()}, "ratio": ratios}
    os.makedirs("bench_results", exist_ok=True)
    with open("bench_results/gemm_benchmark.json", "w") as f:
        json.dump({"reps": reps, "ms": report, "threads": torch.get_num_threads()}, f, indent=2)
    print("wrote bench_results/gemm_benchmark.json")


if __name__ == "__main__":
    main()
