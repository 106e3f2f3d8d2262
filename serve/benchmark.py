"""Serving benchmark (like `vllm bench serve`): our real `serve` against serve/baseline_server.py (transformers
`generate` per request) on the same model, over loopback, with streaming TGI /generate_stream requests at fixed
concurrency levels and Poisson request rates; reports TTFT, TPOT, ITL, E2E latency and output tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from container.ports import free_port
from container.variables import VARIABLES
from serve.bench_results import LevelResult, Sample, pct, plot, print_table, ratios, summarize

ROOT = Path(__file__).resolve().parent.parent
TOPICS = [
    "how photosynthesis works", "the causes of the industrial revolution", "how a compiler turns code into a program",
    "why the sky is blue", "how vaccines train the immune system", "the history of the printing press",
    "how to make a good cup of coffee at home", "the differences between renewable and fossil energy",
    "how a bicycle stays upright", "the water cycle", "how neural networks learn", "the life of a star",
    "how to plan a vegetable garden", "the rules of chess", "how the internet routes a message", "how bread rises",
]  # fmt: skip
STYLES = ["Explain in detail {}.", "Write a long, step-by-step guide about {}.", "Describe {} to a ten-year-old."]


def build_prompts(tokenizer, n: int) -> list[str]:
    """n deterministic chat-templated prompts asking for long answers (topics x styles, cycled)."""
    texts = [STYLES[(i // len(TOPICS)) % len(STYLES)].format(TOPICS[i % len(TOPICS)]) for i in range(n)]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]


def stream_request(port: int, prompt: str, max_new: int, timeout: float) -> Sample:
    """POST /generate_stream and time every `data:` token event."""
    body = json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": max_new, "do_sample": False}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.monotonic()
    sample, stamps = Sample(ok=False, sent=start), []
    try:
        conn.request("POST", "/generate_stream", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sample.error = f"HTTP {response.status}: {response.read()[:200]!r}"
            return sample
        for line in response:
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                sample.error = str(event["error"])
                return sample
            stamps.append(time.monotonic() - start)
            if event.get("generated_text") is not None:
                break
    except (OSError, ValueError, http.client.HTTPException) as e:
        sample.error = f"{type(e).__name__}: {e}"
        return sample
    finally:
        conn.close()
    if not stamps:
        sample.error = "no token"
        return sample
    sample.ok, sample.ttft, sample.e2e, sample.tokens = True, stamps[0], stamps[-1], len(stamps)
    sample.itl = np.diff(stamps).tolist()
    return sample


def run_level(port: int, prompts: list[str], mode: str, level: float, n: int, args: argparse.Namespace) -> list[Sample]:
    """n requests, `level` in flight at once (closed loop) or sent at Poisson times of rate `level` req/s; nothing
    is sent after --level-timeout seconds."""
    deadline = time.monotonic() + args.level_timeout
    bar = tqdm(total=n, desc=f"{mode} {level:g}", unit="req", leave=False)

    def one(i: int) -> Sample | None:
        if time.monotonic() > deadline:
            return None
        sample = stream_request(port, prompts[i % len(prompts)], args.max_new_tokens, args.request_timeout)
        bar.update(1)
        return sample

    if mode == "concurrency":
        with ThreadPoolExecutor(int(level)) as pool:
            samples = list(pool.map(one, range(n)))
    else:
        rng, at, futures = random.Random(args.seed), time.monotonic(), []
        with ThreadPoolExecutor(n) as pool:
            for i in range(n):
                time.sleep(max(0.0, at - time.monotonic()))
                futures.append(pool.submit(one, i))
                at += rng.expovariate(level)
            samples = [f.result() for f in futures]
    bar.close()
    return [s for s in samples if s is not None]


class PingProbe:
    """GET /ping every 100 ms in a thread while a level runs: the health check must stay fast under load."""

    def __init__(self, port: int) -> None:
        import threading

        self.port, self.latencies, self.stop = port, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            start = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/ping")
                conn.getresponse().read()
                conn.close()
                self.latencies.append(time.monotonic() - start)
            except OSError:
                pass

    def __enter__(self) -> PingProbe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


class Server:
    """A server subprocess (its output to a log file), ready once GET /ping answers 200."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.name, self.port, self.log_path = name, port, log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `serve` drains and stops its engine and gunicorn
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_server(name: str, model_path: str, workdir: Path, args: argparse.Namespace) -> Server:
    port = free_port(None)  # any free port
    if name == "ours":  # HF_MODEL_ID unset and an empty /opt/ml: the embedded default model, as SageMaker runs it
        ours = {n for var in VARIABLES for n in var.names}
        env = {k: v for k, v in os.environ.items() if k not in ours}
        (workdir / "opt_ml").mkdir(exist_ok=True)
        env.update(SM_OPT_ML_DIR=str(workdir / "opt_ml"), SAGEMAKER_BIND_TO_PORT=str(port), DTYPE=args.dtype)
        # Levels repeat the same prompts: cross-level prefix-cache hits would flatter us against the baseline.
        env.update(LOG_LEVEL="warning", PYTHONPATH=str(ROOT), PREFIX_CACHING="false")
        command = [sys.executable, "-m", "container.launcher"]
    else:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        command = [sys.executable, "-m", "serve.baseline_server", "--model", model_path, "--port", str(port)]
        command += ["--dtype", args.dtype, "--threads", str(args.baseline_threads), "--slots", str(args.baseline_slots)]
    return Server(name, command, env, port, workdir / f"{name}.log")


