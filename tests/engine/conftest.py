"""Fixtures for the engine tests: tiny random checkpoints written with transformers, a trained tokenizer,
the transformers reference (`Oracle`) and cached engines.

Everything is built offline under pytest's session tmp dir; weights come from a seeded torch RNG.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from engine import LLM, RequestOutput, SamplingParams

from .family_models import FAMILY_SPECS, ROPE_SPECS, FamilySpec

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
VOCAB_SIZE = 400
MAX_POSITIONS = 512

CORPUS = [
    "The quick brown fox jumps over the lazy dog. A tiny model writes one token at a time, and the "
    "engine batches many requests together so that every step keeps the machine busy.",
    "héllo wörld ünïcode! Café, naïve, résumé, façade, jalapeño, Ångström, Straße, smörgåsbord.",
    "東京 日本語 中文 한국어 Ελληνικά русский язык العربية עברית हिन्दी ภาษาไทย",
    "Emoji too: 😀 😃 🎉 🚀 🌍 ❤️ 👍 — and symbols like €, £, ¥, ©, ®, ±, ×, ÷, ∞, √, ≤, ≥.",
    "Paris is the capital of France. Berlin is the capital of Germany. 東京 is the capital of 日本.",
    "def generate(prompt, max_new_tokens=32):\n    return model(prompt)[:max_new_tokens]\n",
    "Once upon a time there was a little language model that lived in a paged key-value cache.",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def train_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on CORPUS, with <s> prepended when encoding text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, BOS_ID)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    assert hf.convert_tokens_to_ids([BOS, EOS, PAD]) == [BOS_ID, EOS_ID, PAD_ID]
    return hf


def byte_token_id(tokenizer: PreTrainedTokenizerFast, byte: int) -> int:
    """The id of the single-byte token for `byte` (every byte-level BPE vocab has all 256)."""
    token_id = tokenizer.convert_tokens_to_ids(bytes_to_unicode()[byte])
    assert isinstance(token_id, int) and token_id >= 3, byte
    return token_id


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
ORACLE_CONFIGS = ("llama_gqa", "qwen2", "llama_tied")


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread() -> Iterator[None]:
    """One intra-op thread: these models are tiny, and on a small shared CPU OpenMP threads waiting on each
    other (or on a busy neighbour process) make every matmul orders of magnitude slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def tokenizer(tiny_models: TinyModels) -> PreTrainedTokenizerFast:
    return tiny_models.tokenizer


class Oracle:
    """transformers as the reference: one prompt at a time, no padding, float32. For encoder-decoder models the
    prompt is the encoder's input and the decoder starts from the config's start token."""

    def __init__(self, tiny_models: TinyModels) -> None:
        self.tiny_models = tiny_models
        self._models: dict[str, PreTrainedModel] = {}
        self._cache: dict[tuple, list[int]] = {}

    def model(self, name: str) -> PreTrainedModel:
        if name not in self._models:
            path = self.tiny_models(name)
            spec = SPECS.get(name)
            auto = AutoModelForSeq2SeqLM if getattr(spec, "seq2seq", False) else AutoModelForCausalLM
            self._models[name] = auto.from_pretrained(path, dtype=torch.float32).eval()
        return self._models[name]

    def _seq2seq(self, name: str) -> bool:
        return bool(self.model(name).config.is_encoder_decoder)

    def greedy(
        self, name: str, prompt: list[int], max_new_tokens: int, eos_token_id: int | list[int] | None = EOS_ID, **kw
    ) -> list[int]:
        """transformers `generate` (greedy), generated ids only, EOS included if it stopped on it."""
        key = (name, tuple(prompt), max_new_tokens, str(eos_token_id), tuple(sorted(kw.items())))
        if key not in self._cache:
            out = self.model(name).generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_token_id,
                pad_token_id=PAD_ID,
                **kw,
            )
            start = 1 if self._seq2seq(name) else len(prompt)  # seq2seq: the decoder's, after its start token
            self._cache[key] = out[0, start:].tolist()
        return self._cache[key]

    @torch.no_grad()
    def logits(self, name: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), V] raw logits that predicted each generated token (one forward pass)."""
        model = self.model(name)
        if self._seq2seq(name):
            decoder = [model.generation_config.decoder_start_token_id] + generated[:-1]
            return model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder])).logits[0].float()
        ids = torch.tensor([prompt + generated])
        logits = model(ids).logits[0].float()
        return logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]

    def log_probs(self, name: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
        """[len(generated), V] log-softmax of the logits that predicted each generated token."""
        return torch.log_softmax(self.logits(name, prompt, generated), dim=-1)


@pytest.fixture(scope="session")
def oracle(tiny_models: TinyModels) -> Oracle:
    return Oracle(tiny_models)


class Engines:
    """One LLM per (model name, engine config), built on first use and shared by the whole session."""

    def __init__(self, tiny_models: TinyModels) -> None:
        self.tiny_models = tiny_models
        self._llms: dict[tuple, LLM] = {}

    def __call__(self, name: str, **config) -> LLM:
        config = {"dtype": "float32", "max_batch_total_tokens": 16384, **config}
        key = (name, tuple(sorted(config.items())))
        if key not in self._llms:
            self._llms[key] = LLM(str(self.tiny_models(name)), **config)
        llm = self._llms[key]
        assert not llm.engine.has_unfinished_requests(), "an earlier test left requests in flight"
        return llm


@pytest.fixture(scope="session")
def engines(tiny_models: TinyModels) -> Engines:
    return Engines(tiny_models)


def random_prompt(length: int, seed: int, vocab_size: int = VOCAB_SIZE) -> list[int]:
    """Token ids drawn from the ordinary (non-special) part of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (length,), generator=g).tolist()


def run_to_completion(llm: LLM, max_steps: int = 10_000) -> Iterator[RequestOutput]:
    """Step the engine until nothing is left, yielding every output."""
    for _ in range(max_steps):
        if not llm.engine.has_unfinished_requests():
            return
        yield from llm.engine.step()
    raise AssertionError(f"engine still busy after {max_steps} steps")


def greedy(max_new_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, **kw)
