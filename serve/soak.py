"""Soak test: `python -m serve.soak --minutes 5 --streams 256 [--url http://127.0.0.1:PORT | --model PATH]`.

`--streams` client threads keep requests going (TGI streams, chat streams, non-streamed /invocations; a 429 backs off
briefly and retries) against a loopback server, one given or one it starts itself, for a bounded time; /ping is
probed throughout. Reports requests by status, TTFT / ITL / /ping percentiles per time window, the RSS of every
server process (launcher, engine, gunicorn, workers) after a warm-up and at the end, and the KV cache once idle
(from /metrics); prints a table (serve/soak_report.py) and writes JSON.
"""

from __future__ import annotations

import argparse
import http.client
import ipaddress
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.soak_report import build_report, print_report

MAX_MINUTES, MAX_STREAMS = 60.0, 1024
REQUEST_TIMEOUT_S = 300.0
TOPICS = ["the tides", "a bicycle", "bread", "the moon", "compilers", "rain", "chess", "volcanoes", "bees", "maps"]


@dataclass
class Outcome:
    """One request as the client saw it; times in seconds (`at`: when it ended, from the soak's start)."""

    at: float
    route: str
    status: int | str  # HTTP status, or the exception that ended it
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    stream_error: str | None = None  # an error event after the stream began


def _request(route: str, prompt: str, max_new: int) -> tuple[str, dict[str, Any], bool]:
    if route == "chat":
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_new, "stream": True}
        return "/v1/chat/completions", body, True
    if route == "generate_stream":
        return "/generate_stream", {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}, True
    return "/invocations", {"inputs": prompt, "parameters": {"max_new_tokens": max_new}}, False


def one_request(port: int, route: str, prompt: str, max_new: int, started: float) -> Outcome:
    path, body, streamed = _request(route, prompt, max_new)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    sent, stamps = time.monotonic(), []
    out = Outcome(0.0, route, 0)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        out.status = response.status
        if response.status != 200 or not streamed:
            response.read()
        else:
            for line in response:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    out.stream_error = str(event["error"])[:200]
                    break
                stamps.append(time.monotonic() - sent)
    except (OSError, ValueError, http.client.HTTPException) as e:
        out.status = type(e).__name__
    finally:
        conn.close()
    if stamps:
        out.ttft, out.tokens = stamps[0], len(stamps)
        out.itl = [b - a for a, b in zip(stamps, stamps[1:])]
    out.at = time.monotonic() - started
    return out


class Soak:
    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port, self.args = port, args
        self.outcomes: list[Outcome] = []
        self.pings: list[tuple[float, int | str, float]] = []  # (at, status, latency)
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.deadline = self.started + args.minutes * 60

    def _client(self, i: int) -> None:
        rng = random.Random(self.args.seed * 100_003 + i)
        routes = ["generate_stream"] * 5 + ["chat"] * 3 + ["invocations"] * 2
        while time.monotonic() < self.deadline:
            prompt = f"Request {i}: tell me about {rng.choice(TOPICS)}, in {rng.randint(2, 9)} sentences."
            max_new = rng.randint(8, self.args.max_new_tokens)
            out = one_request(self.port, rng.choice(routes), prompt, max_new, self.started)
            with self._lock:
                self.outcomes.append(out)
            if out.status != 200:  # 429 by design beyond MAX_CONCURRENT_REQUESTS: back off a little
                time.sleep(rng.uniform(0.05, 0.25))

    def _probe(self) -> None:
        while time.monotonic() < self.deadline:
            began = time.monotonic()
            status: int | str
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/ping")
                status = conn.getresponse().status
                conn.close()
            except OSError as e:
                status = type(e).__name__
            self.pings.append((began - self.started, status, time.monotonic() - began))
            time.sleep(0.2)

    def run(self, on_warm: Any) -> None:
        threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(self.args.streams)]
        threads.append(threading.Thread(target=self._probe, daemon=True))
        for t in threads:
            t.start()
        time.sleep(min(self.args.warmup, self.args.minutes * 60))
        on_warm()
        for t in threads:
            t.join(max(1.0, self.deadline - time.monotonic()) + REQUEST_TIMEOUT_S)


