"""The tiny checkpoints are what the other tests assume: architectures, GQA / MHA, tied or untied
embeddings, qkv biases, safetensors on disk, a trained byte-level tokenizer that round-trips
multi-byte UTF-8, and generation_config.json with the EOS id.
"""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from tests.support.tiny_models import TinyModels
from tests.support.tiny_tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

EXPECTED = {
    "llama_gqa": ("LlamaForCausalLM", 4, 2, False),
    "qwen2": ("Qwen2ForCausalLM", 4, 2, False),
    "llama_tied": ("LlamaForCausalLM", 4, 4, True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_checkpoint_layout(name: str, tiny_models: TinyModels) -> None:
    arch, heads, kv_heads, tied = EXPECTED[name]
    path = tiny_models(name)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (heads, kv_heads)
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] == 128 and cfg["max_position_embeddings"] == 512
    assert bool(cfg.get("tie_word_embeddings")) == tied
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == EOS_ID
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert ("lm_head.weight" in keys) == (not tied)
        bias = "model.layers.0.self_attn.q_proj.bias"
        assert (bias in keys) == (name == "qwen2")
        if bias in keys:
            assert f.get_tensor(bias).abs().max() > 0.1


def test_tokenizer_round_trips_multibyte_text(tokenizer) -> None:
    text = "héllo wörld ünïcode 東京 日本語 😀 emoji"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID and len(tokenizer) == VOCAB_SIZE
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) < len(text.encode()), "BPE merges should make tokens longer than one byte"
    assert tokenizer.eos_token_id == EOS_ID and tokenizer.bos_token_id == BOS_ID
