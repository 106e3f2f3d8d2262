"""TGI's generate API over the in-process engine: greedy text equal to the offline LLM, details,
streaming (SSE frames whose token texts join to the final text), the /invocations and / shapes,
stop sequences, truncation, default max_new_tokens, seeds and best_of.
"""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from engine import LLM, SamplingParams
from tests.support.served_app import Served, served
from tests.support.sse import sse_events

PROMPTS = ["Hello world", "The quick brown fox", "東京 is the capital of"]
TIMING_HEADERS = (
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    """The offline engine over the same checkpoint: the reference for greedy text."""
    return LLM(str(served(tmp_path_factory).path), dtype="float32", max_batch_total_tokens=4096, num_threads=1)


def generate(api: FlaskClient, inputs: str, route: str = "/generate", **parameters: object) -> dict:
    r = api.post(route, json={"inputs": inputs, "parameters": parameters})
    assert r.status_code == 200, r.json
    return r.json


def test_greedy_text_equals_offline_llm(api: FlaskClient, llm: LLM) -> None:
    offline = llm.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    for prompt, out in zip(PROMPTS, offline):
        body = generate(api, prompt, max_new_tokens=16, details=True)
        assert body["generated_text"] == out.text
        assert [t["id"] for t in body["details"]["tokens"]] == out.token_ids
        assert body["details"]["finish_reason"] == out.finish_reason


def test_details_tokens_top_tokens_prefill(api: FlaskClient, serve_env: Served) -> None:
    body = generate(api, "Hello world", max_new_tokens=8, details=True, top_n_tokens=3, decoder_input_details=True)
    d = body["details"]
    assert d["generated_tokens"] == len(d["tokens"]) == 8 and d["finish_reason"] == "length"
    assert d["seed"] is None  # greedy
    assert "".join(t["text"] for t in d["tokens"]) == body["generated_text"]
    assert all(t["logprob"] <= 0 and t["special"] is False for t in d["tokens"])
    assert len(d["top_tokens"]) == 8 and all(len(top) == 3 for top in d["top_tokens"])
    for token, top in zip(d["tokens"], d["top_tokens"]):  # greedy: the chosen token is the most likely
        assert top[0]["id"] == token["id"] and top[0]["logprob"] == pytest.approx(token["logprob"], abs=1e-5)
    prompt_ids = serve_env.tokenizer("Hello world")["input_ids"]
    assert [p["id"] for p in d["prefill"]] == prompt_ids and all(p["logprob"] is None for p in d["prefill"])
    assert "best_of_sequences" not in d
    plain = generate(api, "Hello world", max_new_tokens=8)
    assert set(plain) == {"generated_text"}  # details only when asked


def test_timing_headers(api: FlaskClient) -> None:
    r = api.post("/generate", json={"inputs": "Hello world", "parameters": {"max_new_tokens": 5}})
    for header in TIMING_HEADERS:
        assert header in r.headers, header
    assert r.headers["x-generated-tokens"] == "5" and r.headers["x-compute-characters"] == "11"
    assert r.headers["x-compute-type"] == "cpu" and float(r.headers["x-compute-time"]) > 0


@pytest.mark.parametrize("route", ["/invocations", "/"])
def test_compat_routes_answer_a_list(api: FlaskClient, route: str) -> None:
    direct = generate(api, "Hello world", max_new_tokens=6)
    r = api.post(route, json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6}})
    assert r.status_code == 200 and r.json == [direct]
    full = api.post(
        route, json={"inputs": "Hello world", "parameters": {"max_new_tokens": 6, "return_full_text": True}}
    )
    assert full.json == [{"generated_text": "Hello world" + direct["generated_text"]}]


def test_default_return_full_text_applies_to_invocations_only(serve_env: Served) -> None:
    client = serve_env.app(default_return_full_text=True).test_client()
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    assert client.post("/invocations", json=body).json[0]["generated_text"].startswith("Hello")
    plain = client.post("/generate", json=body).json["generated_text"]
    assert client.post("/invocations", json=body).json[0]["generated_text"] == "Hello" + plain