def metrics(port: int) -> dict[str, float]:
    """Unlabelled samples of /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def wait_idle(port: int, timeout: float = 120) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(port)
        if m.get("llm_requests_in_flight") == 0 or time.monotonic() > deadline:
            time.sleep(1.0)  # one more stats interval
            return metrics(port)
        time.sleep(0.5)


def processes(port: int, root_pid: int | None) -> dict[str, Any]:
    """The server's processes by role: the launcher (whoever listens on the port and has no listening parent),
    the engine and its ranks, the gunicorn master and its workers."""
    import psutil

    if root_pid is None:  # the launcher: an ancestor (or itself) of whoever listens on the port
        pids = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        for pid in filter(None, pids):
            for p in [psutil.Process(pid), *psutil.Process(pid).parents()]:
                line = p.cmdline()
                if "container.launcher" in line or (line[1:2] and os.path.basename(line[1]) == "serve"):
                    root_pid = p.pid
                    break
            if root_pid is not None:
                break
        if root_pid is None:
            raise SystemExit(f"error: no `serve` launcher found behind port {port} (listeners: {sorted(pids)})")
    root = psutil.Process(root_pid)
    found: dict[str, Any] = {"launcher": root}
    for child in root.children():
        line = " ".join(child.cmdline())
        if "gunicorn" in line:
            found["gunicorn"] = child
            for k, worker in enumerate(sorted(child.children(), key=lambda p: p.pid)):
                found[f"worker{k}"] = worker
        elif "resource_tracker" not in line:
            found["engine"] = child
            for r, rank in enumerate(sorted(child.children(), key=lambda p: p.pid), start=1):
                if "resource_tracker" not in " ".join(rank.cmdline()):
                    found[f"rank{r}"] = rank
    return found


def rss(procs: dict[str, Any]) -> dict[str, int]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = p.memory_info().rss
        except Exception:  # gone (a worker restarted): reported as missing
            out[name] = -1
    return out


def start_server(args: argparse.Namespace, workdir: Path) -> Any:
    from container.ports import free_port
    from container.variables import VARIABLES
    from serve.benchmark import ROOT, Server

    port = free_port(None)
    ours = {n for var in VARIABLES for n in var.names}
    env = {k: v for k, v in os.environ.items() if k not in ours}
    (workdir / "opt_ml").mkdir(exist_ok=True)
    env.update(SM_OPT_ML_DIR=str(workdir / "opt_ml"), SAGEMAKER_BIND_TO_PORT=str(port), PYTHONPATH=str(ROOT))
    env["LOG_LEVEL"] = "warning"
    if args.model:
        env["HF_MODEL_ID"] = args.model
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value
    command = [sys.executable, "-m", "container.launcher"]
    return Server("serve", command, env, port, workdir / "serve.log")


def loopback_port(url: str) -> int:
    parsed = urllib.parse.urlsplit(url)
    host = parsed.hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"error: --url must name a loopback address, got {host!r}")
    return parsed.port or 80


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help=f"how long requests are sent (at most {MAX_MINUTES:g})")
    ap.add_argument("--streams", type=int, default=256, help=f"client threads (at most {MAX_STREAMS})")
    ap.add_argument("--url", help="a running server on this host (default: start `serve` on a free port)")
    ap.add_argument("--model", help="HF_MODEL_ID of the server it starts (default: the embedded default model)")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="for the server it starts")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="each request asks for 8..this many")
    ap.add_argument("--window", type=float, default=60.0, help="seconds per reporting window")
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds of load before the starting RSS is taken")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="bench_results/soak.json")
    args = ap.parse_args(argv)
    if not 0 < args.minutes <= MAX_MINUTES or not 1 <= args.streams <= MAX_STREAMS:
        ap.error(f"--minutes must be in (0, {MAX_MINUTES:g}] and --streams in [1, {MAX_STREAMS}]")
    if args.url and (args.model or args.env):
        ap.error("--model and --env are for the server this command starts, not one given with --url")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        server = None if args.url else start_server(args, Path(tmp))
        try:
            port = loopback_port(args.url) if args.url else server.port
            if server is not None:
                print(f"serve ready in {server.wait_ready(600):.1f}s on port {port}", flush=True)
            procs = processes(port, None if server is None else server.proc.pid)
            soak = Soak(port, args)
            marks: dict[str, Any] = {"rss_initial": rss(procs)}
            marks["metrics_start"] = metrics(port)
            print(f"soak: {args.streams} streams for {args.minutes:g} min against port {port}", flush=True)
            soak.run(on_warm=lambda: marks.update(rss_start=rss(procs), warm_at=time.monotonic() - soak.started))
            marks["metrics_end"] = wait_idle(port)
            marks["rss_end"] = rss(procs)
            report = build_report(args, soak.outcomes, soak.pings, marks, sorted(procs))
        finally:
            if server is not None:
                server.stop()
    if server is not None:  # SIGTERM after the soak: it must drain and exit 0
        report["server_exit_code"] = server.proc.returncode
        report["verdict"]["pass"] = report["verdict"]["pass"] and server.proc.returncode == 0
    print_report(report)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    sys.exit(0 if report["verdict"]["pass"] else 1)


if __name__ == "__main__":
    main()
