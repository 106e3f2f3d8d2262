"""The workers' tokenizer (serve.tokenizer) against transformers' on the test models' tokenizer and other kinds:
ids with and without special tokens, offsets, decoding of texts and of every single token, the special tokens; and the
export: its probes refuse a tokenizer it would not reproduce, and then the workers keep transformers' tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from serve.engine_protocol import ModelInfo
from serve.ipc import Addresses, WorkerConfig
from serve.server_config import ServerConfig
from serve.tokenizer import FACTS_FILE, TokenizerFacts, WorkerTokenizer
from serve.tokenizer_export import ExportError, export_for_workers, export_tokenizer, verify
from serve.wsgi import load_tokenizer
from tests.serve.tokenizer_support import BUILDERS, TEXTS, Pair, exported

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token", "mask_token")


@pytest.fixture(scope="module", params=list(BUILDERS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return exported(request.param, tmp_path_factory.mktemp(request.param))


def test_ids_offsets_and_masks_match_transformers(pair: Pair) -> None:
    for text in TEXTS + pair.special_texts():
        for add in (True, False):
            want = pair.oracle(text, add_special_tokens=add, return_offsets_mapping=True)
            got = pair.worker(text, add_special_tokens=add, return_offsets_mapping=True)
            assert got["input_ids"] == want["input_ids"], (text, add)
            assert got["offset_mapping"] == [tuple(o) for o in want["offset_mapping"]], (text, add)
            assert got["attention_mask"] == want["attention_mask"]
    batch = TEXTS + pair.special_texts()
    assert pair.worker(batch)["input_ids"] == pair.oracle(batch)["input_ids"]


def test_texts_decode_as_transformers_decodes_them(pair: Pair) -> None:
    for text in TEXTS + pair.special_texts():
        ids = pair.oracle(text)["input_ids"]
        for skip in (False, True):
            for clean in (None, True, False):
                kwargs = dict(skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
                assert pair.worker.decode(ids, **kwargs) == pair.oracle.decode(ids, **kwargs), (text, kwargs)


def test_every_single_token_decodes_as_in_transformers(pair: Pair) -> None:
    """What TokenDecoder shows for top tokens and logprobs: one id at a time, special tokens kept."""
    assert len(pair.worker) == len(pair.oracle)
    for i in range(len(pair.worker)):
        assert pair.worker.decode([i], skip_special_tokens=False) == pair.oracle.decode([i], skip_special_tokens=False)
    assert pair.worker.decode(5) == pair.oracle.decode(5)


def test_special_tokens_match_transformers(pair: Pair) -> None:
    w, o = pair.worker, pair.oracle
    assert w.all_special_ids == o.all_special_ids and w.all_special_tokens == o.all_special_tokens
    assert w.special_tokens_map == o.special_tokens_map
    for name in SPECIAL_NAMES:
        assert getattr(w, name) == getattr(o, name), name
        assert getattr(w, f"{name}_id") == getattr(o, f"{name}_id"), name
    assert w.convert_tokens_to_ids(o.all_special_tokens) == o.convert_tokens_to_ids(o.all_special_tokens)
    with pytest.raises(AttributeError):
        _ = w.no_such_attribute


def test_non_text_input_is_refused_like_transformers(pair: Pair) -> None:
    for bad in (None, 3, [1, 2]):
        with pytest.raises(ValueError):
            pair.oracle(bad)
        with pytest.raises(ValueError):
            pair.worker(bad)


# ---- the export ----------------------------------------------------------------------------------------------------


def tampered(pair: Pair, **changes: object) -> WorkerTokenizer:
    return WorkerTokenizer(pair.worker.backend, dataclasses.replace(pair.worker.facts, **changes))


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("wordpiece", {"clean_up_tokenization_spaces": False}),  # "I can't ," decodes differently
        ("byte_bpe", {"split_special_tokens": True}),  # "<s>" in a text encodes as bytes
        ("metaspace", {"all_special_ids": [0, 1]}),  # <|im_end|> is the EOS
        ("byte_bpe", {"chat_template": "{{ messages[0]['content'] }}"}),
    ],
)
def test_the_probes_refuse_an_export_that_would_differ(name: str, changes: dict, tmp_path: Path) -> None:
    pair = exported(name, tmp_path, chat_template="{{ bos_token }}{{ messages[0]['content'] }}")
    verify(pair.oracle, pair.worker)  # the faithful export passes
    with pytest.raises(ExportError):
        verify(pair.oracle, tampered(pair, **changes))


def test_an_unexportable_tokenizer_leaves_the_workers_on_transformers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Opaque:  # no `tokenizers` backend, and no converter for its class
        pass

    target = tmp_path / "tokenizer"
    with caplog.at_level(logging.WARNING, logger="serve.tokenizer_export"):
        assert export_for_workers(Opaque(), str(target)) is None
    assert "load the tokenizer with transformers" in caplog.text and "Opaque" in caplog.text
    assert not target.exists()
    assert export_for_workers(Opaque(), "") is None  # nowhere to export (the in-process transport)


class Skewed:
    """A tokenizer whose Python layer adds to what its backend decodes (as some remote-code tokenizers do)."""

    def __init__(self, inner: PreTrainedTokenizerBase) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        return self.inner(*args, **kwargs)

    def decode(self, ids: list[int], **kwargs: object) -> str:
        return self.inner.decode(ids, **kwargs).replace("e", "E")


def test_an_export_that_fails_its_probes_leaves_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pair = exported("byte_bpe", tmp_path)
    with pytest.raises(ExportError, match="decodes"):
        export_tokenizer(Skewed(pair.oracle), str(tmp_path / "again"))
    assert not (tmp_path / "again").exists()
    with caplog.at_level(logging.WARNING, logger="serve.tokenizer_export"):
        assert export_for_workers(Skewed(pair.oracle), str(tmp_path / "again")) is None
    assert "decodes" in caplog.text and not (tmp_path / "again").exists()


def test_an_export_of_another_format_is_refused(pair: Pair, tmp_path: Path) -> None:
    target = tmp_path / "old"
    export_tokenizer(pair.oracle, str(target))
    facts = (target / FACTS_FILE).read_text().replace('"format": 1', '"format": 0')
    (target / FACTS_FILE).write_text(facts)
    with pytest.raises(ValueError, match="format"):
        TokenizerFacts.read(str(target))


def worker_config(runtime: Path, model_dir: Path, exported_dir: str | None) -> WorkerConfig:
    info = ModelInfo("m", "float32", "cpu", 10, 20, 100, 100, 2)
    server = ServerConfig("m", 10, 20)
    return WorkerConfig(Addresses.in_dir(str(runtime)), server, info, str(model_dir), None, False, "info", exported_dir)


def test_the_worker_loads_the_export_else_transformers(pair: Pair, tmp_path: Path) -> None:
    model_dir = Path(pair.oracle.name_or_path)
    exported_dir = os.path.join(tmp_path, "tokenizer")
    assert export_for_workers(pair.oracle, exported_dir) == exported_dir
    worker = load_tokenizer(worker_config(tmp_path, model_dir, exported_dir))
    assert isinstance(worker, WorkerTokenizer) and worker.name_or_path == str(model_dir)
    fallback = load_tokenizer(worker_config(tmp_path, model_dir, None))  # what a worker does when no export exists
    assert isinstance(fallback, PreTrainedTokenizerBase)
    assert worker(TEXTS[1])["input_ids"] == fallback(TEXTS[1])["input_ids"]
