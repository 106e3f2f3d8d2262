"""Helpers for the local-mode runner tests: `python -m local_mode.run` as a real subprocess, the small limits the
tiny model is served with, and the reference answers engine.LLM gives in-process for the same requests.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from local_mode.server import SAMPLE_PAYLOAD
from tests.support.serve_process import ROOT

PROMPT = "The quick brown fox"
N = 12
TGI_PAYLOAD = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": N, "do_sample": False}})
CHAT = SAMPLE_PAYLOAD["messages"]  # the runner's default payload: greedy chat
CHAT_MAX_TOKENS = SAMPLE_PAYLOAD["max_tokens"]
# what running_serve uses: float32 (token-exact with the in-process engine), one worker, small KV cache
SMALL = {"DTYPE": "float32", "MAX_TOTAL_TOKENS": "256", "MAX_BATCH_TOTAL_TOKENS": "4096",
         "MAX_CONCURRENT_REQUESTS": "8", "SERVE_WORKERS": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip


def env_args(env: dict[str, str]) -> list[str]:
    return [arg for name, value in env.items() for arg in ("-e", f"{name}={value}")]


@dataclass
class Report:
    """What the runner printed, split into its parts."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def answer(self) -> str | None:
        found = re.search(r"^answer: (.*)$", self.stdout, re.MULTILINE)
        return None if found is None else ast.literal_eval(found.group(1))  # the runner prints repr(text)

    @property
    def body(self) -> object:
        """The JSON the container answered (printed indented between the status line and the answer)."""
        start = self.stdout.index("\n", self.stdout.index("POST /invocations:")) + 1
        end = self.stdout.index("\nanswer: ")
        return json.loads(self.stdout[start:end])

    def explain(self) -> str:
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr (last 4000)\n{self.stderr[-4000:]}"


def run_runner(args: list[str], env: dict[str, str], timeout: float = 300) -> Report:
    done = subprocess.run(
        [sys.executable, "-m", "local_mode.run", *args], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return Report(done.returncode, done.stdout, done.stderr)


def reference_llm(model_dir: Path) -> LLM:
    torch.set_num_threads(1)
    return LLM(str(model_dir), dtype="float32", max_batch_total_tokens=4096)


def tgi_reference(llm: LLM) -> str:
    return llm.generate(PROMPT, SamplingParams(max_new_tokens=N, do_sample=False))[0].text


def chat_reference(llm: LLM) -> str:
    return llm.chat(CHAT, SamplingParams(max_new_tokens=CHAT_MAX_TOKENS, do_sample=False))[0].text
