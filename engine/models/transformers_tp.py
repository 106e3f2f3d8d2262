"""Tensor parallelism for the transformers fallback: the model's own declared plan (`base_model_tp_plan`: module
pattern -> "colwise" / "rowwise") applied to its loaded `nn.Linear` layers by hand, Megatron-style. Colwise layers
keep this rank's output features (whole heads of q/k/v; one replicated key/value head when there are fewer than
ranks), rowwise layers this rank's input features and sum their outputs over the ranks. Embeddings, norms and the
LM head stay replicated.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn import functional as F

from engine.models.base import num_kv_heads_of
from engine.parallel import ParallelState

_SHARDED = {"colwise", "rowwise"}
# styles whose module stays whole on every rank: replicated norms, and embeddings (a replicated table is exact)
_REPLICATED = {"replicate", "replicated_with_grad_allreduce", "embedding_rowwise", "embedding_colwise"}


def tp_plan(hf_config) -> dict[str, str]:
    return dict(getattr(hf_config.get_text_config(), "base_model_tp_plan", None) or {})


def tp_plan_problem(hf_config) -> str | None:
    """Why the fallback cannot shard this config across ranks (None: it can), from the declared plan alone."""
    plan = tp_plan(hf_config)
    if not plan:
        return "its transformers config declares no tensor-parallel plan (base_model_tp_plan)"
    styles = {p: s for p, s in plan.items() if s not in _SHARDED | _REPLICATED}
    if styles:
        pattern, style = sorted(styles.items())[0]
        return f"its tensor-parallel plan asks for {style!r} ({pattern}), which the fallback does not shard"
    if "rowwise" not in plan.values():
        return "its tensor-parallel plan has no rowwise layer (nothing would sum the ranks' outputs)"
    return None


class RowwiseLinear(nn.Module):
    """This rank's input features of a linear layer: x [..., in/N] -> the sum over ranks of x @ W_r^T, plus the
    bias once (after the sum)."""

    def __init__(self, linear: nn.Linear, rank: int, world: int, state: ParallelState) -> None:
        super().__init__()
        width = linear.in_features // world
        self.weight = nn.Parameter(linear.weight.detach()[:, rank * width : (rank + 1) * width].clone(), False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), False)
        self.in_features, self.out_features, self.state = width, linear.out_features, state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.state.all_reduce(F.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def _keep_rows(linear: nn.Linear, rows: slice) -> None:
    """Keep output features `rows` of `linear` (weight [out, in], bias [out]) in place."""
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), False)
    linear.out_features = linear.weight.shape[0]


def _pattern(plan_key: str) -> re.Pattern:
    return re.compile(re.escape(plan_key).replace(r"\*", r"\d+") + "$")


def shard(base: nn.Module, hf_config, state: ParallelState) -> None:
    """Apply the declared plan to `base` (transformers' base model: the plan's names are relative to it) for
    `state`'s rank, in place. ValueError when a planned module is not a linear layer or does not split evenly."""
    rank, world = state.rank, state.world_size
    text = hf_config.get_text_config()
    heads, kv_heads = int(text.num_attention_heads), int(num_kv_heads_of(text))
    plan = [(_pattern(key), style) for key, style in tp_plan(hf_config).items() if style in _SHARDED]
    modules = dict(base.named_modules())
    for name, module in list(modules.items()):
        style = next((s for p, s in plan if p.match(name)), None)
        if style is None:
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"its tensor-parallel plan shards {name}, a {type(module).__name__}, not a linear layer")
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name]
        size = module.out_features if style == "colwise" else module.in_features
        head_dim = int(getattr(parent, "head_dim", 0) or 0)
        if style == "colwise" and head_dim and kv_heads < world and size == kv_heads * head_dim != heads * head_dim:
            head = rank * kv_heads // world  # fewer key/value heads than ranks: this rank's query heads' one
            _keep_rows(module, slice(head * head_dim, (head + 1) * head_dim))
            continue
        if size % world:
            raise ValueError(f"{name} ({size} features) does not split across {world} tensor-parallel ranks")
        if style == "colwise":
            part = size // world
            _keep_rows(module, slice(rank * part, (rank + 1) * part))
        else:
            setattr(parent, child, RowwiseLinear(module, rank, world, state))
    _shard_per_head_parameters(base, heads, kv_heads, rank, world)


def _shard_per_head_parameters(base: nn.Module, heads: int, kv_heads: int, rank: int, world: int) -> None:
    """Parameters of an attention module's other children shaped [heads, head_dim, ...] (Cohere's per-head q/k
    norms) keep this rank's heads, as its sharded projections did."""
    for module in base.modules():
        head_dim = int(getattr(module, "head_dim", 0) or 0)
        if not head_dim:
            continue
        for child in module.children():
            if isinstance(child, (nn.Linear, RowwiseLinear)):
                continue
            for pname, param in list(child.named_parameters(recurse=False)):
                if param.dim() < 2 or param.shape[1] != head_dim or param.shape[0] not in (heads, kv_heads):
                    continue
                count = param.shape[0]
                if count < world:  # replicated key/value heads: the one this rank's query heads use
                    first, part = rank * count // world, 1
                else:
                    part = count // world
                    first = rank * part
                setattr(child, pname, nn.Parameter(param.detach()[first : first + part].clone(), False))
