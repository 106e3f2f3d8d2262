"""GPU benchmark: our engine against transformers `generate` on the same GPU in the same run, on a random-weight
Llama-shaped model written offline (no hub). Reports batch-1 decode against the HBM roofline (weight bytes /
bandwidth), CUDA graphs against eager at batch 1, and throughput at each concurrency over random 100-1,024 token
prompts and outputs. `python -m engine.benchmark --device cuda` runs it; `--device cpu --shape tiny` is a smoke test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, head_dim=64, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
NOMINAL_TBPS = {"H100": 3.35, "H200": 4.8, "A100": 2.0, "L40S": 0.864, "L4": 0.3, "A10G": 0.6}


@dataclass
class Result:
    engine: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    tokens_per_s: float


def write_model(shape: str, folder: str, dtype: torch.dtype, device: str) -> str:
    """A random Llama of `shape` with a word-level tokenizer over its whole vocabulary, saved as safetensors."""
    from tokenizers import Tokenizer, models
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
    tok.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=None, pad_token_id=0).save_pretrained(folder)
    return folder


def workload(n: int, vocab: int, prompt_range: tuple[int, int], output_range: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(10, vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    return prompts, [rng.randint(*output_range) for _ in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ours(path: str, device: str, prompts, outputs, **config) -> tuple[float, int]:
    from engine import LLM, SamplingParams

    with LLM(path, device=device, dtype=config.pop("dtype", "bfloat16"), **config) as llm:
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in outputs]
        llm.generate(prompts[:2], params[:2])  # warm-up
        llm.engine.block_manager.reset_prefix_cache()
        _sync(device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        _sync(device)
        wall = time.perf_counter() - t0
    return wall, sum(len(o.token_ids) for o in outs)


def decode_step_s(path: str, device: str, new_tokens: int, **config) -> tuple[float, int]:
    """Seconds per decode step of one request (128-token prompt), and the engine's weight bytes."""
    from engine import LLM, SamplingParams

    with LLM(path, device=device, dtype="bfloat16", **config) as llm:
        weights = sum(p.numel() * p.element_size() for p in llm.engine.runner.model.parameters())
        prompt = list(range(10, 138))
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        llm.generate([prompt], SamplingParams(max_new_tokens=4, ignore_eos=True))
        engine = llm.engine
        engine.add_request(prompt, params)
        engine.step()  # prefill + first token
        _sync(device)
        t0 = time.perf_counter()
        steps = 0
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
        _sync(device)
    return (time.perf_counter() - t0) / max(1, steps), weights


def transformers_peer(path: str, device: str, prompts, outputs, conc: int) -> tuple[float, int]:
    """Static left-padded batches of `conc` through generate(); each batch runs to its longest output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    try:
        with torch.inference_mode():
            model.generate(torch.tensor([prompts[0][:16]], device=device), max_new_tokens=2, pad_token_id=0)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(0, len(prompts), conc):
                batch, outs = prompts[i : i + conc], outputs[i : i + conc]
                width = max(len(p) for p in batch)
                ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
                n = max(outs)
                model.generate(
                    ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
                )
            _sync(device)
            wall = time.perf_counter() - t0
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return wall, sum(outputs)


def bandwidth_tbps(device: str) -> float:
    """Measured read bandwidth: a reduction over a 2 GiB tensor (TB/s)."""
    if device != "cuda":
        return float("nan")
    x = torch.empty(2**29, dtype=torch.float32, device=device).fill_(1.0)
    size = x.numel() * x.element_size()
    x.sum()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        x.sum()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / 10
    del x
    torch.cuda.empty_cache()
    return size / seconds / 1e12


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--concurrency", default="64,256", help="comma list")
    ap.add_argument("--requests", type=int, default=0, help="per level (default: 2 x concurrency)")
    ap.add_argument("--quick", action="store_true", help="outputs of 64-256 tokens, concurrency 64 only")
    ap.add_argument("--output", default="bench_results/gpu_benchmark.json")
    args = ap.parse_args(argv)
    device = args.device
    levels = [64] if args.quick else [int(c) for c in args.concurrency.split(",")]
    output_range = (64, 256) if args.quick else (100, 1024)
    if args.shape == "tiny":
        levels, output_range = [min(c, 4) for c in levels], (4, 12)
    report: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "shape": args.shape}
    report["gpu"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as folder:
        path = write_model(args.shape, folder, torch.bfloat16, device)
        # one request: a few graph buckets are enough (each bucket is a capture at start-up)
        batch1 = dict(max_batch_total_tokens=8192, max_num_seqs=4)
        step_s, weights = decode_step_s(path, device, 64, **batch1)
        eager_s, _ = decode_step_s(path, device, 64, cuda_graphs=False, **batch1)
        measured = bandwidth_tbps(device)
        nominal = next((v for k, v in NOMINAL_TBPS.items() if k in report["gpu"]), float("nan"))
        roofline_s = weights / (nominal * 1e12)
        report["batch1"] = {
            "step_ms": step_s * 1e3, "eager_step_ms": eager_s * 1e3, "graph_speedup": eager_s / step_s,
            "weight_gb": weights / 1e9, "nominal_tbps": nominal, "measured_read_tbps": measured,
            "roofline_ms": roofline_s * 1e3, "roofline_share": roofline_s / step_s,
        }  # fmt: skip
        results: list[Result] = []
        for conc in levels:
            n = args.requests or 2 * conc
            vocab = SHAPES[args.shape]["vocab_size"]
            prompts, outputs = workload(n, vocab, (100, 1024) if args.shape != "tiny" else (4, 40), output_range)
            wall, tokens = ours(path, device, prompts, outputs, max_num_seqs=conc, max_batch_total_tokens=conc * 2048)
            results.append(Result("ours", conc, n, tokens, wall, tokens / wall))
            gc.collect()
            wall, tokens = transformers_peer(path, device, prompts, outputs, conc)
            results.append(Result("transformers", conc, n, tokens, wall, tokens / wall))
    report["throughput"] = [asdict(r) for r in results]
    print_report(report, results)
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report


def print_report(report: dict, results: list[Result]) -> None:
    b = report["batch1"]
    print(f"# {report['shape']} on {report['gpu']}, {report['date']}")
    print("| batch-1 decode | step ms | eager ms | graphs speedup | roofline ms | share of roofline |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| ours | {b['step_ms']:.3f} | {b['eager_step_ms']:.3f} | {b['graph_speedup']:.2f}x | "
        f"{b['roofline_ms']:.3f} ({b['weight_gb']:.2f} GB at {b['nominal_tbps']} TB/s) | {b['roofline_share']:.0%} |"
    )
    print("\n| concurrency | ours tok/s | transformers tok/s | ratio |")
    print("| --- | --- | --- | --- |")
    by = {(r.engine, r.concurrency): r for r in results}
    for conc in sorted({r.concurrency for r in results}):
        o, t = by[("ours", conc)], by[("transformers", conc)]
        print(f"| {conc} | {o.tokens_per_s:.1f} | {t.tokens_per_s:.1f} | {o.tokens_per_s / t.tokens_per_s:.2f}x |")


if __name__ == "__main__":
    main()
