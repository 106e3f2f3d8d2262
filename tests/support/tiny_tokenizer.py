"""The tests' tokenizer: byte-level BPE trained offline on a small multilingual CORPUS (no model hub), with fixed
special-token ids, a simple chat template, and the single-byte token of any byte.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
VOCAB_SIZE = 400

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
