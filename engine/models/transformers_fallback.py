"""The transformers fallback: a decoder-only `*ForCausalLM` we have no native implementation of runs transformers' own
modelling code, with our paged KV cache plugged in as an attention function registered in transformers' attention
interface (`ATTN_IMPLEMENTATION`). Each of its attention modules calls one of our `Attention` layers, so the model
keeps continuous batching, chunked prefill, preemption and prefix caching, on whichever backend the plan picked.

The whole step is one flattened sequence (batch 1, `position_ids` = each token's position); no mask is built (no
mask function is registered under our name), the backend's metadata says which rows belong to which sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from engine.layers.attention import Attention
from engine.model_source import ModelFiles
from engine.models.base import CausalLM, num_kv_heads_of
from engine.parallel import SINGLE_RANK, ParallelState

ATTN_IMPLEMENTATION = "engine_paged"
_LAYER = "_engine_paged_attention"  # each transformers attention module's Attention, kept out of its submodules
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}
# Keyword arguments transformers hands attention functions that are options we compute (scaling, sliding_window,
# softcap) or facts the paged path has already (positions, no transformers cache); any other one set is refused.
_HANDLED = {"dropout", "scaling", "sliding_window", "softcap", "position_ids", "use_cache", "is_causal"}
_HANDLED.add("cache_position")

_recorded: list[tuple[nn.Module, tuple, tuple, tuple, Any, dict]] | None = None  # set while probing


def _paged_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [1, H, T, D], key/value [1, Hkv, T, D] (rotated, normed as the
    model does) -> ([1, T, H, D], no weights). The step's K/V go into the layer's paged cache; attention reads it."""
    if _recorded is not None:  # the start-up probe: record what this module asks for, compute nothing
        _recorded.append((module, tuple(query.shape), tuple(key.shape), tuple(value.shape), attention_mask, kwargs))
        return query.new_zeros(query.shape).transpose(1, 2), None
    layer: Attention = module.__dict__[_LAYER]
    dtype = layer.k_cache.dtype
    # [T, heads, D] with canonical strides (a one-head tensor's `contiguous()` may keep the transpose's head stride)
    q, k, v = (x[0].transpose(0, 1).to(dtype).clone(memory_format=torch.contiguous_format) for x in (query, key, value))
    return layer(q, k, v).unsqueeze(0), None


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _paged_attention)


def _causal_lm_class(hf_config) -> type | None:
    """The class AutoModelForCausalLM builds for this config (None: none, or remote code not fetched yet)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM._model_mapping[type(hf_config)]
    except (KeyError, ValueError):
        return None


def unsupported_reason(hf_config) -> str | None:
    """Why the fallback cannot serve this config, from the config alone (None: it can try; the probe at load time
    checks the rest)."""
    if getattr(hf_config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    remote = "AutoModelForCausalLM" in (getattr(hf_config, "auto_map", None) or {})
    cls = _causal_lm_class(hf_config)
    if cls is None:
        model_type = getattr(hf_config, "model_type", None)
        return None if remote else f"transformers has no causal-LM class for model type {model_type!r}"
    if not getattr(cls, "_supports_attention_backend", False):
        return f"{cls.__name__} does not route its attention through transformers' attention interface"
    types = set(getattr(hf_config.get_text_config(), "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES
    if types:
        return f"it has {', '.join(sorted(map(str, types)))} layers, whose state the paged KV cache cannot hold"
    return None


@contextmanager
def _recording() -> Iterator[list]:
    global _recorded
    _recorded = calls = []
    try:
        yield calls
    finally:
        _recorded = None


class TransformersCausalLM(CausalLM):
    """transformers' model with one paged `Attention` per attention module. It computes its own logits (its head may
    scale or soft-cap them), only for the sampling rows: `computes_logits`."""

    computes_logits = True
    cuda_graphs = False  # transformers' modelling code may sync with the host (rope updates, masks, routing)

    def __init__(self, hf_model: nn.Module, layers: list[Attention]) -> None:
        super().__init__()
        self.hf = hf_model
        self.paged = nn.ModuleList(layers)

    @classmethod
    def load(
        cls,
        files: ModelFiles,
        hf_config,
        device: torch.device,
        dtype: torch.dtype,
        trust_remote_code: bool = False,
        parallel: ParallelState = SINGLE_RANK,
    ) -> TransformersCausalLM:
        """Build and load the checkpoint with transformers (its loader knows every architecture's names), shard it
        by the model's declared plan when `parallel` has several ranks (loaded on the CPU, then this rank's shard
        moves to `device`), then probe one forward pass to learn each attention module's heads and options;
        ValueError (one line) when the model cannot run on the paged cache."""
        from transformers import AutoModelForCausalLM

        from engine.models.transformers_tp import shard

        _register()
        arch = (getattr(hf_config, "architectures", None) or [hf_config.model_type])[0]
        load_on = device if parallel.world_size == 1 else torch.device("cpu")  # several ranks: shard, then move
        try:
            hf, info = AutoModelForCausalLM.from_pretrained(
                files.directory, config=copy.deepcopy(hf_config), gguf_file=files.gguf_file, dtype=dtype,
                device_map={"": load_on}, attn_implementation=ATTN_IMPLEMENTATION, trust_remote_code=trust_remote_code,
                output_loading_info=True,
            )  # fmt: skip
        except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"the transformers fallback could not load {arch}: {first}") from e
        for kind in ("missing", "mismatched", "unexpected"):  # transformers would start missing ones at random
            names = sorted(map(str, info.get(f"{kind}_keys") or ()))
            if names:
                raise ValueError(f"the transformers fallback could not load {arch}: {kind} tensors in the checkpoint: "
                                 f"{', '.join(names[:5])}")  # fmt: skip
        if not getattr(hf, "_supports_attention_backend", False):
            raise ValueError(f"the transformers fallback cannot serve {arch}: {type(hf).__name__} does not route its "
                             "attention through transformers' attention interface")  # fmt: skip
        if parallel.world_size > 1:
            try:
                shard(hf.base_model, hf.config, parallel)
            except ValueError as e:
                raise ValueError(f"the transformers fallback cannot shard {arch}: {e}") from e
            hf.to(device)
        return cls(hf.eval(), _paged_layers(hf, arch, device, parallel.world_size))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, sample_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """input_ids/positions [T] -> logits [N, V] of `sample_rows` (None: every row), in the model's dtype."""
        out = self.hf(
            input_ids=input_ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=0 if sample_rows is None else sample_rows,  # 0: every row
        )
        return out.logits[0]

    def attention_layers(self) -> list[Attention]:
        return list(self.paged)

    def load_weights(self, weights) -> None:
        raise TypeError("the transformers fallback loads its weights with transformers (TransformersCausalLM.load)")

    def compute_logits(self, hidden: torch.Tensor, keep_dtype: bool = False) -> torch.Tensor:
        raise TypeError("the transformers fallback computes its logits in forward()")

    def pack_for_cpu(self, gemm_kernel: bool = True) -> None:
        """transformers' nn.Linear layers stay as they are (no packed CPU GEMM)."""

    def use_fused_cpu_ops(self) -> None:
        """transformers' norms and activations stay as they are."""


