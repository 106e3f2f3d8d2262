"""Tracing's cost: the serving benchmark's streamed load (serve/benchmark.py) against two `serve` processes in one
run, one without OTLP_ENDPOINT and one exporting every span over OTLP/HTTP to a sink on loopback. Rounds alternate
between the two (and their order) so drift in the machine's load hits both; reports tokens/s and latencies.

    python -m serve.tracing_benchmark [--concurrency 8] [--rounds 3] [--requests 16] [--max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from container.ports import free_port
from container.variables import VARIABLES
from serve.bench_results import LevelResult, summarize
from serve.benchmark import ROOT, Server, build_prompts, run_level, stream_request

LIMIT = 0.03  # the issue's bound on the relative difference


class SpanSink:
    """POST /v1/traces on loopback: decodes each export (as a collector would) and counts the spans."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        sink = self
        self.spans = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                request = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(name: str, workdir: Path, args: argparse.Namespace, extra: dict[str, str]) -> Server:
    """`serve` as serve/benchmark.py runs it (the embedded default model), plus `extra` variables."""
    port = free_port(None)
    ours = {n for var in VARIABLES for n in var.names}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    (workdir / f"opt_ml-{name}").mkdir(exist_ok=True)
    env.update(SM_OPT_ML_DIR=str(workdir / f"opt_ml-{name}"), SAGEMAKER_BIND_TO_PORT=str(port), DTYPE=args.dtype)
    env.update(LOG_LEVEL="warning", PYTHONPATH=str(ROOT), PREFIX_CACHING="false", SERVE_WORKERS="1", **extra)
    return Server(name, [sys.executable, "-m", "container.launcher"], env, port, workdir / f"{name}.log")


def compare(results: list[LevelResult]) -> dict[str, dict[str, float]]:
    """Per metric: the median over rounds of each server, and on / off - 1."""
    table = {}
    for metric, read in (
        ("output_tokens_per_s", lambda r: r.output_tokens_per_s),
        ("ttft_p50_s", lambda r: r.ttft_s["p50"]),
        ("tpot_p50_s", lambda r: r.tpot_s["p50"]),
        ("e2e_p50_s", lambda r: r.e2e_s["p50"]),
    ):
        off = statistics.median(read(r) for r in results if r.server == "off")
        on = statistics.median(read(r) for r in results if r.server == "on")
        table[metric] = {"off": off, "on": on, "difference": on / off - 1}
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=8, help="streams in flight at once")
    ap.add_argument("--requests", type=int, default=16, help="per round and server")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--level-timeout", type=float, default=300)
    ap.add_argument("--request-timeout", type=float, default=300)
    ap.add_argument("--start-timeout", type=float, default=300)
    ap.add_argument("--output", default="bench_results/tracing_benchmark.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from engine.default_model import default_model_path

    model_path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path))
    prompts = build_prompts(tokenizer, 48)
    sink = SpanSink()
    results: list[LevelResult] = []
    with tempfile.TemporaryDirectory(prefix="tracing-bench-") as tmp:
        servers = {
            "off": start("off", Path(tmp), args, {}),
            "on": start("on", Path(tmp), args, {"OTLP_ENDPOINT": sink.url}),
        }
        try:
            for server in servers.values():
                server.wait_ready(args.start_timeout)
                for _ in range(2):  # warm-up, not timed
                    stream_request(server.port, prompts[0], args.max_new_tokens, args.request_timeout)
            for i in range(args.rounds):
                for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    load0 = list(os.getloadavg())
                    samples = run_level(
                        servers[name].port, prompts, "concurrency", args.concurrency, args.requests, args
                    )
                    results.append(r := summarize(name, "concurrency", args.concurrency, samples, load0))
                    print(f"round {i} {name}: {r.completed}/{r.requests} ok, {r.output_tokens_per_s:.1f} tok/s, "
                          f"TTFT p50 {r.ttft_s['p50'] * 1e3:.0f} ms", flush=True)  # fmt: skip
        finally:
            for server in servers.values():
                server.stop()
    sink.close()
    table = compare(results)
    print(f"\n{'metric':<22}{'tracing off':>14}{'tracing on':>14}{'on/off - 1':>12}")
    for metric, row in table.items():
        print(f"{metric:<22}{row['off']:>14.4f}{row['on']:>14.4f}{row['difference']:>+12.2%}")
    within = abs(table["output_tokens_per_s"]["difference"]) < LIMIT
    print(f"spans exported by the traced server: {sink.spans}; tokens/s within {LIMIT:.0%}: {within}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": os.path.basename(model_path), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "args": vars(args), "spans_exported": sink.spans, "comparison": table, "within_limit": within,
        "results": [r.__dict__ for r in results],
    }  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
