"""Llama-family decoder (Llama 2/3, Mistral, Qwen2 with qkv bias, SmolLM) built from a HF config.

Forward runs on a flattened batch: input_ids/positions [T] -> hidden [T, hidden_size]; logits are
computed only for the rows that sample. Checkpoint names map onto packed qkv / gate_up parameters.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.attention.base import current_metadata
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.cpu_decoder_stack import DecoderStack
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import LinearBase, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, StepRotary
from engine.weight_slice import Weight, materialize


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        hd = head_dim_of(cfg)
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        qkv_bias = attention_bias or cfg.model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, hd, cfg.num_attention_heads, n_kv, bias=qkv_bias)
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * hd, cfg.hidden_size, bias=attention_bias)
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, hd
        self.q_size, self.kv_size = self.num_heads * hd, self.num_kv_heads * hd
        self.attn = Attention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5)

    def forward(self, rope: StepRotary, x: torch.Tensor) -> torch.Tensor:
        t, qk_size = x.shape[0], self.q_size + self.kv_size
        qkv = self.qkv_proj(x)
        # Rotate q and k heads in one pass: [T, H + Hkv, hd].
        qk = rope.apply(qkv, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        o = self.attn(q, k, qkv[:, qk_size:].view(t, self.num_kv_heads, self.head_dim))
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, rope: StepRotary, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_position)
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.stack: DecoderStack | None = None  # the layers as one compiled call (bf16 CPU), see use_decoder_stack

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        meta = current_metadata()
        if self.stack is not None and meta is not None and self.stack.runs(meta):
            return self.stack(x, positions, meta)
        rope = self.rotary.for_step(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint name -> (packed parameter name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg, max_position: int) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_position)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab] (in the model's dtype with `keep_dtype`: the sampler converts)."""
        logits = self.lm_head(hidden)
        return logits if keep_dtype else logits.float()

    def pack_for_cpu(self, gemm_kernel: bool = True) -> None:
        """Repack matmul weights (CPU, 16-bit only; a no-op elsewhere): bf16 for the compiled GEMM kernel when
        `gemm_kernel` and it builds, else for oneDNN (see layers/cpu_packing.py)."""
        for module in self.modules():
            if isinstance(module, LinearBase):
                module.pack_for_cpu(gemm_kernel)
        self.lm_head.pack_for_cpu(keep_plain=self.tie_word_embeddings, gemm_kernel=gemm_kernel)

    def use_decoder_stack(self) -> bool:
        """Run the layer loop as one compiled call where it can (after use_fused_cpu_ops and the caches are bound);
        -> whether it will."""
        self.model.stack = DecoderStack.build(self.model)
        return self.model.stack is not None

    def use_fused_cpu_ops(self) -> None:
        """Run RMSNorm, SiLU * up and rotary as compiled CPU passes (see layers/cpu_fused_ops.py)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, SiluAndMul, RotaryEmbedding)):
                module.fused = True

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def load_weights(self, weights: Iterable[tuple[str, Weight]]) -> None:
        """Load (checkpoint name, tensor or unread slice) pairs; raise naming any missing or unexpected tensor."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb." in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            parts = name.split(".")
            packed = next((p for p in parts if p in self.packed_modules), None)
            if packed is not None:
                target, shard = self.packed_modules[packed]
                pname = ".".join(target if p == packed else p for p in parts)
                if pname not in params:
                    raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
                params[pname].weight_loader(params[pname], tensor, shard)
                loaded.add(f"{pname}:{shard}")
                continue
            if name not in params:
                raise ValueError(f"unexpected tensor {name!r} in the checkpoint")
            loader = getattr(params[name], "weight_loader", None)
            if loader is not None:
                loader(params[name], tensor)
            else:
                params[name].data.copy_(materialize(tensor))
            loaded.add(name)
        missing = [
            n for n, p in params.items()
            if n not in loaded and not getattr(p, "optional", False) and not self._packed_complete(n, loaded)
        ]  # fmt: skip
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:5])}")

    def _packed_complete(self, pname: str, loaded: set[str]) -> bool:
        shards = [s for p, s in self.packed_modules.values() if f".{p}." in pname]
        return bool(shards) and all(f"{pname}:{s}" in loaded for s in shards)
