"""Checkpoint readers yielding (transformers parameter name, tensor): safetensors (sharded or not) as unread
slices each rank narrows to its part, `.bin` through `torch.load(weights_only=True, mmap=True)`, and GGUF
dequantized with the `gguf` package (a whole tensor at a time: a rank's memory peak is not 1/N there), or, with
`gguf_native`, the Q4_0 / Q4_1 / Q8_0 matrices (linear layers, token embedding, LM head) as IntWeight, exactly
(engine/quant/gguf.py).
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator

import numpy as np
import torch

from engine.model_source import ModelFiles
from engine.quant import gguf as gguf_quant
from engine.quant.int_weight import IntWeight
from engine.weight_slice import TensorSlice, Weight

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def iter_weights(files: ModelFiles, hf_config, gguf_native: bool = False) -> Iterator[tuple[str, Weight | IntWeight]]:
    if files.gguf_file:
        yield from _iter_gguf(os.path.join(files.directory, files.gguf_file), hf_config, gguf_native)
        return
    d = files.directory
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        paths = [os.path.join(d, s) for s in shards]
    else:
        paths = sorted(glob.glob(os.path.join(d, "*.safetensors")))
    if paths:
        from safetensors import safe_open

        for path in paths:
            with safe_open(path, framework="pt") as fh:
                for name in fh.keys():
                    yield _flat_name(name), TensorSlice(fh.get_slice(name))
        return
    bins = sorted(glob.glob(os.path.join(d, "pytorch_model*.bin")))
    if not bins:
        raise ValueError(f"model directory {d!r} has no *.safetensors or pytorch_model*.bin weights")
    for path in bins:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        yield from ((_flat_name(n), t) for n, t in state.items())


def _flat_name(name: str) -> str:
    """bitsandbytes' `...q_proj.weight.absmax` / `.weight.quant_state.bitsandbytes__nf4` as one parameter name each
    (`weight_absmax`, `weight_quant_state_bitsandbytes__nf4`): module parameters cannot hold dots."""
    head, sep, tail = name.partition(".weight.")
    return f"{head}.weight_{tail.replace('.', '_')}" if sep else name


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary reordering of q/k rows (it interleaves the two halves of each head)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def gguf_types(path: str) -> dict[str, str]:
    """GGUF tensor name -> its type name (Q4_1, F32, ...)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def _iter_gguf(path: str, hf_config, native: bool = False) -> Iterator[tuple[str, torch.Tensor | IntWeight]]:
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(path)
    permuted = hf_config.model_type in ("llama", "mistral")
    heads = {"attn_q": hf_config.num_attention_heads, "attn_k": getattr(hf_config, "num_key_value_heads", None)}
    for t in reader.tensors:
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name)
        if m:
            layer, part, kind = m.groups()
            if part not in _GGUF_BLOCK_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            name = f"model.layers.{layer}.{_GGUF_BLOCK_NAMES[part]}.{kind}"
        else:
            base, _, kind = t.name.rpartition(".")
            if base not in _GGUF_NAMES:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            name, part = f"{_GGUF_NAMES[base]}.{kind}", base
        shape = list(reversed(t.shape.tolist()))
        n_head = (heads.get(part) or hf_config.num_attention_heads) if permuted and part in heads else None
        matrix = (m and "norm" not in part) or part in ("token_embd", "output")  # linear layers, embedding, LM head
        if native and matrix and kind == "weight" and t.tensor_type.name in gguf_quant.NATIVE:
            w = gguf_quant.to_int_weight(t.data, t.tensor_type.name, shape[0], shape[1])
            if n_head is not None:
                w = gguf_quant.permute_rows(w, _unpermute(np.arange(shape[0]), n_head))
            yield name, w
            continue
        w = dequantize(t.data, t.tensor_type).reshape(shape)
        if n_head is not None:
            w = _unpermute(w, n_head)
        yield name, torch.from_numpy(np.array(w, copy=True))
