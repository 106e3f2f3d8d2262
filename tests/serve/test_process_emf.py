"""The real `serve` (two gunicorn workers) writes CloudWatch EMF lines to stdout every interval: each line valid
against the spec, dimensions from the environment, and over the whole run (the last line comes after the SIGTERM
drain) the counts add up to what the access log says the server did, each request counted once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.serve.emf_spec import validate_line
from tests.support.serve_process import running_serve
from tests.support.served_app import build_model

pytestmark = pytest.mark.integration

N = 8
PROMPTS = ["The quick brown fox", "Paris is", "Once upon a time", "héllo"]


def _emf_lines(log: str) -> list[dict]:
    return [validate_line(line) for line in log.splitlines() if line.startswith('{"_aws"')]


def _access_lines(log: str) -> list[dict]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"id"')]
    return [line for line in lines if line["route"] in ("/invocations", "/generate_stream")]


def test_emf_lines_count_every_request_once(tmp_path: Path) -> None:
    env = dict(
        SERVE_WORKERS="2", CLOUDWATCH_METRICS_INTERVAL="1", CLOUDWATCH_ENDPOINT_NAME="tiny-ep",
        CLOUDWATCH_NAMESPACE="Test/LLM", CLOUDWATCH_VARIANT_NAME="blue",
    )  # fmt: skip
    with running_serve(build_model(tmp_path / "model"), tmp_path, **env) as s:
        for prompt in PROMPTS:
            status, _ = s.post("/invocations", {"inputs": prompt, "parameters": {"max_new_tokens": N}})
            assert status == 200
        status, body = s.post("/generate_stream", {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": N}})
        assert status == 200 and body.count(b"data:") >= 1
        status, _ = s.post("/invocations", {"inputs": "x", "parameters": {"max_new_tokens": 0}})
        assert status == 422
        deadline = time.monotonic() + 20
        while len(_emf_lines(s.log())) < 2 and time.monotonic() < deadline:  # periodic lines, before any SIGTERM
            time.sleep(0.2)
        assert len(_emf_lines(s.log())) >= 2, s.log()
    log = s.log()
    docs = _emf_lines(log)
    access = _access_lines(log)
    ok = [a for a in access if a["status"] == 200]
    assert len(ok) == 5 and len(access) == 6

    stamps = [d["_aws"]["Timestamp"] for d in docs]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] >= 1000
    for d in docs:
        directive = d["_aws"]["CloudWatchMetrics"][0]
        assert directive["Namespace"] == "Test/LLM" and directive["Dimensions"] == [["EndpointName", "VariantName"]]
        assert (d["EndpointName"], d["VariantName"]) == ("tiny-ep", "blue")
        assert 0 <= d["KVCacheUsage"] <= 100 and d["QueueSize"] >= 0 and d["BatchSize"] >= 0

    def total(name: str) -> float:
        return sum(d.get(name, 0) for d in docs)

    def values(name: str) -> list[float]:
        return [v for d in docs for v in d.get(name, [])]

    assert total("Requests") == 6 and total("RequestsSucceeded") == 5 and total("RequestsInvalid") == 1
    assert total("RequestsErrored") == total("RequestsOverloaded") == total("RequestsCancelled") == 0
    generated = sum(a["generated_tokens"] for a in ok)
    assert total("GeneratedTokens") == generated and total("PromptTokens") == sum(a["prompt_tokens"] for a in ok)
    assert len(values("TimeToFirstToken")) == 5 and len(values("RequestLatency")) == 5
    assert len(values("InterTokenLatency")) == generated - 5  # every gap after each request's first token
    slowest = max(a["total_ms"] for a in ok)
    assert all(0 < v <= 2.5 * slowest + 5 for v in values("RequestLatency"))  # within the bucket of a real latency
    rates = [d["GeneratedTokensPerSecond"] for d in docs]
    assert max(rates) > 0 and sum(r > 0 for r in rates) <= sum(d["GeneratedTokens"] > 0 for d in docs)
