"""Tokenizers for the worker-tokenizer tests: the test models' byte-level BPE, a WordPiece (BERT-like: the decode
clean-up applies), a Metaspace BPE with added tokens (Llama-like) and one that splits special tokens; each saved and
reloaded with AutoTokenizer as the engine loads it (the oracle), then exported as the engine exports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from serve.tokenizer import WorkerTokenizer
from serve.tokenizer_export import export_tokenizer
from tests.support.tiny_tokenizer import CORPUS, train_tokenizer

TEXTS = [
    *CORPUS,
    "",
    " ",
    "  two leading spaces, trailing ones  \n\n\ttabs\r\nand CRLF",
    "I can't , he's here . we're ... you'll see ? they've gone ! 'quoted' ",
    "ＡＢＣ ﬁ ½ Å (compatibility forms) e\u0301 (a combining accent) \u200b(zero width)",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 👩‍👩‍👧‍👦 🏳️‍🌈 \U0010ffff",
]


@dataclass(frozen=True)
class Pair:
    oracle: PreTrainedTokenizerBase  # transformers', as the engine loads it
    worker: WorkerTokenizer  # the engine's export, as a worker loads it

    def special_texts(self) -> list[str]:
        """Texts that hold the special (and added) tokens amid words."""
        added = [t for t in self.oracle.get_added_vocab() if not t.startswith("<0x")]  # not the 256 byte tokens
        tokens = [*self.oracle.all_special_tokens, *added]
        return [" ".join(tokens), "x".join(tokens) + "y", f"Hi{tokens[0]}there {tokens[-1]} end"]


def _wordpiece() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)  # the clean-up is left to transformers
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS * 4, trainers.WordPieceTrainer(vocab_size=500, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", clean_up_tokenization_spaces=True,
    )  # fmt: skip


def _metaspace(split_special_tokens: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *bytes_])
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken(" lstrip", lstrip=True, special=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>",
        split_special_tokens=split_special_tokens, clean_up_tokenization_spaces=False,
    )  # fmt: skip


BUILDERS = {
    "byte_bpe": train_tokenizer,
    "wordpiece": _wordpiece,
    "metaspace": _metaspace,
    "metaspace_split_specials": lambda: _metaspace(split_special_tokens=True),
}


def exported(name: str, root: Path, chat_template: str | dict[str, str] | None = None) -> Pair:
    """BUILDERS[name] (with `chat_template`, if given) saved to root/name, reloaded and exported to root/name-export."""
    built = BUILDERS[name]()
    if chat_template is not None:
        built.chat_template = chat_template
    built.save_pretrained(root / name)
    oracle = AutoTokenizer.from_pretrained(root / name)
    return Pair(oracle, export_tokenizer(oracle, str(root / f"{name}-export")))
