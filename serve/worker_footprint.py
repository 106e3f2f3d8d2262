"""What one HTTP worker costs: resident memory and boot time of `serve.wsgi.build_app` in a fresh interpreter, with
the tokenizer the engine exports (serve.tokenizer) and with transformers' (the fallback, and the old way).

    python -m serve.worker_footprint [--model PATH_OR_GGUF] [--runs 3] [--json footprint.json]

Prints a table and writes JSON. The model defaults to the embedded one; its tokenizer is exported here, as the
engine process would export it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from serve.engine_protocol import ModelInfo
from serve.ipc import Addresses, WorkerConfig
from serve.server_config import ServerConfig

ROOT = Path(__file__).resolve().parents[1]
# Run in the fresh worker: build the app, tokenize once, report the build time, RSS and the heavy modules it holds.
_CHILD = """
import sys, time
t0 = time.perf_counter()
from serve.wsgi import build_app
app = build_app(sys.argv[1])
app.extensions["serve"].validator.encode("Hello world")
built = time.perf_counter() - t0
rss = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024
app.extensions["serve"].client.close()
print(built, rss, ",".join(m for m in ("torch", "transformers") if m in sys.modules) or "-")
"""


def _configs(model: str | None, workdir: str) -> dict[str, str]:
    """mode -> a worker config file: "exported" (the engine's export) and "transformers" (no export)."""
    from engine.model_source import load_tokenizer, resolve_model
    from serve.tokenizer_export import export_tokenizer

    files = resolve_model(model)
    exported = os.path.join(workdir, "tokenizer")
    export_tokenizer(load_tokenizer(files), exported)
    info = ModelInfo("m", "float32", "cpu", 10, 20, 100, 100, 2)
    paths = {}
    for mode, worker_tokenizer in (("exported", exported), ("transformers", None)):
        runtime = os.path.join(workdir, mode)
        os.makedirs(runtime)
        config = WorkerConfig(
            Addresses.in_dir(runtime), ServerConfig("m", 10, 20), info, files.directory, files.gguf_file, False,
            "warning", worker_tokenizer,
        )  # fmt: skip
        paths[mode] = os.path.join(runtime, "worker.pkl")
        config.write(paths[mode])
    return paths


def measure(config_path: str) -> dict[str, float | str]:
    """One fresh worker: wall seconds from spawn to a built app (boot), build_app's own seconds, RSS in MiB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, config_path], env=env, capture_output=True, text=True, check=True, timeout=300
    )
    boot = time.perf_counter() - started
    built, rss, heavy = run.stdout.split()[-3:]
    return {"boot_s": boot, "build_app_s": float(built), "rss_mib": int(rss) / 2**20, "heavy_modules": heavy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model directory or .gguf file (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=3, help="fresh workers per mode; the median is reported")
    parser.add_argument("--json", default="worker_footprint.json", help="where to write the results")
    args = parser.parse_args(argv)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="footprint-") as workdir:
        for mode, path in _configs(args.model, workdir).items():
            runs = [measure(path) for _ in range(args.runs)]
            results[mode] = {
                key: statistics.median(r[key] for r in runs) if key != "heavy_modules" else runs[0][key]
                for key in runs[0]
            } | {"runs": runs}
    print(f"{'tokenizer':<14}{'RSS MiB':>10}{'boot s':>10}{'build_app s':>14}  heavy modules")
    for mode, r in results.items():
        print(f"{mode:<14}{r['rss_mib']:>10.1f}{r['boot_s']:>10.2f}{r['build_app_s']:>14.2f}  {r['heavy_modules']}")
    Path(args.json).write_text(json.dumps({"model": args.model or "embedded default", **results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
