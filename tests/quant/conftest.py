"""Fixtures for the quantization tests: the engine tests' tiny models, quantized checkpoints written from them in
each on-disk format, and float32 reference models holding the same weights dequantized (transformers runs them).
"""

from __future__ import annotations

import pytest

from tests.quant.quant_models import QuantModels
from tests.support.fixtures import single_torch_thread, tiny_models, tokenizer  # noqa: F401  (the fixtures)
from tests.support.tiny_models import TinyModels


@pytest.fixture(scope="session")
def quant_models(tiny_models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> QuantModels:  # noqa: F811
    return QuantModels(tiny_models, tmp_path_factory.mktemp("quant_models"))
