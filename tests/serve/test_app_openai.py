"""OpenAI-compatible chat completions and completions: response and chunk shapes, usage, logprobs,
n choices, several prompts, echo, greedy text equal to the offline LLM, /invocations dispatch, 422s.
"""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient

from engine import LLM, SamplingParams
from serve.app import create_app
from tests.support.served_app import CHAT, Served, error, served
from tests.support.sse import sse_events

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(str(served(tmp_path_factory).path), dtype="float32", max_batch_total_tokens=4096, num_threads=1)


def prompt_tokens(env: Served, messages: list[dict]) -> int:
    text = env.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(env.tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/invocations"])
def test_chat_completion(api: FlaskClient, serve_env: Served, llm: LLM, route: str) -> None:
    r = api.post(route, json={"model": "anything", "messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    body = r.json
    (expected,) = llm.chat(MESSAGES, SamplingParams(max_new_tokens=12))
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-llama" and isinstance(body["created"], int) and body["system_fingerprint"]
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"] == {"role": "assistant", "content": expected.text}
    assert choice["finish_reason"] == {"length": "length", "eos_token": "stop"}[expected.finish_reason]
    assert choice["logprobs"] is None
    n = prompt_tokens(serve_env, MESSAGES)
    generated = len(expected.token_ids)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}
    assert r.headers["x-prompt-tokens"] == str(n)


def test_chat_logprobs_and_n(api: FlaskClient) -> None:
    body = {"messages": MESSAGES, "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 7}
    r = api.post("/v1/chat/completions", json=body).json
    assert [c["index"] for c in r["choices"]] == [0, 1]
    for c in r["choices"]:
        content = c["logprobs"]["content"]
        assert len(content) == 5 and c["finish_reason"] == "length"
        assert all(len(t["top_logprobs"]) == 2 and t["logprob"] <= 0 for t in content)
    assert r["usage"]["completion_tokens"] == 10


def test_chat_stream(api: FlaskClient, llm: LLM, serve_env: Served) -> None:
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    raw = r.get_data()
    assert raw.startswith(b"data: {") and raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    (expected,) = llm.chat(MESSAGES, SamplingParams(max_new_tokens=12))
    assert all(c["object"] == "chat.completion.chunk" and len(c["choices"]) == 1 for c in chunks)
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected.text
    assert [c["choices"][0]["finish_reason"] for c in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(expected.token_ids)
    assert usage_chunk["usage"]["prompt_tokens"] == prompt_tokens(serve_env, MESSAGES)


def test_chat_stream_n_and_logprobs(api: FlaskClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 4, "n": 2, "stream": True, "logprobs": True}
    events = sse_events(api.post("/v1/chat/completions", json=body).get_data())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert sum(len(c["logprobs"]["content"]) for c in mine) == 4
        assert mine[-1]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)


def test_completion(api: FlaskClient, serve_env: Served, llm: LLM) -> None:
    prompts = ["Hello world", "The quick brown fox"]
    r = api.post("/v1/completions", json={"prompt": prompts, "max_tokens": 6, "temperature": 0, "logprobs": 2})
    body = r.json
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    offline = llm.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [c["text"] for c in body["choices"]] == [o.text for o in offline]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    for c in body["choices"]:
        lp = c["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(len(top) <= 2 for top in lp["top_logprobs"])
        assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    n = sum(len(serve_env.tokenizer(p)["input_ids"]) for p in prompts)
    assert body["usage"] == {"prompt_tokens": n, "completion_tokens": 12, "total_tokens": n + 12}


def test_completion_echo_and_invocations(api: FlaskClient) -> None:
    plain = api.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}).json
    echo = api.post("/invocations", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0, "echo": True}).json
    assert echo["choices"][0]["text"] == "Hello" + plain["choices"][0]["text"]


def test_completion_stream(api: FlaskClient) -> None:
    body = {"prompt": ["Hello world", "The quick brown fox"], "max_tokens": 6, "temperature": 0, "stream": True}
    expected = api.post("/v1/completions", json={**body, "stream": False}).json
    r = api.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.get_data().startswith(b"data: {")
    events = sse_events(r.get_data())
    assert events[-1] == "[DONE]"
    for choice in expected["choices"]:
        mine = [e["choices"][0] for e in events[:-1] if e["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
    assert all(e["object"] == "text_completion" and "usage" not in e for e in events[:-1])


OPENAI_422 = [
    ("/v1/chat/completions", {**CHAT, "n": 0}, "`n` must be strictly positive"),
    ("/v1/chat/completions", {**CHAT, "n": 5}, "`n` must be <= 4. Given: 5"),
    (
        "/v1/chat/completions",
        {**CHAT, "logprobs": True, "top_logprobs": 6},
        "`top_logprobs` must be >= 0 and <= 5. Given: 6",
    ),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "`top_logprobs` requires `logprobs` to be true"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, "`presence_penalty` is not supported"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"5": 1.0}}, "`logit_bias` is not supported"),
    (
        "/v1/chat/completions",
        {**CHAT, "tools": [{"type": "function"}]},
        '`tools[0]` must be {"type": "function", "function": {...}}',
    ),
    (
        "/v1/chat/completions",
        {**CHAT, "response_format": {"type": "yaml"}},
        "`response_format.type` must be one of `text`, `json_object`, `json_schema`. Given: 'yaml'",
    ),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, "`temperature` must be >= 0.0 and <= 2.0"),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, "`top_p` must be > 0.0 and <= 1.0"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, "`max_tokens` must be strictly positive"),
    ("/v1/chat/completions", {**CHAT, "stop": list("abcde")}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ("/v1/chat/completions", {"messages": []}, "`messages` cannot be empty"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "image_url content is not supported",
    ),
    ("/v1/completions", {"prompt": ["a"] * 5}, "Number of prompts exceeds the maximum allowed batch size of 4"),
    (
        "/v1/completions",
        {"prompt": "a", "suffix": "b"},
        "Suffix is not supported and can be achieved by preprocessing the prompt.",
    ),
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "`logprobs` must be >= 0 and <= 5. Given: 6"),
    ("/v1/completions", {"prompt": ["a", ""]}, "`inputs` cannot be empty"),
    ("/v1/completions", {"prompt": "a", "best_of": 2}, "`best_of` is not supported for completions"),
    ("/invocations", {"foo": 1}, "The request body needs `inputs` (TGI), `messages` (chat) or `prompt` (completions)"),
    ("/generate", ["not", "an", "object"], "The request body must be a JSON object"),
]


@pytest.mark.parametrize(("route", "body", "message"), OPENAI_422)
def test_openai_422(api: FlaskClient, route: str, body: object, message: str) -> None:
    assert error(api.post(route, json=body), 422, "validation") == message


def test_chat_without_template_is_422(serve_env: Served) -> None:
    tokenizer = serve_env.worker_tokenizer()
    tokenizer.chat_template = None
    client = create_app(serve_env.client, serve_env.config, tokenizer).test_client()
    assert error(client.post("/v1/chat/completions", json=CHAT), 422, "template_error").startswith("Template error:")
