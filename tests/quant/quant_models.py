"""QuantModels: quantized checkpoints written from the tiny llama in each on-disk format (GPTQ, AWQ, FP8), built
once by name, and float32 transformers references holding the same weights dequantized.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.quant.checkpoints import dequantized_state, write_awq, write_fp8, write_gptq
from tests.support.tiny_models import TinyModels

BASE = "llama_gqa"  # 64 hidden, 128 intermediate, 4 heads / 2 KV heads, 2 layers


class QuantModels:
    """Quantized checkpoints by name (built once), and their float32 references."""

    def __init__(self, tiny_models: TinyModels, root: Path) -> None:
        self.tiny_models, self.root = tiny_models, root
        self._paths: dict[str, Path] = {}
        self._refs: dict[str, PreTrainedModel] = {}

    def __call__(self, name: str) -> Path:
        if name not in self._paths:
            src, dst = self.tiny_models(BASE), self.root / name
            if name == "gptq":
                write_gptq(src, dst, group=32)
            elif name == "gptq_act":
                write_gptq(src, dst, group=32, act_order=True)
            elif name == "gptq_g64":
                write_gptq(src, dst, group=64)
            elif name == "awq":
                write_awq(src, dst, group=32)
            elif name == "awq_g64":
                write_awq(src, dst, group=64)
            elif name == "fp8":
                write_fp8(src, dst)
            else:
                raise KeyError(name)
            self._paths[name] = dst
        return self._paths[name]

    def reference(
        self, name: str, state: dict[str, torch.Tensor] | None = None, source: str | None = None
    ) -> PreTrainedModel:
        """transformers in float32 on the dequantized weights of checkpoint `source` (default `name`), or on
        `state`; cached by `name`."""
        if name not in self._refs:
            src = self.tiny_models(BASE)
            dst = self.root / f"{name}-reference"
            shutil.copytree(src, dst, dirs_exist_ok=True)
            source = source or name
            weights = state if state is not None else dequantized_state(self(source), source.split("_")[0])
            save_file({k: v.float().contiguous() for k, v in weights.items()}, str(dst / "model.safetensors"))
            config = json.loads((dst / "config.json").read_text())
            config.pop("quantization_config", None)
            (dst / "config.json").write_text(json.dumps(config))
            self._refs[name] = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
        return self._refs[name]

    def base_state(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.tiny_models(BASE) / "model.safetensors"))
