"""What every native decoder-only model shares: checkpoint loading by name (packed q/k/v and gate/up, fused
tensors, experts), logits (optionally soft-capped), the CPU packing hook, and the per-layer config helpers.

A family subclasses `CausalLM`, builds `self.lm_head` (and ties it when the config says so) and lists in
`packed_modules` which checkpoint modules load into which packed parameter; `rename` maps any other names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import LinearBase
from engine.layers.moe import EXPERT_PARTS
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters
from engine.quant.int_weight import IntWeight
from engine.weight_slice import Weight, materialize

_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")
_FUSED_EXPERTS = {"gate_up_proj": "w13", "down_proj": "w2"}  # transformers 5's stacked [E, ...] expert tensors


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def num_kv_heads_of(cfg) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def sliding_window_of(cfg, layer: int) -> int | None:
    """The attention window of decoder layer `layer` (None: full causal). Configs with `layer_types` (Qwen2/3,
    Gemma 2/3) window only their "sliding_attention" layers; others (Mistral, Mixtral, Phi-3, StarCoder2) every
    layer when `sliding_window` is set."""
    window = getattr(cfg, "sliding_window", None) or None
    types = getattr(cfg, "layer_types", None)
    if window is not None and types is not None:
        return window if types[layer] == "sliding_attention" else None
    return window


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if not cap else torch.tanh(x / cap) * cap


# The usual separate q/k/v and gate/up checkpoint modules -> the fused qkv_proj and gate_up_proj parameters.
QKV_GATE_UP_PACKED: dict[str, tuple[str, str | int]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class CausalLM(nn.Module):
    # checkpoint module name -> (packed parameter module name, shard id)
    packed_modules: dict[str, tuple[str, str | int]] = {}
    ignored = re.compile(r".*(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias|\.attn\.bias)$")
    base_prefix = "model"  # the backbone's module name: prefixed to checkpoint names saved without it
    lm_head: ParallelLMHead
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None
    cuda_graphs: bool = True  # decode steps may be captured as CUDA graphs (no host syncs in the forward pass)

    @classmethod
    def tp_shape(cls, cfg) -> tuple[int, int, int]:
        """(attention heads, key/value heads, MLP width): what a tensor-parallel degree must divide."""
        return int(cfg.num_attention_heads), int(num_kv_heads_of(cfg)), int(cfg.intermediate_size)

    @classmethod
    def context_length(cls, cfg) -> int:
        """The longest context the model serves: max_position_embeddings, stretched by linear / dynamic / yarn
        rope scaling (whose configs keep the pre-training length there)."""
        length = int(getattr(cfg, "max_position_embeddings", None) or 2048)
        params = rope_parameters(cfg)
        rope_type, factor = params.get("rope_type", "default"), params.get("factor")
        if factor and rope_type in ("linear", "dynamic"):
            return int(length * factor)
        if factor and rope_type == "yarn":
            return max(length, int(params.get("original_max_position_embeddings", length) * factor))
        return length

    def rename(self, name: str) -> str | None:
        """Checkpoint tensor name -> this model's parameter name (None: not a parameter here, skip it)."""
        return name

    def compute_logits(self, hidden: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab] (in the model's dtype with `keep_dtype`: the sampler converts)."""
        logits = soft_cap(self.lm_head(hidden), self.final_logit_softcap)
        return logits if keep_dtype else logits.float()

    def pack_for_cpu(self, gemm_kernel: bool = True) -> None:
        """Repack matmul weights (CPU, 16-bit only; a no-op elsewhere), see layers/cpu_packing.py."""
        for module in self.modules():
            if isinstance(module, LinearBase):
                module.pack_for_cpu(gemm_kernel)
        self.lm_head.pack_for_cpu(keep_plain=self.tie_word_embeddings, gemm_kernel=gemm_kernel)

    def use_fused_cpu_ops(self) -> None:
        """RMSNorm (with its residual add), SiLU * up and full rotary as compiled CPU passes (cpu_fused_ops.py)."""
        for module in self.modules():
            if type(module) in (RMSNorm, SiluAndMul) or (type(module) is RotaryEmbedding and not module.partial):
                module.fused = True

    def use_decoder_stack(self) -> bool:
        """The one-call compiled decoder stack is Llama's alone."""
        return False

    def attention_layers(self) -> list[Attention]:
        """The paged attention layers, in layer order (each binds one layer of the KV cache)."""
        return [m for m in self.modules() if isinstance(m, Attention)]

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Load (checkpoint name, tensor or unread slice) pairs; raise naming any missing or unexpected tensor."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            name = self.rename(ckpt_name)
            if name is None or self.ignored.fullmatch(name):
                continue
            if self.base_prefix and not name.startswith((f"{self.base_prefix}.", "lm_head.")):
                name = f"{self.base_prefix}.{name}"  # e.g. BLOOM's hub checkpoints: "h.0...", "word_embeddings..."
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            pname, shard = self._target(name)
            if pname not in params:
                raise ValueError(f"unexpected tensor {ckpt_name!r} in the checkpoint")
            param = params[pname]
            if isinstance(tensor, IntWeight) and param is self.lm_head.weight:  # GGUF-native: the file's own codes
                tied, embedding = self.tie_word_embeddings, self._embedding(param)
                if self.lm_head.load_quantized(tensor, tied) and (
                    not tied or (embedding is not None and embedding.share_codes(self.lm_head))
                ):
                    loaded.add(pname)
                    continue  # else the embedding loads them too, dequantized to the dtype for its lookups
            loader = getattr(param, "weight_loader", None)
            if shard is not None:
                loader(param, tensor, shard)
                loaded.add(f"{pname}:{shard}")
            elif loader is not None:
                loader(param, tensor)
                loaded.add(pname)
            else:
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(f"tensor {ckpt_name!r} has shape {tuple(tensor.shape)}, not {tuple(param.shape)}")
                param.data.copy_(materialize(tensor))
                loaded.add(pname)
        missing = [
            n
            for n, p in params.items()
            if n not in loaded
            and not getattr(p, "optional", False)  # a quantized format's placeholder its checkpoint may leave out
            and not (getattr(p, "shards", None) and all(f"{n}:{s}" in loaded for s in p.shards))
        ]
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:5])}")

    def _embedding(self, weight: nn.Parameter) -> VocabParallelEmbedding | None:
        """The token embedding that holds `weight` (tied to the LM head)."""
        return next((m for m in self.modules() if type(m) is VocabParallelEmbedding and m.weight is weight), None)

    def _target(self, name: str) -> tuple[str, object]:
        """A parameter name -> (the parameter that loads it, shard id or None)."""
        m = _EXPERT.fullmatch(name)
        if m and m.group(3) in EXPERT_PARTS:
            part = EXPERT_PARTS[m.group(3)]
            return f"{m.group(1)}.{'w2' if part == 'down' else 'w13'}", (int(m.group(2)), part)
        prefix, _, last = name.rpartition(".")
        if prefix.endswith(".experts") and last in _FUSED_EXPERTS:
            return f"{prefix}.{_FUSED_EXPERTS[last]}", None
        parts = name.split(".")
        packed = next((p for p in parts if p in self.packed_modules), None)
        if packed is None:
            return name, None
        target, shard = self.packed_modules[packed]
        return ".".join(target if p == packed else p for p in parts), shard