def _paged_layers(hf: nn.Module, arch: str, device: torch.device, world: int = 1) -> list[Attention]:
    """Run two tokens through the model, recording every attention call; build each module's Attention from it.
    Several ranks: each attention call must see this rank's share of the heads."""
    text = hf.config.get_text_config()
    layers_expected = int(getattr(text, "num_hidden_layers", 0) or 0)

    def refuse(why: str) -> ValueError:
        return ValueError(f"the transformers fallback cannot serve {arch}: {why}")

    with _recording() as calls, torch.inference_mode():
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        try:
            hf(input_ids=ids, position_ids=torch.arange(2, device=device).unsqueeze(0), use_cache=False,
               logits_to_keep=1)  # fmt: skip
        except RuntimeError as e:
            if world == 1:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise refuse(f"its forward pass fails once sharded by its tensor-parallel plan: {first}") from e

    modules = {id(call[0]) for call in calls}
    if not calls or len(modules) != len(calls):
        raise refuse("its attention modules are not each called once per forward pass")
    if layers_expected and len(calls) != layers_expected:
        raise refuse(f"only {len(calls)} of its {layers_expected} layers attend (the others keep state of their own)")
    layers: list[Attention] = []
    for module, q_shape, k_shape, v_shape, mask, kwargs in calls:
        unknown = sorted(n for n, v in kwargs.items() if n not in _HANDLED and v is not None and v is not False)
        if unknown:
            raise refuse(f"its attention needs {', '.join(unknown)}, which the paged attention does not compute")
        if mask is not None:
            raise refuse("it builds an attention mask of its own")
        if kwargs.get("is_causal") is False or kwargs.get("dropout"):
            raise refuse("its attention is not causal (or uses dropout)")
        if k_shape != v_shape or q_shape[-1] != k_shape[-1]:
            raise refuse(f"its query / key / value head sizes differ ({q_shape[-1]}, {k_shape[-1]}, {v_shape[-1]})")
        heads, kv_heads, head_dim = q_shape[1], k_shape[1], k_shape[-1]
        if world > 1 and (heads, kv_heads) != _rank_heads(text, world):
            raise refuse(f"its tensor-parallel plan leaves {heads} query / {kv_heads} key/value heads on a rank, "
                         f"not {_rank_heads(text, world)}")  # fmt: skip
        scale = kwargs.get("scaling")
        layer = Attention(
            heads, kv_heads, head_dim, scale=head_dim**-0.5 if scale is None else float(scale),
            sliding_window=kwargs.get("sliding_window"), logit_softcap=kwargs.get("softcap"),
        )  # fmt: skip
        module.__dict__[_LAYER] = layer  # read by _paged_attention; not a submodule of transformers' model
        layers.append(layer)
    if len({(a.num_kv_heads, a.head_dim) for a in layers}) > 1:
        raise refuse("its layers have different key/value shapes (the KV cache holds one shape)")
    return layers


def _rank_heads(text_config, world: int) -> tuple[int, int]:
    """(query, key/value) heads one of `world` ranks attends with: key/value heads replicated when fewer."""
    kv = int(num_kv_heads_of(text_config))
    return int(text_config.num_attention_heads) // world, max(1, kv // world)
