"""GPU quantization benchmark (`python -m engine.benchmark --device cuda --quantize`): a random-weight Llama-shaped
model (engine/gpu_benchmark.py) served by our engine in bf16 (the peer, same run) and as GPTQ and AWQ int4
checkpoints written from the same weights (engine/quant/export.py, round-to-nearest codes) on the Triton kernel:
the batch-1 decode step and throughput at batch 64. `python -m engine.quant_gpu_benchmark --device cpu --shape tiny`
is a smoke test (the CPU kernel; tests/quant/test_triton_engine.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from pathlib import Path

import torch

from engine.gpu_benchmark import SHAPES, decode_step_s, ours, workload, write_model


def main(argv: list[str] | None = None) -> dict:
    from engine.quant.export import write_awq, write_gptq

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quantize", action="store_true", help="(selects this benchmark in engine.benchmark)")
    ap.add_argument("--shape", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--output", default="bench_results/quant_gpu_benchmark.json")
    args = ap.parse_args(argv)
    tiny = args.shape == "tiny"
    conc = min(args.concurrency, 4) if tiny else args.concurrency
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "shape": args.shape}
    report["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as folder:
        base = Path(write_model(args.shape, os.path.join(folder, "bf16"), torch.bfloat16, "cpu"))
        group = 64 if tiny else 128
        paths = {"bf16": base, "gptq": write_gptq(base, Path(folder) / "gptq", group=group),
                 "awq": write_awq(base, Path(folder) / "awq", group=group)}  # fmt: skip
        prompts, outputs = workload(2 * conc, SHAPES[args.shape]["vocab_size"], (4, 40) if tiny else (100, 1024),
                                    (4, 12) if tiny else (128, 512))  # fmt: skip
        for name, path in paths.items():
            step_s, _ = decode_step_s(str(path), args.device, 64, max_batch_total_tokens=8192)
            wall, tokens = ours(str(path), args.device, prompts, outputs, max_num_seqs=conc,
                                max_batch_total_tokens=conc * 2048)  # fmt: skip
            rows.append({"method": name, "batch1_step_ms": step_s * 1e3, f"batch{conc}_tokens_per_s": tokens / wall})
    peer = rows[0]
    print(f"# {args.shape} on {report['gpu']}: int4 (groups of {group}, Triton) against bf16, same run")
    print(f"| method | batch-1 step ms | x bf16 speed | batch-{conc} tok/s | x bf16 |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        t = r[f"batch{conc}_tokens_per_s"]
        print(f"| {r['method']} | {r['batch1_step_ms']:.3f} | {peer['batch1_step_ms'] / r['batch1_step_ms']:.2f}x | "
              f"{t:.1f} | {t / peer[f'batch{conc}_tokens_per_s']:.2f}x |")  # fmt: skip
    report["results"] = rows
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
