"""Quantization benchmark on CPU (`python -m engine.benchmark --quantize`): the default model's workload (the engine
benchmark's chat prompts, greedy, exactly --max-new-tokens per request) served by our engine in bf16 (the peer,
measured in the same run), int8 and int4 made at load, and the GGUF file's own Q4_1 kept native; per method the
weight bytes and output tokens/s at batch 1 and 32, engines interleaved level by level. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from dataclasses import asdict
from functools import partial

import torch

from engine.bench_host import cpu_model
from engine.benchmark import RunResult, bench, build_prompts, run_ours

METHODS = {"bf16": "none", "int8": "int8", "int4": "int4", "gguf-q4_1": "gguf"}
TARGETS = {("int4", 1): 1.8, ("int4", 32): 0.8, ("int8", 1): 1.4}  # tok/s over bf16's, the issue's CPU targets


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quantize", action="store_true", help="(selects this benchmark in engine.benchmark)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="tokens per request (default 128; quick 16)")
    ap.add_argument("--concurrency", default="1,32", help="comma list of batch sizes")
    ap.add_argument("--single-requests", type=int, default=None, help="sequential requests at level 1 (default 4)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    ap.add_argument("--retries", type=int, default=2, help="repeats of a wave disturbed by other processes")
    ap.add_argument("--budget", type=float, default=240, help="seconds in all for quiet waits and repeats")
    ap.add_argument("--output", default="bench_results/quant_benchmark.json", help="JSON report path")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    args = ap.parse_args(argv)
    max_new = args.max_new_tokens or (16 if args.quick else 128)
    levels = [int(c) for c in args.concurrency.split(",")]
    single = args.single_requests or (1 if args.quick else 4)
    methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    started = time.monotonic()

    from engine import LLM
    from engine.default_model import default_model_path
    from engine.quant.report import weight_bytes

    engines, memory = {}, {}
    for name in methods:
        llm = LLM(None, dtype="bfloat16", quantize=METHODS[name], num_threads=args.threads,
                  max_batch_total_tokens=(max(levels) + 1) * (max_new + 400))  # fmt: skip
        engines[name] = llm
        dense, held = weight_bytes(llm.engine.runner.model, torch.bfloat16)
        memory[name] = {"weight_bytes": held, "bf16_weight_bytes": dense, "plan": llm.engine.runner.plan.describe()}
    prompts = build_prompts(next(iter(engines.values())).tokenizer, max(max(levels), single))
    share = args.budget / (len(levels) * len(methods))
    results: dict[str, list[RunResult]] = {name: [] for name in methods}
    tokens: dict[str, dict[int, list[list[int]]]] = {name: {} for name in methods}
    for conc in levels:
        for name, llm in engines.items():  # interleaved: every method measured under the same neighbours
            result, out = bench(name, partial(run_ours, llm), prompts, conc, max_new, single, args.retries, share)
            results[name].append(result)
            tokens[name][conc] = out
            print(f"  {name} batch {conc}: {result.tokens_per_s:.1f} tok/s ({time.monotonic() - started:.0f}s)",
                  flush=True)  # fmt: skip

    base = "bf16" if "bf16" in methods else methods[0]
    peer = {r.concurrency: r.tokens_per_s for r in results[base]}
    print(f"\nmax_new_tokens={max_new}, {args.threads} threads, {cpu_model()}, torch {torch.__version__}")
    header = f"{'method':<11}{'weights MiB':>12}{'vs bf16':>9}" + "".join(
        f"{f'b{c} tok/s':>12}{f'b{c} x bf16':>11}" for c in levels
    )
    print(header + "\n" + "-" * len(header))
    ratios: dict[str, dict[str, float]] = {}
    for name in methods:
        m = memory[name]
        row = f"{name:<11}{m['weight_bytes'] / 2**20:>12.1f}{m['weight_bytes'] / memory[base]['weight_bytes']:>8.2f}x"
        ratios[name] = {}
        for r in results[name]:
            ratio = r.tokens_per_s / peer[r.concurrency]
            ratios[name][str(r.concurrency)] = ratio
            row += f"{r.tokens_per_s:>12.1f}{ratio:>10.2f}x"
        print(row)
    verdicts = {}
    for (name, conc), target in TARGETS.items():
        if name in ratios and str(conc) in ratios[name]:
            got = ratios[name][str(conc)]
            verdicts[f"{name}@{conc}"] = {"target": target, "measured": got, "met": got >= target}
            print(f"target {name} at batch {conc} >= {target}x bf16: {got:.2f}x {'met' if got >= target else 'MISSED'}")
    agreement = {}
    for name in methods:  # greedy tokens against bf16's at batch 1, up to the first difference
        pairs = zip(tokens[name][levels[0]], tokens[base][levels[0]])
        agreement[name] = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in pairs]
    print(f"greedy tokens equal to bf16's before the first difference (batch {levels[0]}): {agreement}")
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "threads": args.threads,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "model": default_model_path(),
        "max_new_tokens": max_new,
        "concurrency": levels,
        "single_requests": single,
        "memory": memory,
        "results": {name: [asdict(r) for r in rs] for name, rs in results.items()},
        "ratios_over_bf16": ratios,
        "targets": verdicts,
        "greedy_prefix_equal_to_bf16": agreement,
        "total_seconds": time.monotonic() - started,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