def plan(args: argparse.Namespace) -> list[tuple[str, float, int, int]]:
    """(mode, level, requests for ours, requests for the baseline, capped: it serves one request at a time)."""
    small = 4 if args.quick else 8
    levels = [("concurrency", float(c), max(small, 2 * c), max(small, c)) for c in args.concurrency]
    return levels + [("rate", r, args.rate_requests, args.baseline_rate_requests) for r in args.rates]


def bench_server(name: str, server: Server, prompts: list[str], args: argparse.Namespace) -> list[LevelResult]:
    load_s = server.wait_ready(args.start_timeout)
    print(f"{name}: ready in {load_s:.1f}s on port {server.port}", flush=True)
    for _ in range(2):  # warm-up, not timed
        stream_request(server.port, prompts[0], args.max_new_tokens, args.request_timeout)
    results = []
    for mode, level, n_ours, n_base in plan(args):
        load0 = list(os.getloadavg())
        with PingProbe(server.port) as probe:
            samples = run_level(server.port, prompts, mode, level, n_ours if name == "ours" else n_base, args)
        results.append(summarize(name, mode, level, samples, load0))
        r = results[-1]
        r.ping_s = pct(probe.latencies)
        print(f"{name} {mode} {level:g}: {r.completed}/{r.requests} ok, {r.output_tokens_per_s:.1f} tok/s, "
              f"TTFT p50 {r.ttft_s['p50'] * 1e3:.0f} ms, /ping p99 {r.ping_s['p99'] * 1e3:.1f} ms, "
              f"load {load0[0]:.2f}", flush=True)  # fmt: skip
    return results


# (default, --quick)
QUICK = {"max_new_tokens": (64, 16), "concurrency": ("1,8,32", "1,4"), "rates": ("2,8", "4"), "rate_requests": (32, 8)}
QUICK["baseline_rate_requests"] = (16, 4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-new-tokens", type=int, help="per request (default 64; quick 16)")
    ap.add_argument("--concurrency", help="comma list of concurrent streams (default 1,8,32; quick 1,4)")
    ap.add_argument("--rates", help="comma list of Poisson request rates, req/s (default 2,8; quick 4)")
    ap.add_argument("--rate-requests", type=int, help="requests per rate level, ours (default 32; quick 8)")
    ap.add_argument("--baseline-rate-requests", type=int, help="the same for the baseline (default 16; quick 4)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--baseline-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the baseline")
    ap.add_argument("--baseline-slots", type=int, default=1, help="generate() calls the baseline runs at once")
    ap.add_argument("--level-timeout", type=float, default=120, help="no request is sent later in a level (s)")
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--seed", type=int, default=0, help="of the Poisson arrival times")
    ap.add_argument("--output", default="bench_results/serving_benchmark.json", help="JSON; the PNG goes next to it")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke test (about a minute)")
    args = ap.parse_args(argv)
    for name, values in QUICK.items():
        if getattr(args, name) is None:
            setattr(args, name, values[args.quick])
    args.concurrency = [int(c) for c in str(args.concurrency).split(",")]
    args.rates = [float(r) for r in str(args.rates).split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_start = time.monotonic(), list(os.getloadavg())

    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))
    prompts = build_prompts(tokenizer, 48)
    results: list[LevelResult] = []
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp:
        for name in ("ours", "baseline"):  # one at a time: they would share the CPU
            server = start_server(name, model_path, Path(tmp), args)
            try:
                results += bench_server(name, server, prompts, args)
            finally:
                server.stop()
    ratio = ratios(results)
    print_table(results, ratio)
    top = ratio.get(f"concurrency={max(args.concurrency)}", {})
    target = {
        "concurrency": max(args.concurrency),
        "tokens_per_s_ratio": top.get("output_tokens_per_s"),
        "ttft_p50_ratio": top.get("ttft_p50"),
        "met": bool(top) and top["output_tokens_per_s"] >= 5 and top["ttft_p50"] < 1,
    }
    verdict = "met" if target["met"] else "NOT met"
    print(f"target (c={target['concurrency']}: >= 5x the baseline's tok/s and a lower TTFT p50): {verdict}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": os.path.basename(model_path), "dtype": args.dtype, "max_new_tokens": args.max_new_tokens,
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "args": vars(args),
        "loadavg": {"start": load_start, "end": list(os.getloadavg())},
        "baseline": "serve/baseline_server.py: one transformers generate() per request with a TextIteratorStreamer, "
        f"{args.baseline_slots} at a time, {args.baseline_threads} torch threads",
        "results": [asdict(r) for r in results], "ratios_ours_over_baseline": ratio, "target": target,
        "total_seconds": time.monotonic() - started,
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {report['total_seconds']:.0f}s")


if __name__ == "__main__":
    main()
