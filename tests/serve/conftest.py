"""Fixtures of the HTTP tests (test_app_*.py): `serve_env` (the shared engine, client and config; it checks
that each test leaves no request in flight and every KV block free) and `api` (a flask test client); for the
third-party client tests, `live_server` (a real `serve`), `live_runtime` (the SageMaker Runtime emulator in front of
it) and `reference_llm` (engine.LLM over the same tiny model).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flask.testing import FlaskClient

from engine import LLM
from local_mode.runtime_emulator import RuntimeEmulator
from tests.support.serve_process import LIVE_ENDPOINT, Serve, running_serve
from tests.support.served_app import Served, build_model, served


@pytest.fixture
def serve_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = served(tmp_path_factory)
    assert s.idle(), "an earlier test left requests in flight"
    yield s
    assert s.idle(), "the test left requests in flight or KV blocks allocated"


@pytest.fixture
def api(serve_env: Served) -> FlaskClient:
    return serve_env.app().test_client()


# ---- one real `serve` per test module, for the third-party client tests ---------------------------


@pytest.fixture(scope="module")
def live_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("live_model"))  # llama_gqa with a chat template


@pytest.fixture(scope="module")
def live_server(live_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    """A real `serve` process over `live_model` (float32, one worker)."""
    with running_serve(live_model, tmp_path_factory.mktemp("live_serve")) as s:
        yield s


@pytest.fixture(scope="module")
def live_runtime(live_server: Serve) -> Iterator[str]:
    """local_mode's SageMaker Runtime emulator with `live_server` as endpoint LIVE_ENDPOINT: its endpoint_url."""
    with RuntimeEmulator({LIVE_ENDPOINT: live_server.url("")}) as emulator:
        yield emulator.url


@pytest.fixture(scope="module")
def reference_llm(live_model: Path) -> LLM:
    """engine.LLM in-process over `live_model`: the greedy answers the server must give."""
    torch.set_num_threads(1)
    return LLM(str(live_model), dtype="float32", max_batch_total_tokens=4096)
