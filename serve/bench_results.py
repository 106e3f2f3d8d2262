"""The serving benchmark's results (serve/benchmark.py): each request as the client saw it, each level's summary
(percentiles of TTFT, TPOT, ITL, E2E; tokens/s), the ours / baseline ratios, the printed table and the plot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Sample:
    """One request as the client saw it: times in seconds from its send."""

    ok: bool
    sent: float = 0.0
    ttft: float = float("nan")
    e2e: float = float("nan")
    tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class LevelResult:
    server: str
    mode: str  # "concurrency" | "rate"
    level: float
    requests: int
    completed: int
    failed: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    mean_output_tokens: float
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    loadavg_before: list[float]
    loadavg_after: list[float]
    errors: list[str]
    ping_s: dict[str, float] = field(default_factory=dict)  # GET /ping latency while the level ran


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "mean"), float("nan"))
    p50, p90, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(np.mean(values))}


def summarize(server: str, mode: str, level: float, samples: list[Sample], load0: list[float]) -> LevelResult:
    ok = [s for s in samples if s.ok]
    tokens = sum(s.tokens for s in ok)
    wall = max((s.sent + s.e2e for s in ok), default=0.0) - min((s.sent for s in samples), default=0.0)
    return LevelResult(
        server, mode, level, len(samples), len(ok), len(samples) - len(ok), tokens, wall,
        tokens / wall if wall > 0 else 0.0, len(ok) / wall if wall > 0 else 0.0, tokens / max(1, len(ok)),
        pct([s.ttft for s in ok]), pct([(s.e2e - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1]),
        pct([g for s in ok for g in s.itl]), pct([s.e2e for s in ok]), load0, list(os.getloadavg()),
        sorted({s.error for s in samples if not s.ok})[:5],
    )  # fmt: skip


def ratios(results: list[LevelResult]) -> dict[str, dict[str, float]]:
    """Per level present for both servers: ours / baseline of tokens/s and of the p50 latencies."""
    base = {(r.mode, r.level): r for r in results if r.server == "baseline"}
    pairs = [(r, base[r.mode, r.level]) for r in results if r.server == "ours" and (r.mode, r.level) in base]
    return {
        f"{r.mode}={r.level:g}": {"output_tokens_per_s": r.output_tokens_per_s / max(b.output_tokens_per_s, 1e-9)}
        | {f"{k}_p50": getattr(r, f"{k}_s")["p50"] / getattr(b, f"{k}_s")["p50"] for k in ("ttft", "tpot", "e2e")}
        for r, b in pairs
    }


def print_table(results: list[LevelResult], ratio: dict[str, dict[str, float]]) -> None:
    cols = ["server", "level", "ok/req", "tok/s", "TTFT50", "TTFT90", "TTFT99", "TPOT50", "ITL50", "ITL99", "E2E50"]
    cols += ["x tok/s", "x TTFT"]
    print(f"{cols[0]:<9}{cols[1]:<11}" + "".join(f"{c:>8}" for c in cols[2:]))
    for r in results:
        x = ratio.get(f"{r.mode}={r.level:g}", {}) if r.server == "ours" else {}
        level = f"{'c' if r.mode == 'concurrency' else 'rate '}{r.level:g}"
        ms = [r.ttft_s["p50"], r.ttft_s["p90"], r.ttft_s["p99"], r.tpot_s["p50"], r.itl_s["p50"], r.itl_s["p99"]]
        row = [f"{r.completed}/{r.requests}", f"{r.output_tokens_per_s:.1f}"] + [f"{v * 1e3:.0f}" for v in ms]
        row += [f"{r.e2e_s['p50']:.2f}s"]
        row += [f"{x['output_tokens_per_s']:.2f}", f"{x['ttft_p50']:.3f}"] if x else ["", ""]
        print(f"{r.server:<9}{level:<11}" + "".join(f"{v:>8}" for v in row))
    print("times in ms (E2E in s); x = ours / baseline")


def plot(results: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_ttft) = plt.subplots(1, 2, figsize=(10, 4))
    for server, marker in (("ours", "o"), ("baseline", "s")):
        rs = [r for r in results if r.server == server and r.mode == "concurrency"]
        x = [r.level for r in rs]
        ax_tps.plot(x, [r.output_tokens_per_s for r in rs], marker=marker, label=server)
        ax_ttft.plot(x, [r.ttft_s["p50"] for r in rs], marker=marker, label=server)
    ax_tps.set(xlabel="concurrent streams", ylabel="output tokens/s", title="throughput", xscale="log")
    ax_ttft.set(xlabel="concurrent streams", ylabel="TTFT p50 (s)", title="time to first token", xscale="log")
    ax_ttft.set_yscale("log")
    levels = sorted({r.level for r in results if r.mode == "concurrency"})
    for ax in (ax_tps, ax_ttft):
        ax.set_xticks(levels, [f"{c:g}" for c in levels])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
