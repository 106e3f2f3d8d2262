"""Unit tests for engine.detokenizer.IncrementalDetokenizer with a real byte-level BPE tokenizer.

The tokenizer is trained offline on a tiny corpus with multi-byte characters, so single tokens
often hold only part of a UTF-8 character.
"""

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "東京 日本語 😀 ünïcode",
    "Hello world, this is a tiny corpus for a byte-level BPE tokenizer.",
    "東京は日本の首都です。日本語のテキスト 😀😀 and émojis 🎉🚀",
    "ünïcode çà et là, naïve café, Ærøskøbing, Straße",
    "def f(x):\n    return x * 2  # code too\n",
]
SPECIALS = ["<s>", "</s>", "<pad>"]
TEXTS = [
    "東京 日本語 😀 ünïcode",
    "Hello 東京! 😀🎉 naïve café",
    "unseen: 🦀 Ωμέγα ∑ 中文字符 👩‍👩‍👧",
    "plain ascii text, with  double  spaces and\nnewlines\n",
    "",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def stream(tokenizer, ids, skip_special_tokens=True, chunk=1):
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.flush())
    return pieces


def test_tokenizer_splits_characters(tokenizer):
    """Sanity check of the fixture: some single tokens decode to an incomplete character."""
    ids = tokenizer.encode("🦀 Ωμέγα 中文字符", add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("chunk", [2, 3, 7])
def test_several_ids_per_add(tokenizer, chunk):
    text = TEXTS[0] + TEXTS[1] + TEXTS[2]
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, ids, chunk=chunk)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_text_released_as_soon_as_character_completes(tokenizer):
    ids = tokenizer.encode("a🦀b", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    seen = ""
    for i in range(len(ids)):
        seen += detok.add([ids[i]])
        assert "\ufffd" not in seen
        # Whatever is complete so far has been emitted (nothing held once the character is whole).
        full = tokenizer.decode(ids[: i + 1])
        assert seen == full.rstrip("\ufffd")
    assert detok.flush() == ""


def test_special_tokens_skipped(tokenizer):
    body = tokenizer.encode("東京 😀 ok", add_special_tokens=False)
    bos, eos = tokenizer.convert_tokens_to_ids(["<s>", "</s>"])
    ids = [bos] + body[:3] + [eos] + body[3:] + [eos]
    pieces = stream(tokenizer, ids)
    joined = "".join(pieces)
    assert joined == tokenizer.decode(ids, skip_special_tokens=True) == "東京 😀 ok"
    assert "<s>" not in joined and "</s>" not in joined


def test_special_tokens_kept_when_asked(tokenizer):
    body = tokenizer.encode("日本", add_special_tokens=False)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    ids = body + [eos]
    pieces = stream(tokenizer, ids, skip_special_tokens=False)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=False)
    assert "".join(pieces).endswith("</s>")


def test_flush_releases_incomplete_character(tokenizer):
    ids = tokenizer.encode("ok 🦀", add_special_tokens=False)
    # Cut inside the last character: the partial bytes come out (as U+FFFD) only at flush.
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add([i]) for i in ids[:cut]]
    assert "\ufffd" not in "".join(pieces)
    tail = detok.flush()
    assert tail.endswith("\ufffd")
    assert "".join(pieces) + tail == tokenizer.decode(ids[:cut])


@pytest.mark.parametrize("seed", range(20))
def test_random_token_streams(tokenizer, seed):
    rng = random.Random(seed)
    text = " ".join(
        rng.choice(["東京", "日本語", "😀", "ünïcode", "café", "🎉", "x", "Hello", "中文"]) for _ in range(25)
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    specials = tokenizer.convert_tokens_to_ids(SPECIALS)
    for _ in range(3):
        ids.insert(rng.randint(0, len(ids)), rng.choice(specials))
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in p for p in pieces)
