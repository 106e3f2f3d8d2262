"""`serve` as SageMaker runs it: a real launcher, engine process and gunicorn on a free port.

SIGTERM drains (the in-flight stream completes, /ping and new requests get 503, exit 0); a process that dies
takes the server down with a non-zero exit; nothing is ever left running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.serve_process import Serve, base_env, free_port, wait_gone, write_chain_model
from tests.support.sse import sse_line

pytestmark = pytest.mark.integration

CONTEXT = 4096  # long streams: the chain model never stops before max_new_tokens


@pytest.fixture(scope="module")
def opt_ml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SageMaker-style /opt/ml with the model in model/ (HF_MODEL_ID stays unset)."""
    root = tmp_path_factory.mktemp("opt_ml")
    write_chain_model(root / "model", context=CONTEXT)
    return root


def serve_env(opt_ml: Path) -> dict[str, str]:
    return base_env(
        SM_OPT_ML_DIR=str(opt_ml),
        SAGEMAKER_BIND_TO_PORT=str(free_port()),
        MAX_TOTAL_TOKENS=str(CONTEXT),
        MAX_CONCURRENT_REQUESTS="4",
        SERVE_WORKERS="1",
        DTYPE="float32",
    )


@pytest.fixture
def serve(opt_ml: Path, tmp_path: Path) -> Iterator[Serve]:
    server = Serve(serve_env(opt_ml), tmp_path / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def torch_mapped(process: psutil.Process) -> bool:
    return any(f"{os.sep}torch{os.sep}" in m.path for m in process.memory_maps())


def stream(server: Serve, max_new_tokens: int, first: threading.Event, events: list[dict]) -> None:
    body = {"inputs": "é", "parameters": {"max_new_tokens": max_new_tokens}}
    request = urllib.request.Request(
        server.url("/generate_stream"), data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            if (event := sse_line(line)) is not None:
                events.append(event)
                first.set()
    first.set()


def test_sigterm_drains_in_flight_stream_then_exits_zero(serve: Serve, opt_ml: Path) -> None:
    assert f"{opt_ml / 'model'}" in serve.log()  # HF_MODEL_ID unset: SM_OPT_ML_DIR/model was served
    status, body = serve.post("/generate", {"inputs": "é", "parameters": {"max_new_tokens": 6}})
    assert status == 200, body
    tree, runtime = [serve.ps, *serve.descendants()], serve.runtime_dir()
    assert len(tree) >= 4, tree  # launcher, engine, gunicorn master and worker (and the resource tracker)
    assert (runtime / "tokenizer" / "tokenizer.json").is_file()  # the engine exported it for the workers
    (worker,) = serve.gunicorn_master().children()
    assert not torch_mapped(worker) and torch_mapped(serve.engine_process())  # the worker never loaded torch

    first, events = threading.Event(), []
    reader = threading.Thread(target=stream, args=(serve, CONTEXT - 16, first, events))
    reader.start()
    assert first.wait(30) and events, serve.log()
    serve.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while serve.status("/ping") != 503:
        assert time.monotonic() < deadline, "/ping never turned 503 during the drain"
        time.sleep(0.05)
    status, _ = serve.post("/generate", {"inputs": "é", "parameters": {"max_new_tokens": 2}})
    assert status == 503
    assert reader.is_alive(), "the stream ended before the drain could be observed"

    reader.join(60)
    assert not reader.is_alive()
    assert events[-1]["generated_text"] is not None and len(events) == CONTEXT - 16
    assert serve.wait_exit(40) == 0, serve.log()
    assert wait_gone(tree) == [] and not runtime.exists()


@pytest.mark.parametrize("victim", ["engine", "gunicorn", "launcher"])
def test_a_dying_process_takes_the_whole_tree_down(serve: Serve, victim: str) -> None:
    """Engine or gunicorn killed: the launcher stops the other and exits non-zero. Launcher killed: the engine and
    gunicorn get the kernel's parent-death signal and stop by themselves. Never an orphan."""
    tree, runtime = [serve.ps, *serve.descendants()], serve.runtime_dir()
    assert (runtime / "worker.pkl").is_file()
    try:
        pick = {"engine": serve.engine_process, "gunicorn": serve.gunicorn_master, "launcher": lambda: serve.ps}
        pick[victim]().kill()
        code = serve.wait_exit(40)
        assert code != 0, serve.log()
        deadline = time.monotonic() + 10  # until gunicorn closes its socket: 503 (the engine's connection dropped)
        while (status := serve.status("/ping", timeout=2)) not in (None, 503):
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert wait_gone(tree, timeout=30) == [], serve.log()
        if victim != "launcher":
            assert f"{victim} exited with code" in serve.log().replace("engine process", "engine")
            assert not runtime.exists()  # the launcher removed its sockets and files
    finally:
        shutil.rmtree(runtime, ignore_errors=True)  # a SIGKILLed launcher cannot clean up


def test_sigterm_while_the_model_loads_exits_zero(opt_ml: Path, tmp_path: Path) -> None:
    server = Serve(serve_env(opt_ml), tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 30
        while not any("spawn_main" in " ".join(p.cmdline()) for p in server.descendants()):
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log()
            time.sleep(0.05)
        tree = [server.ps, *server.descendants()]
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(20) == 0, server.log()
        assert wait_gone(tree) == []
        assert "gunicorn" not in server.log()
    finally:
        server.close()


def _metric(server: Serve, name: str) -> float:
    with urllib.request.urlopen(server.url("/metrics"), timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_client_disconnect_mid_stream_aborts_and_frees_kv(serve: Serve) -> None:
    """A client that hangs up mid-stream on the real server: its request leaves the engine well before the
    thousands of tokens it asked for could have been generated, and its KV blocks return (engine stats)."""
    import http.client

    began = time.monotonic()  # how long the whole generation takes when nobody hangs up
    status, _ = serve.post("/generate", {"inputs": "é", "parameters": {"max_new_tokens": CONTEXT - 16}}, timeout=60)
    full = time.monotonic() - began
    assert status == 200

    conn = http.client.HTTPConnection("127.0.0.1", serve.port, timeout=30)
    body = json.dumps({"inputs": "é", "parameters": {"max_new_tokens": CONTEXT - 16}})
    conn.request("POST", "/generate_stream", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    line = b""
    while not line.startswith(b"data:"):  # streaming has begun (response.readline undoes the chunking)
        line = response.readline()
        assert line, "the stream ended at once"
    deadline = time.monotonic() + 10
    while _metric(serve, "llm_kv_cache_usage_ratio") == 0.0:  # stats are published a few times a second
        assert time.monotonic() < deadline, "the request never showed up in the engine's stats"
        time.sleep(0.05)
    started = time.monotonic()
    conn.sock.close()  # hang up without reading the rest
    conn.close()
    while _metric(serve, "llm_requests_in_flight") != 0 or _metric(serve, "llm_kv_cache_usage_ratio") != 0.0:
        assert time.monotonic() - started < full / 2, f"the abandoned request kept running (full run {full:.1f} s)"
        time.sleep(0.02)
    status, _ = serve.post("/generate", {"inputs": "é", "parameters": {"max_new_tokens": 4}})
    assert status == 200  # the server is still healthy
