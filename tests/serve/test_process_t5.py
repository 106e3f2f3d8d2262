"""An encoder-decoder (tiny Flan-T5) served by a real `serve`: TGI's /generate and OpenAI's /v1/completions take
the encoder's text and return transformers' greedy tokens; the chat route answers 422 (no chat template).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, GenerationConfig

from tests.support.family_models import FAMILY_SPECS
from tests.support.serve_process import running_serve
from tests.support.tiny_tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer

pytestmark = pytest.mark.integration
TEXTS = ["Paris is the capital of", "héllo wörld 東京 😀"]
NEW = 12


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("flan_t5")
    tokenizer = train_tokenizer()
    tokenizer.chat_template = None  # like Flan-T5's
    spec = FAMILY_SPECS["flan_t5"]
    spec.build(len(tokenizer)).save_pretrained(path, safe_serialization=True)
    spec.written(path)
    tokenizer.save_pretrained(path)
    GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, decoder_start_token_id=PAD_ID
    ).save_pretrained(path)
    return path


def _reference(path: Path, text: str) -> str:
    tokenizer = train_tokenizer()
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(text)["input_ids"]
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW, eos_token_id=EOS_ID,
                         pad_token_id=PAD_ID)  # fmt: skip
    return tokenizer.decode(out[0, 1:], skip_special_tokens=True)


def test_t5_through_the_tgi_and_openai_routes(t5_dir: Path, tmp_path: Path) -> None:
    expected = [_reference(t5_dir, t) for t in TEXTS]
    assert any(expected), "the tiny model generates nothing but special tokens"
    with running_serve(t5_dir, tmp_path) as s:
        for text, want in zip(TEXTS, expected):
            status, body = s.post("/generate", {"inputs": text, "parameters": {"max_new_tokens": NEW}})
            assert status == 200, body
            assert json.loads(body)["generated_text"] == want
            status, body = s.post("/v1/completions", {"prompt": text, "max_tokens": NEW, "temperature": 0})
            assert status == 200, body
            assert json.loads(body)["choices"][0]["text"] == want
        status, body = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 422, body
        assert "template" in json.loads(body)["error"].lower()
