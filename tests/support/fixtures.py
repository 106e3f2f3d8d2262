"""The tiny-model fixtures, imported by the conftests that use them: one torch thread for the session, the tiny
checkpoints and their tokenizer, the transformers oracle and the cached engines.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from tests.support.oracle import Engines, Oracle
from tests.support.tiny_models import TinyModels


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a small shared CPU OpenMP threads waiting on each
    other (or on a busy neighbour process) make every matmul orders of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tokenizer(tiny_models: TinyModels) -> PreTrainedTokenizerFast:
    return tiny_models.tokenizer


@pytest.fixture(scope="session")
def oracle(tiny_models: TinyModels) -> Oracle:
    return Oracle(tiny_models)


@pytest.fixture(scope="session")
def engines(tiny_models: TinyModels) -> Engines:
    return Engines(tiny_models)
