"""Shared set-up for the HTTP tests (test_app_*.py): one tiny random llama with a chat template, one
LLMEngine behind one InProcessEngineClient for the whole session, and flask apps built over it with the workers'
tokenizer (exported as the engine process exports it); transformers' tokenizer stays as the tests' oracle.

The expensive part is memoised here (built once per session); tests/serve/conftest.py exposes it as fixtures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from serve.app import create_app
from serve.inprocess_client import InProcessEngineClient
from serve.server_config import ServerConfig
from serve.tokenizer import WorkerTokenizer
from serve.tokenizer_export import export_tokenizer
from tests.support.tiny_models import TinyModels

CHAT_TEMPLATE = (
    "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }} {% endfor %}\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_INPUT_TOKENS, MAX_TOTAL_TOKENS = 96, 128


class BufferedClient(FlaskClient):
    """Reads the whole body and closes the response (as a WSGI server does), unless buffered=False."""

    def open(self, *args: Any, buffered: bool = True, **kwargs: Any) -> Any:
        return super().open(*args, buffered=buffered, **kwargs)


@dataclass
class Served:
    path: Path
    engine: LLMEngine
    client: InProcessEngineClient
    tokenizer: PreTrainedTokenizerFast  # transformers': the oracle
    config: ServerConfig
    exported: Path  # the workers' tokenizer, as the engine process exports it

    def worker_tokenizer(self) -> WorkerTokenizer:
        """A fresh copy of the workers' tokenizer (its attributes may be changed)."""
        return WorkerTokenizer.load(str(self.exported))

    def app(self, **overrides: Any) -> Flask:
        app = create_app(self.client, self.config.replace(**overrides), self.worker_tokenizer())
        app.test_client_class = BufferedClient
        return app

    def ensure_running(self) -> None:
        """A failed step stops the engine loop, as it ends the engine process in production: the next test gets a
        new loop over the same engine."""
        if not self.client.running:
            self.client = InProcessEngineClient(self.engine, max_concurrent_requests=16, model_id="tiny-llama").start()
        deadline = time.monotonic() + 10
        while self.client.stats() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def idle(self, timeout: float = 10.0) -> bool:
        """Wait until the engine has no request and every KV block is free."""
        bm = self.engine.block_manager
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (
                self.engine.num_requests == 0
                and not self.engine.has_unfinished_requests()
                and bm.num_free_blocks == bm.num_blocks
                and self.client.num_in_flight == 0
            ):
                return True
            time.sleep(0.01)
        return False


_SERVED: list[Served] = []


def build_model(root: Path) -> Path:
    path = TinyModels(root)("llama_gqa")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    if not _SERVED:
        torch.set_num_threads(1)
        path = build_model(tmp_path_factory.mktemp("serve_model"))
        engine = LLMEngine(EngineConfig(model=str(path), dtype="float32", max_batch_total_tokens=4096, num_threads=1))
        client = InProcessEngineClient(engine, max_concurrent_requests=16, model_id="tiny-llama").start()
        config = ServerConfig.from_model_info(
            client.model_info(), max_input_tokens=MAX_INPUT_TOKENS, max_total_tokens=MAX_TOTAL_TOKENS
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        exported = tmp_path_factory.mktemp("serve_tokenizer") / "tokenizer"
        export_tokenizer(engine.tokenizer, str(exported))  # as serve.engine_process does
        _SERVED.append(Served(path, engine, client, tokenizer, config, exported))
    s = _SERVED[0]
    s.ensure_running()
    return s


CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def error(r: object, status: int, error_type: str) -> str:
    """Check an error response (status, JSON {"error", "error_type"}) and return its message."""
    assert r.status_code == status, (r.status_code, r.get_data(as_text=True))  # type: ignore[attr-defined]
    body = r.json  # type: ignore[attr-defined]
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    assert r.mimetype == "application/json"  # type: ignore[attr-defined]
    return body["error"]
