"""Decode-step time with bf16 matmuls on the compiled kernel (cpu_gemm=True) vs oneDNN's packed matmul
(cpu_gemm=False): SmolLM2-135M in bfloat16, 32 and 1 requests; the two engines alternate step by step.

    PYTHONPATH=$PWD python benchmarks/bench_gemm_step.py [num_requests ...]
"""

from __future__ import annotations

import statistics
import sys
import time

from engine import LLM, SamplingParams
from engine.benchmark import build_prompts


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or [32, 1]
    order = (True, False) if "--kernel-first" in sys.argv else (False, True)
    llms = {flag: LLM(None, dtype="bfloat16", cpu_gemm=flag) for flag in order}
    for n in sizes:
        prompts = build_prompts(llms[True].tokenizer, n)
        times: dict[bool, list[float]] = {False: [], True: []}
        prefill: dict[bool, float] = {}
        for flag, llm in llms.items():  # prefill, one engine after the other
            for p in prompts:
                llm.engine.add_request(p, SamplingParams(max_new_tokens=128, ignore_eos=True))
            t0 = time.perf_counter()
            llm.engine.step()
            prefill[flag] = time.perf_counter() - t0
        for _ in range(100):  # decode steps, alternating engines
            for flag, llm in llms.items():
                t0 = time.perf_counter()
                llm.engine.step()
                times[flag].append(time.perf_counter() - t0)
        for llm in llms.values():
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        old, new = statistics.median(times[False]), statistics.median(times[True])
        print(
            f"{n} requests: decode step median oneDNN {old * 1e3:.2f} ms, kernel {new * 1e3:.2f} ms "
            f"({old / new:.2f}x); "
            f"min {min(times[False]) * 1e3:.2f} / {min(times[True]) * 1e3:.2f} ms; "
            f"prefill step {prefill[False] * 1e3:.1f} / {prefill[True] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()
