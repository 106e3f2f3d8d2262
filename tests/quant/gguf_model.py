"""A tiny Llama written as a GGUF file offline: random weights in Q4_0 / Q4_1 / Q8_0 (each type on some layer), the
embedded default model's tokenizer cut to 1024 tokens, and an LM head tied to token_embd or untied, quantized.
Small enough to serve over two tensor-parallel ranks, unlike SmolLM2 (9 heads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quantize

from engine.default_model import default_model_path

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 1024
HEAD_DIM = HIDDEN // HEADS
Q = GGMLQuantizationType
# per layer: the type of its attention and MLP matrices (every native type appears)
LAYER_TYPES = [(Q.Q4_0, Q.Q8_0), (Q.Q4_1, Q.Q4_0)]


def _tokenizer_fields(vocab: int) -> list[tuple[str, object, list]]:
    """The default model's tokenizer cut to its first `vocab` tokens (ids keep their meaning): the merges that make
    only kept tokens stay, so it is still a byte-level BPE, quick to load."""
    reader = GGUFReader(default_model_path())
    fields = {f.name: (f.contents(), f.types) for f in reader.fields.values() if f.name.startswith("tokenizer.")}
    tokens = fields["tokenizer.ggml.tokens"][0][:vocab]
    kept = set(tokens)
    pairs = (m.split(" ", 1) for m in fields["tokenizer.ggml.merges"][0])
    merges = [f"{a} {b}" for a, b in pairs if a in kept and b in kept and a + b in kept]
    fields["tokenizer.ggml.tokens"] = (tokens, fields["tokenizer.ggml.tokens"][1])
    fields["tokenizer.ggml.token_type"] = (
        fields["tokenizer.ggml.token_type"][0][:vocab],
        fields["tokenizer.ggml.token_type"][1],
    )
    fields["tokenizer.ggml.merges"] = (merges, fields["tokenizer.ggml.merges"][1])
    return [(name, value, types) for name, (value, types) in fields.items()]


def write_tiny_gguf(
    path: Path, head: GGMLQuantizationType | None, embd: GGMLQuantizationType = Q.Q8_0, seed: int = 0
) -> Path:
    """Write the model to `path` (a .gguf file); `head`: the untied output.weight's type, None for a head tied to
    token_embd (of type `embd`)."""
    rng = np.random.default_rng(seed)
    fields = _tokenizer_fields(VOCAB)

    def matrix(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(2048)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(HEAD_DIM)
    for name, value, types in fields:
        w.add_key_value(name, value, types[0], types[1] if len(types) > 1 else None)

    def add(name: str, data: np.ndarray, qtype: GGMLQuantizationType | None = None) -> None:
        if qtype is None:
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    add("token_embd.weight", matrix(VOCAB, HIDDEN, 1.0), embd)
    add("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    if head is not None:
        add("output.weight", matrix(VOCAB, HIDDEN, HIDDEN**-0.5), head)
    kv = KV_HEADS * HEAD_DIM
    for i, (attn, mlp) in enumerate(LAYER_TYPES):
        p, s_h, s_i = f"blk.{i}.", HIDDEN**-0.5, INTER**-0.5
        add(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        add(p + "attn_q.weight", matrix(HIDDEN, HIDDEN, s_h), attn)
        add(p + "attn_k.weight", matrix(kv, HIDDEN, s_h), attn)
        add(p + "attn_v.weight", matrix(kv, HIDDEN, s_h), attn)
        add(p + "attn_output.weight", matrix(HIDDEN, HIDDEN, s_h), attn)
        add(p + "ffn_gate.weight", matrix(INTER, HIDDEN, s_h), mlp)
        add(p + "ffn_up.weight", matrix(INTER, HIDDEN, s_h), mlp)
        add(p + "ffn_down.weight", matrix(HIDDEN, INTER, s_i), mlp)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