@pytest.mark.parametrize("route", ["/generate_stream", "/invocations"])
def test_stream_sse_format_and_join(api: FlaskClient, serve_env: Served, route: str) -> None:
    expected = generate(api, "東京 is the capital of", max_new_tokens=12, details=True)
    body = {"inputs": "東京 is the capital of", "parameters": {"max_new_tokens": 12, "top_n_tokens": 2}, "stream": True}
    r = api.post(route, json=body)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache" and r.headers["x-compute-type"] == "cpu"
    raw = r.get_data()
    assert raw.startswith(b"data:{") and raw.endswith(b"}\n\n")
    events = sse_events(raw)
    assert [e["index"] for e in events] == list(range(1, 13))
    for e in events[:-1]:
        assert e["generated_text"] is None and e["details"] is None and len(e["top_tokens"]) == 2
        assert set(e["token"]) == {"id", "text", "logprob", "special"}
    last = events[-1]
    assert last["generated_text"] == expected["generated_text"]
    assert "".join(e["token"]["text"] for e in events) == last["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in expected["details"]["tokens"]]
    n = len(serve_env.tokenizer("東京 is the capital of")["input_ids"])
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 12, "seed": None, "input_length": n}


def test_stream_return_full_text(api: FlaskClient) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "return_full_text": True}}
    events = sse_events(api.post("/generate_stream", json=body).get_data())
    assert events[-1]["generated_text"] == "Hello" + "".join(e["token"]["text"] for e in events)
    assert "top_tokens" not in events[0]


def test_stop_sequence(api: FlaskClient) -> None:
    text = generate(api, "The quick brown fox", max_new_tokens=24)["generated_text"]
    clean = [i for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip()]
    stop = text[clean[0] : clean[0] + 2]
    body = generate(api, "The quick brown fox", max_new_tokens=24, stop=[stop], details=True)
    assert body["details"]["finish_reason"] == "stop_sequence"
    assert body["generated_text"] == text[: text.index(stop)]


def test_truncate_keeps_the_last_tokens(api: FlaskClient, serve_env: Served) -> None:
    long_input = "The quick brown fox jumps over the lazy dog. " * 4
    n = len(serve_env.tokenizer(long_input)["input_ids"])
    assert n > 10
    r = api.post("/generate", json={"inputs": long_input, "parameters": {"max_new_tokens": 4, "truncate": 10}})
    assert r.status_code == 200 and r.headers["x-prompt-tokens"] == "10"


def test_default_max_new_tokens_fills_the_context(serve_env: Served) -> None:
    client = serve_env.app().test_client()
    n = len(serve_env.tokenizer("Hello world")["input_ids"])
    d = client.post("/generate", json={"inputs": "Hello world", "parameters": {"details": True}}).json["details"]
    if d["finish_reason"] == "length":
        assert d["generated_tokens"] == serve_env.config.max_total_tokens - n
    capped = serve_env.app(default_max_new_tokens=3).test_client()
    d = capped.post("/generate", json={"inputs": "Hello world", "parameters": {"details": True}}).json["details"]
    assert d["generated_tokens"] <= 3


def test_seeded_sampling_is_reproducible(api: FlaskClient) -> None:
    params = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.9, "seed": 1234, "details": True}
    a = generate(api, "Hello world", **params)
    b = generate(api, "Hello world", **params)
    assert a == b and a["details"]["seed"] == 1234
    unseeded = generate(api, "Hello world", max_new_tokens=4, do_sample=True, details=True)
    assert isinstance(unseeded["details"]["seed"], int)


def test_best_of_returns_the_most_likely(api: FlaskClient) -> None:
    body = generate(api, "Hello world", max_new_tokens=8, do_sample=True, best_of=2, details=True)
    d = body["details"]
    (other,) = d["best_of_sequences"]
    assert set(other) >= {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens"}

    def mean(tokens: list[dict]) -> float:
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(d["tokens"]) >= mean(other["tokens"])
    assert "".join(t["text"] for t in other["tokens"]) == other["generated_text"]


def test_text_plain_json_without_content_type(api: FlaskClient) -> None:
    r = api.post("/generate", data=b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}')
    assert r.status_code == 200
    r = api.post(
        "/generate",
        data=b'{"inputs": "Hello", "parameters": {"max_new_tokens": 2}}',
        content_type="application/json; charset=utf-8",
    )
    assert r.status_code == 200
