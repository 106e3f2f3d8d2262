"""The LM head of a GGUF-native build served from the file's own Q8_0 / Q4_0 / Q4_1 codes: logits on the CPU int
kernel against the float32 reference (gguf.dequantize, then a float32 matmul), vocabulary-parallel ranks (padded
rows included) against one rank, tied and untied heads loaded through a Llama model's `load_weights`, and a build
for another device (meta standing in for CUDA) holding every tensor there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize
from transformers import LlamaConfig

from engine.device import default_dtype
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.models import get_model_class
from engine.parallel import SINGLE_RANK, ParallelState, building_with
from engine.quant import cpu_kernel
from engine.quant import gguf as gguf_quant
from engine.quant.config import QuantConfig
from engine.quant.int_weight import IntWeight
from engine.quant.layer import QuantBuild, building_quantized, finish

GGUF = QuantConfig("gguf", 4, 32, pre_quantized=True)
VOCAB, HIDDEN = 101, 64  # 101 rows: two ranks get 51 each, the second one padded
# |kernel - float32 reference| / max |reference|: the kernel reads bf16 activations and writes bf16 logits
REL_TOL = 2e-2

needs_kernel = pytest.mark.skipif(not cpu_kernel.available(), reason="no C compiler for the int kernel")


def _gguf(type_name: str, n: int = VOCAB, k: int = HIDDEN, seed: int = 0) -> tuple[IntWeight, torch.Tensor]:
    """(the IntWeight the loader yields, gguf.dequantize's float32 [n, k]) of a random matrix quantized by gguf."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    data = quantize(w, qtype)
    ref = torch.from_numpy(dequantize(data, qtype).reshape(n, k).copy())
    return gguf_quant.to_int_weight(data, type_name, n, k), ref


def _head(kernel: str, state: ParallelState = SINGLE_RANK, device: str = "cpu") -> ParallelLMHead:
    build = QuantBuild(GGUF, kernel, torch.device(device), torch.bfloat16)
    with default_dtype(torch.bfloat16), torch.device(device), building_with(state), building_quantized(build):
        return ParallelLMHead(VOCAB, HIDDEN)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < REL_TOL, err


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_head_matches_the_float32_reference(type_name: str) -> None:
    iw, ref = _gguf(type_name)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1)).bfloat16()
    want = x.float() @ ref.T
    for kernel in ("cpu_kernel", "twin"):
        head = _head(kernel)
        assert head.load_quantized(iw, tied=False)
        assert head.qmatmul is not None and head.weight.numel() == 0
        assert torch.equal(head.qmatmul.dequantize()[:VOCAB], ref)  # the file's weights, bit for bit
        got = head(x)
        assert got.shape == (5, VOCAB) and got.dtype == torch.bfloat16
        _close(got, want)
    head.pack_for_cpu(keep_plain=False)  # a no-op for a quantized head
    assert head.packed is None


@needs_kernel
def test_two_vocab_ranks_give_one_ranks_logits() -> None:
    iw, _ = _gguf("Q8_0")
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(2)).bfloat16()
    whole = _head("cpu_kernel")
    whole.load_quantized(iw, tied=False)
    parts = []
    for rank in range(2):
        head = _head("cpu_kernel", ParallelState(rank, 2))
        assert head.load_quantized(iw, tied=False)
        assert head.qmatmul.n == 51
        parts.append(head.local_logits(x))
    assert torch.equal(parts[1][:, -1], torch.zeros(3, dtype=torch.bfloat16))  # the padded row
    assert torch.equal(torch.cat(parts, dim=-1)[:, :VOCAB], whole(x))


def _llama(tied: bool, kernel: str) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)  # fmt: skip
    build = QuantBuild(GGUF, kernel, torch.device("cpu"), torch.bfloat16)
    with default_dtype(torch.bfloat16), building_with(SINGLE_RANK), building_quantized(build):
        return get_model_class(cfg)(cfg, max_position=64)


def _stream(model: torch.nn.Module, matrices: dict[str, IntWeight]):
    """Every checkpoint tensor of `model`: random plain ones, except `matrices` (as GGUF-native loading yields)."""
    g = torch.Generator().manual_seed(3)
    shapes = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
        "model.layers.0.input_layernorm.weight": (HIDDEN,), "model.layers.0.post_attention_layernorm.weight": (HIDDEN,),
        "model.layers.0.self_attn.q_proj.weight": (HIDDEN, HIDDEN), "model.layers.0.self_attn.k_proj.weight": (32, 64),
        "model.layers.0.self_attn.v_proj.weight": (32, 64), "model.layers.0.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        "model.layers.0.mlp.gate_proj.weight": (96, HIDDEN), "model.layers.0.mlp.up_proj.weight": (96, HIDDEN),
        "model.layers.0.mlp.down_proj.weight": (HIDDEN, 96),
    }  # fmt: skip
    if not model.tie_word_embeddings:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for name, shape in shapes.items():
        yield name, matrices.get(name, torch.randn(shape, generator=g) * 0.1)


