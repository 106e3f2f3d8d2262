"""Tiny random checkpoints written with transformers (safetensors + tokenizer + generation_config.json), by name:
the llama / qwen2 specs, the "byte_chain" model whose greedy output cycles forever, and every native family
(family_models.py). Weights come from a seeded torch RNG; `random_prompt` and `greedy` are the tests' shorthands.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine import SamplingParams
from tests.support.fallback_models import FALLBACK_SPECS
from tests.support.family_models import FAMILY_SPECS, ROPE_SPECS, FamilySpec
from tests.support.tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_token_id, train_tokenizer

MAX_POSITIONS = 512


@dataclass(frozen=True)
class TinySpec:
    """One tiny checkpoint: architecture and shape; `craft` may overwrite the random weights."""

    arch: str = "llama"  # "llama" | "qwen2"
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_hidden_layers: int = 2
    tie_word_embeddings: bool = False
    seed: int = 0
    initializer_range: float = 0.2
    extra_vocab: int = 0  # rows beyond the tokenizer's (an odd vocabulary for tensor-parallel padding)
    biases: bool = False  # llama: attention_bias and mlp_bias, every bias drawn at random
    craft: Callable[[PreTrainedModel, PreTrainedTokenizerFast], None] | None = field(default=None, compare=False)


def _build_model(spec: TinySpec, vocab_size: int) -> PreTrainedModel:
    common = dict(
        vocab_size=vocab_size + spec.extra_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=spec.initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(spec.seed)
    if spec.arch == "llama":
        biases = {"attention_bias": spec.biases, "mlp_bias": spec.biases}
        model: PreTrainedModel = LlamaForCausalLM(LlamaConfig(**common, **biases))
        if spec.biases:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith(".bias"):
                        param.normal_(0.0, 0.5)
    elif spec.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False))
        with torch.no_grad():  # random init leaves the qkv biases at zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0.0, 0.5)
    else:
        raise ValueError(spec.arch)
    return model.float().eval()


class TinyModels:
    """Writes tiny checkpoints (safetensors + tokenizer + generation_config.json) once each, by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tokenizer = train_tokenizer()
        self._paths: dict[str, Path] = {}

    def __call__(self, name: str, spec: TinySpec | FamilySpec | None = None) -> Path:
        if name in self._paths:
            return self._paths[name]
        spec = spec or SPECS[name]
        path = self.root / name
        if isinstance(spec, FamilySpec):
            model = spec.build(len(self.tokenizer))
        else:
            model = _build_model(spec, len(self.tokenizer))
        if isinstance(spec, TinySpec) and spec.craft is not None:
            with torch.no_grad():
                spec.craft(model, self.tokenizer)
        model.save_pretrained(path, safe_serialization=True)
        if isinstance(spec, FamilySpec):
            spec.written(path)
        self.tokenizer.save_pretrained(path)
        start = {"decoder_start_token_id": PAD_ID} if getattr(spec, "seq2seq", False) else {}
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, **start).save_pretrained(path)
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
        self._paths[name] = path
        return path


# A string of multi-byte characters whose UTF-8 bytes are all distinct: the "chain" model below emits
# it byte by byte, one single-byte token per step, forever.
CHAIN_TEXT = "é東京😀"
CHAIN_BYTES = CHAIN_TEXT.encode()
assert len(set(CHAIN_BYTES)) == len(CHAIN_BYTES)


def craft_byte_chain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> None:
    """Make greedy decoding a fixed cycle over the byte tokens of CHAIN_TEXT.

    Attention and MLP outputs are zeroed, so the last hidden state is RMSNorm(embedding of the last
    token); chain embeddings are orthonormal directions and the LM head row of each chain token points
    at its predecessor's direction, so the argmax after byte i is byte i + 1 (with a wide margin).
    """
    ids = [byte_token_id(tokenizer, b) for b in CHAIN_BYTES]
    hidden = model.config.hidden_size
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    basis, _ = torch.linalg.qr(torch.randn(hidden, len(ids)))
    embed = model.model.embed_tokens.weight
    head = model.lm_head.weight
    head.zero_()
    for i, token_id in enumerate(ids):
        embed[token_id] = basis[:, i]
        successor = ids[(i + 1) % len(ids)]
        head[successor] = 2.0 * basis[:, i]  # logit = 2 * rms-normalised dot = 2 * sqrt(hidden) = 16


SPECS: dict[str, TinySpec | FamilySpec] = {
    "llama_gqa": TinySpec(arch="llama", num_attention_heads=4, num_key_value_heads=2, seed=2),
    "qwen2": TinySpec(arch="qwen2", num_attention_heads=4, num_key_value_heads=2, seed=7),
    "llama_tied": TinySpec(
        arch="llama",
        num_attention_heads=4,
        num_key_value_heads=4,
        num_hidden_layers=3,
        tie_word_embeddings=True,
        seed=3,
    ),
    "byte_chain": TinySpec(arch="llama", num_hidden_layers=1, seed=4, craft=craft_byte_chain),
}
SPECS.update(FAMILY_SPECS)  # the other native families (family_models.py)
SPECS.update(ROPE_SPECS)
SPECS.update(FALLBACK_SPECS)  # architectures served through the transformers fallback
ORACLE_CONFIGS = ("llama_gqa", "qwen2", "llama_tied")


def random_prompt(length: int, seed: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """Token ids drawn from the ordinary (non-special) part of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (length,), generator=g).tolist()


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, **kw)
