"""An HTTP worker never imports torch or transformers: serve.wsgi.build_app over an exported tokenizer, in a fresh
interpreter, then a /tokenize and a chat prompt through the app (what loads lazily is loaded by then).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from serve.engine_protocol import ModelInfo
from serve.ipc import Addresses, WorkerConfig
from serve.server_config import ServerConfig
from tests.serve.tokenizer_support import exported
from tests.support.served_app import CHAT_TEMPLATE

ROOT = Path(__file__).resolve().parents[2]
WORKER = """
import json, sys
from serve.openai_protocol import ChatRequest
from serve.wsgi import build_app

app = build_app(sys.argv[1])
services = app.extensions["serve"]
client = app.test_client()
tokens = client.post("/tokenize", json={"inputs": "héllo 東京"}).get_json()
prompt = services.validator.chat_prompt(ChatRequest(messages=[{"role": "user", "content": "Hi"}]))
services.client.close()
print(json.dumps({"loaded": [m for m in ("torch", "transformers") if m in sys.modules], "tokens": tokens,
                  "prompt": prompt, "tokenizer": type(services.validator.tokenizer).__name__}))
"""


def test_a_worker_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    pair = exported("byte_bpe", tmp_path, chat_template=CHAT_TEMPLATE)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    info = ModelInfo("m", "float32", "cpu", 10, 20, 100, 100, 2)
    config = WorkerConfig(
        Addresses.in_dir(str(runtime)), ServerConfig("m", 10, 20), info, str(tmp_path / "byte_bpe"), None, False,
        "warning", str(tmp_path / "byte_bpe-export"),
    )  # fmt: skip
    config.write(str(runtime / "worker.pkl"))
    run = subprocess.run(
        [sys.executable, "-c", WORKER, str(runtime / "worker.pkl")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["loaded"] == [] and out["tokenizer"] == "WorkerTokenizer"
    assert [t["id"] for t in out["tokens"]] == pair.oracle("héllo 東京")["input_ids"]
    messages = [{"role": "user", "content": "Hi"}]
    assert out["prompt"] == pair.oracle.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert any(p.name.startswith("booted-") for p in runtime.iterdir())  # the app was built to the end