@needs_kernel
@pytest.mark.parametrize(("tied", "type_name"), [(True, "Q8_0"), (True, "Q4_0"), (True, "Q4_1"), (False, "Q4_1")])
def test_a_gguf_native_llama_serves_its_head_quantized(tied: bool, type_name: str) -> None:
    """Tied: token_embd's codes serve the head and the embedding looks its rows up in them (int8 or int4 panels,
    offsets and zero points; no 16-bit table kept). Untied: output's codes serve the head."""
    iw, ref = _gguf(type_name, seed=4)
    model = _llama(tied, "cpu_kernel")
    model.load_weights(_stream(model, {"model.embed_tokens.weight" if tied else "lm_head.weight": iw}))
    finish(model)
    head, embedding = model.lm_head, model.model.embed_tokens
    assert head.qmatmul is not None and head.qmatmul.bits == iw.bits
    assert torch.equal(head.qmatmul.dequantize(), ref)
    if tied:
        assert head.weight is embedding.weight
        assert embedding.weight.numel() == 0 and embedding.codes is head.qmatmul.packed  # no 16-bit table kept
        ids = torch.tensor([[0, 7, 100], [3, 3, 50]])
        assert torch.equal(embedding(ids), ref.bfloat16()[ids])  # today's bf16 table, bit for bit
    else:
        assert head.weight.numel() == 0
    model.pack_for_cpu()
    assert head.packed is None
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(6)).bfloat16()
    _close(model.compute_logits(x), x.float() @ ref.T)


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_a_tied_embedding_gathers_its_rows_on_two_ranks(type_name: str) -> None:
    """Each rank's embedding looks its ids up in its own slice of the head's codes."""
    iw, ref = _gguf(type_name)
    ids = torch.tensor([0, 50, 51, 100])
    for rank in range(2):
        head = _head("cpu_kernel", ParallelState(rank, 2))
        assert head.load_quantized(iw, tied=True)
        with torch.device("cpu"), building_with(ParallelState(rank, 2)):
            emb = VocabParallelEmbedding(VOCAB, HIDDEN).bfloat16()
        emb.weight = head.weight  # tied
        assert emb.share_codes(head)
        local = ids[(ids >= 51 * rank) & (ids < 51 * (rank + 1))] - 51 * rank
        assert torch.equal(emb._lookup(local), ref.bfloat16()[local + 51 * rank])


class _NoReduce:
    """The group's all-reduce left to the test: each rank's forward returns its own part."""

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        return y


@needs_kernel
@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_1"])
def test_two_ranks_embed_every_id_from_the_codes(type_name: str) -> None:
    """forward on each rank (ids outside its slice masked to zero rows) summed over the ranks, as the all-reduce
    does: every id, the last rank's last real row included, is its dequantized row."""
    iw, ref = _gguf(type_name)
    ids = torch.arange(VOCAB).flip(0).reshape(-1, 1)  # [VOCAB, 1]: any leading shape
    total = torch.zeros(VOCAB, 1, HIDDEN, dtype=torch.bfloat16)
    for rank in range(2):
        head = _head("cpu_kernel", ParallelState(rank, 2))
        assert head.load_quantized(iw, tied=True)
        with torch.device("cpu"), building_with(ParallelState(rank, 2)):
            emb = VocabParallelEmbedding(VOCAB, HIDDEN).bfloat16()
        emb.weight = head.weight
        assert emb.share_codes(head)
        emb.tp = _NoReduce()  # type: ignore[assignment]
        total += emb(ids)
    assert torch.equal(total, ref.bfloat16()[ids])


def test_a_quantized_head_for_another_device_holds_nothing_on_the_cpu() -> None:
    iw, _ = _gguf("Q8_0")
    head = _head("triton", device="meta")
    assert head.load_quantized(iw, tied=False)
    tensors = [head.qmatmul.codes, head.qmatmul.scales, head.weight] + list(head.parameters())
    assert all(t.device.type == "meta" for t in tensors)


def test_a_tied_int8_head_steps_on_another_device_without_a_cpu_tensor() -> None:
    """Built for meta (standing in for CUDA), the embedding's gather and the head's matmul (its twin: meta runs no
    kernel) take no CPU tensor per call (tests/unit/test_meta_step.py's NoDeviceMix)."""
    from tests.unit.test_meta_step import NoDeviceMix

    iw, _ = _gguf("Q8_0")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    meta = torch.device("meta")
    build = QuantBuild(GGUF, "twin", meta, torch.bfloat16)
    with default_dtype(torch.bfloat16), meta, building_with(SINGLE_RANK), building_quantized(build):
        model = get_model_class(cfg)(cfg, max_position=64)
    model.load_weights(_stream(model, {"model.embed_tokens.weight": iw}))
    finish(model)
    assert model.model.embed_tokens.codes is not None
    with NoDeviceMix():
        hidden = model.model.embed_tokens(torch.tensor([1, 2, 3], device=meta))
        logits = model.compute_logits(hidden)
    assert hidden.shape == (3, HIDDEN) and hidden.dtype == torch.bfloat16 and logits.shape == (3, VOCAB)
