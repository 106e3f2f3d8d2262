"""Fixtures of the reliability suite: tiny models written offline, and one real `serve` shared by the hostile-input,
framing, overload, preemption and disconnect tests (two gunicorn workers, small limits so that a few requests
exhaust the KV cache and the admission limit). Its teardown checks the server is still healthy: SIGTERM, exit 0,
no process left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.engine.conftest import TinyModels
from tests.serve._process import Serve, running_serve

PAYLOAD_LIMIT = 64 * 1024
MAX_CONCURRENT = 6
KV_TOKENS = 1024  # 32 CPU blocks of 32 tokens: six 400-token streams cannot all fit
SHARED = dict(
    MAX_TOTAL_TOKENS="512",
    MAX_BATCH_TOTAL_TOKENS=str(KV_TOKENS),
    MAX_CONCURRENT_REQUESTS=str(MAX_CONCURRENT),
    PAYLOAD_LIMIT=str(PAYLOAD_LIMIT),
    SERVE_WORKERS="2",
    SERVE_THREADS="8",  # fewer threads than the overload tests' connections: health checks must not queue
)


@pytest.fixture(scope="session")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama (context 512) with a chat template: greedy outputs depend on every earlier token."""
    return TinyModels(tmp_path_factory.mktemp("models"))("llama_gqa")


@pytest.fixture(scope="session")
def shared(random_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(random_model, tmp_path_factory.mktemp("shared"), **SHARED) as server:
        yield server
