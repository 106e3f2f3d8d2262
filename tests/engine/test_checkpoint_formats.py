"""Checkpoint formats and sources: sharded safetensors, `.bin` through torch.load(weights_only=True), and a
hub id served from an offline huggingface_hub cache (the hub stand-in). Each must give transformers' tokens.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from engine import LLM, SamplingParams
from tests.support.tiny_models import TinyModels, random_prompt
from tests.support.tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID

PROMPTS = [random_prompt(n, seed=n) for n in (3, 17, 40)]


def _resave(src: Path, dst: Path, bin_file: bool = False, **save_kwargs) -> Path:
    model = AutoModelForCausalLM.from_pretrained(src)
    if bin_file:  # transformers 5 writes only safetensors: write the legacy pickle by hand
        dst.mkdir(parents=True)
        model.config.save_pretrained(dst)
        torch.save(model.state_dict(), dst / "pytorch_model.bin")
    else:
        model.save_pretrained(dst, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(dst)
    return dst


def _tokens(model: str) -> list[list[int]]:
    llm = LLM(model, dtype="float32")
    return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))]


@pytest.fixture(scope="module")
def reference(tiny_models: TinyModels) -> list[list[int]]:
    return _tokens(str(tiny_models("llama_gqa")))


def test_sharded_safetensors(tiny_models: TinyModels, tmp_path: Path, reference: list[list[int]]) -> None:
    path = _resave(tiny_models("llama_gqa"), tmp_path / "sharded", max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    assert _tokens(str(path)) == reference


def test_pytorch_bin_checkpoint(tiny_models: TinyModels, tmp_path: Path, reference: list[list[int]]) -> None:
    path = _resave(tiny_models("llama_gqa"), tmp_path / "bin", bin_file=True)
    assert not list(path.glob("*.safetensors")) and list(path.glob("pytorch_model*.bin"))
    assert _tokens(str(path)) == reference


def test_hub_id_from_offline_cache(
    tiny_models: TinyModels, tmp_path: Path, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id resolves through huggingface_hub's cache layout with the hub unreachable (offline mode)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_models("llama_gqa"), snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert _tokens("tiny-org/tiny-llama") == reference


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="could not fetch model 'nobody/no-such-model'"):
        LLM("nobody/no-such-model", dtype="float32")
