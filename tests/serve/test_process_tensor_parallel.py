"""`serve` sharded on CPU (gloo): SM_NUM_GPUS=2 answers /generate with the tokens of SM_NUM_GPUS=1, its
rendezvous port comes from SAGEMAKER_SAFE_PORT_RANGE; a rank killed mid-generation ends `serve` with a
non-zero exit and no process left; a degree that does not divide the model exits 2 with one line.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.support.serve_process import (
    Serve,
    base_env,
    free_port,
    run_serve,
    running_serve,
    wait_gone,
    write_chain_model,
)
from tests.support.tiny_models import TinyModels

pytestmark = pytest.mark.integration

PROMPTS = ["The quick brown fox", "héllo wörld", "Paris is the capital of"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GQA llama (4 heads, 2 KV heads): real attention and MLP for the two ranks to split."""
    return TinyModels(tmp_path_factory.mktemp("tp_models"))("llama_gqa")


def ranks(server: Serve) -> list[psutil.Process]:
    """The engine's tensor-parallel ranks: its multiprocessing (spawn) children."""
    return [p for p in server.engine_process().children() if "spawn_main" in " ".join(p.cmdline())]


def answers(server: Serve) -> list[tuple[list[int], str]]:
    results = []
    for prompt in PROMPTS:
        request = {"inputs": prompt, "parameters": {"max_new_tokens": 16, "details": True}}
        status, body = server.post("/generate", request)
        assert status == 200, body
        reply = json.loads(body)
        results.append(([t["id"] for t in reply["details"]["tokens"]], reply["generated_text"]))
    return results


def test_two_ranks_serve_the_tokens_of_one(model: Path, tmp_path: Path) -> None:
    low = free_port()
    high = min(low + 50, 65535)
    with running_serve(model, tmp_path / "tp2", SM_NUM_GPUS="2", SAGEMAKER_SAFE_PORT_RANGE=f"{low}-{high}") as s:
        assert len(ranks(s)) == 1
        listening = [c.laddr.port for c in s.engine_process().net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert any(low <= port <= high for port in listening), listening  # the rendezvous store
        sharded = answers(s)
    with running_serve(model, tmp_path / "tp1", SM_NUM_GPUS="1") as s:
        assert ranks(s) == []
        single = answers(s)
    assert sharded == single and all(tokens for tokens, _ in single)


def _stream(server: Serve, first: threading.Event, events: list[bytes]) -> None:
    body = json.dumps({"inputs": "é", "parameters": {"max_new_tokens": 1500}}).encode()
    request = urllib.request.Request(
        server.url("/generate_stream"), data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            for line in response:
                events.append(line)
                first.set()
    except OSError:  # the server went away mid-stream
        pass
    first.set()


def test_a_rank_killed_mid_generation_ends_serve_non_zero_with_no_leftovers(tmp_path: Path) -> None:
    """The chain model never stops by itself, so the stream is still running when rank 1 is killed."""
    chain = write_chain_model(tmp_path / "chain")
    env = base_env(
        HF_MODEL_ID=str(chain), SM_OPT_ML_DIR=str(tmp_path), SAGEMAKER_BIND_TO_PORT=str(free_port()),
        DTYPE="float32", MAX_TOTAL_TOKENS="2048", MAX_BATCH_TOTAL_TOKENS="4096", SERVE_WORKERS="1", SM_NUM_GPUS="2",
    )  # fmt: skip
    server = Serve(env, tmp_path / "serve.log")
    try:
        server.wait_ready()
        tree = [server.ps, *server.descendants()]
        (rank1,) = ranks(server)
        first, events = threading.Event(), []
        reader = threading.Thread(target=_stream, args=(server, first, events))
        reader.start()
        assert first.wait(30) and events, server.log()
        rank1.kill()
        began = time.monotonic()
        assert server.wait_exit(30) != 0
        assert time.monotonic() - began < 20, server.log()
        reader.join(30)
        assert not reader.is_alive()
        assert len(events) < 1500  # the stream was cut, not completed
        assert server.status("/ping", timeout=2) in (None, 503)
        assert wait_gone(tree, timeout=20) == [], server.log()
        assert "tensor-parallel rank 1 exited with code -9" in server.log()
    finally:
        server.close()


def test_a_degree_that_does_not_divide_the_model_exits_2_naming_sm_num_gpus(model: Path, tmp_path: Path) -> None:
    env = base_env(HF_MODEL_ID=str(model), SM_OPT_ML_DIR=str(tmp_path), SM_NUM_GPUS="3", LOG_LEVEL="error")
    result = run_serve(env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: SM_NUM_GPUS: tensor-parallel degree 3 does not divide the model (4 attention heads, "
        "2 key/value heads, intermediate size 128); degrees that work: 1, 2, 4"
    )
    assert "Traceback" not in result.stderr
