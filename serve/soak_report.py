"""The soak test's report (serve/soak.py): requests by status, TTFT / ITL / /ping percentiles per time window, RSS of
each server process after the warm-up and at the end, the KV cache once idle, and the verdict: no error beyond the
designed 429s, /ping always 200, RSS growth under 2%, no KV block left in use.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from collections import Counter
from typing import Any

import numpy as np

RSS_GROWTH_LIMIT_PCT = 2.0


def pct_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}  # fmt: skip


def _window(outcomes: list[Any], pings: list[tuple[float, int | str, float]], lo: float, hi: float) -> dict[str, Any]:
    done = [o for o in outcomes if lo <= o.at < hi]
    ok = [o for o in done if o.status == 200 and o.stream_error is None]
    probes = [p for p in pings if lo <= p[0] < hi]
    return {
        "from_s": lo,
        "to_s": hi,
        "requests": len(done),
        "by_status": {str(k): v for k, v in sorted(Counter(str(o.status) for o in done).items())},
        "output_tokens_per_s": sum(o.tokens for o in ok) / max(1e-9, hi - lo),
        "ttft_ms": pct_ms([o.ttft for o in ok if o.ttft is not None]),
        "itl_ms": pct_ms([x for o in ok for x in o.itl]),
        "ping_ms": pct_ms([lat for _, s, lat in probes if s == 200]),
        "ping_not_200": sum(1 for _, s, _ in probes if s != 200),
    }


def build_report(
    args: argparse.Namespace,
    outcomes: list[Any],
    pings: list[tuple[float, int | str, float]],
    marks: dict[str, Any],
    proc_names: list[str],
) -> dict[str, Any]:
    end = max([o.at for o in outcomes] + [args.minutes * 60])
    edges = list(np.arange(0.0, args.minutes * 60, args.window)) + [end + 1e-6]  # the last takes the stragglers
    windows = [_window(outcomes, pings, lo, hi) for lo, hi in zip(edges, edges[1:])]
    statuses = Counter(str(o.status) for o in outcomes)
    stream_errors = Counter(o.stream_error for o in outcomes if o.stream_error)
    rss = {}
    for name in proc_names:
        start, last = marks["rss_start"].get(name, -1), marks["rss_end"].get(name, -1)
        growth = 100.0 * (last - start) / start if start > 0 and last > 0 else None
        rss[name] = {"initial_mb": marks["rss_initial"][name] / 2**20, "start_mb": start / 2**20,
                     "end_mb": last / 2**20, "growth_pct": growth}  # fmt: skip
    m0, m1 = marks["metrics_start"], marks["metrics_end"]
    kv = {
        "usage_at_idle": m1.get("llm_kv_cache_usage_ratio"),
        "requests_in_flight_at_idle": m1.get("llm_requests_in_flight"),
        "preemptions": m1.get("llm_preemptions_total", 0) - m0.get("llm_preemptions_total", 0),
        "prefix_cache_hit_tokens": m1.get("llm_prefix_cache_hit_tokens_total", 0)
        - m0.get("llm_prefix_cache_hit_tokens_total", 0),
    }
    errors = sum(v for k, v in statuses.items() if k not in ("200", "429")) + sum(stream_errors.values())
    growths = [r["growth_pct"] for r in rss.values() if r["growth_pct"] is not None]
    missing = [name for name, r in rss.items() if r["growth_pct"] is None]
    ping_bad = sum(1 for _, s, _ in pings if s != 200)
    verdict = {
        "errors_beyond_429": errors,
        "ping_not_200": ping_bad,
        "max_rss_growth_pct": max(growths) if growths else None,
        "processes_gone": missing,
        "kv_idle": kv["usage_at_idle"] == 0.0 and kv["requests_in_flight_at_idle"] == 0.0,
    }
    verdict["pass"] = (
        errors == 0 and ping_bad == 0 and not missing and bool(growths)
        and max(growths) < RSS_GROWTH_LIMIT_PCT and verdict["kv_idle"]
    )  # fmt: skip
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m serve.soak " + " ".join(_argv(args)),
        "args": vars(args),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_end": list(os.getloadavg()),
        "warmup_ended_s": marks.get("warm_at"),
        "requests": len(outcomes),
        "by_status": dict(sorted(statuses.items())),
        "stream_errors": dict(stream_errors),
        "ttft_ms": pct_ms([o.ttft for o in outcomes if o.status == 200 and o.ttft is not None]),
        "itl_ms": pct_ms([x for o in outcomes if o.status == 200 for x in o.itl]),
        "ping_ms": pct_ms([lat for _, s, lat in pings if s == 200]),
        "windows": windows,
        "rss": rss,
        "kv_cache": kv,
        "verdict": verdict,
    }


def _argv(args: argparse.Namespace) -> list[str]:
    out = [f"--minutes {args.minutes:g}", f"--streams {args.streams}", f"--max-new-tokens {args.max_new_tokens}"]
    out += [f"--url {args.url}"] if args.url else []
    out += [f"--model {args.model}"] if args.model else []
    out += [f"--env {e}" for e in args.env]
    return out


def _f(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_report(r: dict[str, Any]) -> None:
    print(f"\n{r['command']}: {r['requests']} requests, by status {r['by_status']}")
    header = (f"{'window s':>11} {'reqs':>6} {'200':>6} {'429':>6} {'other':>5} {'tok/s':>7} {'TTFT p50':>9} "
              f"{'p90':>7} {'p99':>7} {'ITL p50':>8} {'p99':>6} {'ping p50':>9} {'p99':>6} {'max':>6}")  # fmt: skip
    print(header)
    for w in r["windows"]:
        st = w["by_status"]
        other = w["requests"] - st.get("200", 0) - st.get("429", 0)
        t, i, p = w["ttft_ms"], w["itl_ms"], w["ping_ms"]
        print(f"{w['from_s']:>5.0f}-{w['to_s']:<5.0f} {w['requests']:>6} {st.get('200', 0):>6} {st.get('429', 0):>6} "
              f"{other:>5} {w['output_tokens_per_s']:>7.1f} {_f(t['p50']):>9} {_f(t['p90']):>7} {_f(t['p99']):>7} "
              f"{_f(i['p50'], 1):>8} {_f(i['p99']):>6} {_f(p['p50'], 1):>9} {_f(p['p99'], 1):>6} "
              f"{_f(p['max'], 1):>6}")  # fmt: skip
    print(f"\n{'process':<10} {'initial MB':>11} {'start MB':>9} {'end MB':>8} {'growth %':>9}")
    for name, m in r["rss"].items():
        print(f"{name:<10} {m['initial_mb']:>11.1f} {m['start_mb']:>9.1f} {m['end_mb']:>8.1f} "
              f"{_f(m['growth_pct'], 2):>9}")  # fmt: skip
    kv, v = r["kv_cache"], r["verdict"]
    print(f"\nKV cache at idle: usage {kv['usage_at_idle']}, in flight {kv['requests_in_flight_at_idle']}, "
          f"preemptions {kv['preemptions']:.0f}; stream errors {r['stream_errors'] or 'none'}")  # fmt: skip
    print(f"verdict: {'PASS' if v['pass'] else 'FAIL'} (errors beyond 429: {v['errors_beyond_429']}, /ping not 200: "
          f"{v['ping_not_200']}, max RSS growth {_f(v['max_rss_growth_pct'], 2)}% < {RSS_GROWTH_LIMIT_PCT}%, "
          f"KV idle: {v['kv_idle']})")  # fmt: skip
