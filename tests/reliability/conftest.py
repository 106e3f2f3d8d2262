"""Fixtures of the reliability suite: tiny models written offline, and one real `serve` shared by the hostile-input,
framing, overload, preemption and disconnect tests (two gunicorn workers, small limits so that a few requests
exhaust the KV cache and the admission limit). Its teardown checks the server is still healthy: SIGTERM, exit 0,
no process left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.limits import SHARED
from tests.support.serve_process import Serve, running_serve
from tests.support.tiny_models import TinyModels


@pytest.fixture(scope="session")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama (context 512) with a chat template: greedy outputs depend on every earlier token."""
    return TinyModels(tmp_path_factory.mktemp("models"))("llama_gqa")


@pytest.fixture(scope="session")
def shared(random_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(random_model, tmp_path_factory.mktemp("shared"), **SHARED) as server:
        yield server
