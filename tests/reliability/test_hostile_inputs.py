"""Hostile bodies against the real `serve`, on every body-taking route and request shape: deep nesting, numbers JSON
cannot hold (NaN, Infinity, 1e999, 5,000-digit integers), lone surrogates, empty and non-object bodies, invalid
UTF-8, wrong content types, wrong field types, huge strings within the limit. Each gets its exact status and a JSON
{"error", "error_type"} body, and the server answers /ping 200 afterwards (and still generates at the end).
"""

from __future__ import annotations

import json

import pytest

from tests.reliability._http import Reply, error_body, post_json, request
from tests.support.serve_process import Serve

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

TGI = {"inputs": "Hello there", "parameters": {"max_new_tokens": 4}}
CHAT = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4}
COMPLETION = {"prompt": "Hello there", "max_tokens": 4}
# (route, a valid body, the key of its text, the key its options nest under)
TARGETS = {
    "invocations-tgi": ("/invocations", TGI, "inputs", "parameters"),
    "invocations-chat": ("/invocations", CHAT, "messages", "messages"),
    "invocations-completion": ("/invocations", COMPLETION, "prompt", "stop"),
    "compat": ("/", TGI, "inputs", "parameters"),
    "generate": ("/generate", TGI, "inputs", "parameters"),
    "generate_stream": ("/generate_stream", TGI, "inputs", "parameters"),
    "chat": ("/v1/chat/completions", CHAT, "messages", "messages"),
    "completions": ("/v1/completions", COMPLETION, "prompt", "stop"),
    "tokenize": ("/tokenize", {"inputs": "Hello there"}, "inputs", "inputs"),
}
DEEP = 1000


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


def with_raw(body: dict, key: str, raw_value: str) -> bytes:
    """`body` with `key` set to a raw JSON text (nothing re-encodes it)."""
    text = json.dumps({**body, key: "__RAW__"})
    return text.replace('"__RAW__"', raw_value).encode()


def text_value(target: str, text_json: str) -> tuple[str, str]:
    """(key, raw JSON) that puts a string (given as JSON text) where this shape carries its text."""
    _, _, key, _ = TARGETS[target]
    if key == "messages":
        return key, '[{"role": "user", "content": ' + text_json + "}]"
    return key, text_json


# (case id, body builder: (target) -> bytes, expected status, error_type); None status means "200"
def _cases() -> list[tuple[str, object, int, str | None]]:
    def at_text(text_json: str):
        def build(target: str) -> bytes:
            key, raw = text_value(target, text_json)
            return with_raw(TARGETS[target][1], key, raw)

        return build

    def extra(raw: str):  # an unknown key, which the schemas ignore
        return lambda target: with_raw(TARGETS[target][1], "x", raw)

    def options(raw: str):
        return lambda target: with_raw(TARGETS[target][1], TARGETS[target][3], raw)

    def whole(raw: bytes):
        return lambda target: raw

    return [
        ("nested-lists-body", whole(nested(DEEP).encode()), 400, "bad_request"),
        ("nested-objects-body", whole(('{"a":' * DEEP + "1" + "}" * DEEP).encode()), 400, "bad_request"),
        ("nested-lists-in-unknown-key", extra(nested(DEEP)), 400, "bad_request"),
        ("nested-objects-in-options", options('{"a":' * DEEP + "1" + "}" * DEEP), 400, "bad_request"),
        ("nested-lists-in-options", options(nested(DEEP)), 400, "bad_request"),
        ("nested-2000-lists", whole(nested(2 * DEEP).encode()), 400, "bad_request"),
        ("nested-120-in-unknown-key", extra(nested(120)), 200, None),
        ("nested-128-in-unknown-key", extra(nested(128)), 400, "bad_request"),
        ("nan", extra("NaN"), 400, "bad_request"),
        ("infinity", extra("Infinity"), 400, "bad_request"),
        ("minus-infinity", extra("-Infinity"), 400, "bad_request"),
        ("1e999", extra("1e999"), 400, "bad_request"),
        ("minus-1e999", extra("-1e999"), 400, "bad_request"),
        ("1e400-digits", extra("1" * 400), 200, None),
        ("5000-digit-integer", extra("9" * 5000), 400, "bad_request"),
        ("5000-digit-fraction", extra("0." + "1" * 5000), 200, None),
        ("lone-surrogate-in-text", at_text('"Hello \\ud800 there"'), 400, "bad_request"),
        ("lone-low-surrogate-in-text", at_text('"\\udfff"'), 400, "bad_request"),
        ("lone-surrogate-in-unknown-key", extra('"\\udbff"'), 400, "bad_request"),
        ("surrogate-pair-in-text", at_text('"Hello \\ud83d\\ude00 there"'), 200, None),
        ("empty-body", whole(b""), 400, "bad_request"),
        ("whitespace-body", whole(b"  \n "), 400, "bad_request"),
        ("truncated-json", lambda t: json.dumps(TARGETS[t][1]).encode()[:-3], 400, "bad_request"),
        ("trailing-garbage", lambda t: json.dumps(TARGETS[t][1]).encode() + b" x", 400, "bad_request"),
        ("null-body", whole(b"null"), 422, "validation"),
        ("array-body", whole(b"[]"), 422, "validation"),
        ("string-body", whole(b'"Hello there"'), 422, "validation"),
        ("number-body", whole(b"5"), 422, "validation"),
        ("invalid-utf8", lambda t: at_text('"Hello BAD there"')(t).replace(b"BAD", b"\xff\xfe"), 400, "bad_request"),
        ("utf8-bom", lambda t: b"\xef\xbb\xbf" + json.dumps(TARGETS[t][1]).encode(), 200, None),
        ("text-is-a-number", at_text("5"), 422, "validation"),
        ("text-is-null", at_text("null"), 422, "validation"),
        ("text-is-an-object", at_text("{}"), 422, "validation"),
        ("huge-string-in-unknown-key", extra(json.dumps("y" * 60_000)), 200, None),
    ]


CASES = _cases()


def send(server: Serve, target: str, body: bytes, content_type: str | None = "application/json") -> Reply:
    route = TARGETS[target][0]
    return request(server.port, "POST", route, body, content_type=content_type)


def assert_healthy(server: Serve) -> None:
    reply = request(server.port, "GET", "/ping", content_type=None, timeout=5)
    assert reply.status == 200, (reply.status, server.log()[-2000:])


def check(reply: Reply, status: int, error_type: str | None) -> None:
    if status == 200:
        assert reply.status == 200, (reply.status, reply.body[:300])
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            assert not any(isinstance(e, dict) and "error" in e for e in reply.events()), reply.body[:300]
        else:
            reply.json()
    else:
        error_body(reply, status, error_type)


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize(("case", "build", "status", "error_type"), CASES, ids=[c[0] for c in CASES])
def test_hostile_body(shared: Serve, target: str, case: str, build, status: int, error_type: str | None) -> None:
    if case == "text-is-null" and TARGETS[target][2] == "messages":
        status, error_type = 200, None  # a chat message's content may be null (an empty turn)
    check(send(shared, target, build(target)), status, error_type)
    assert_healthy(shared)


def test_messages_name_the_problem(shared: Serve) -> None:
    """The 400s say what is wrong, not a parser's internals."""
    msg = error_body(send(shared, "generate", nested(DEEP).encode()), 400)
    assert "nest" in msg and "128" in msg, msg
    msg = error_body(send(shared, "generate", with_raw(TGI, "x", "1e999")), 400)
    assert "1e999" in msg and "out of range" in msg, msg
    msg = error_body(send(shared, "generate", with_raw(TGI, "x", "9" * 5000)), 400)
    assert "digits" in msg, msg
    msg = error_body(send(shared, "generate", with_raw(TGI, "inputs", '"a\\ud800"')), 400)
    assert "surrogate" in msg and "tokenizer" not in msg, msg
    msg = error_body(send(shared, "generate", with_raw(TGI, "x", "NaN")), 400)
    assert "NaN" in msg, msg


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/xml", 415),
        (None, 200),  # no content type: taken as JSON
        ("application/json; charset=utf-8", 200),
        ("application/vnd.api+json", 200),
    ],
)
def test_content_types(shared: Serve, target: str, content_type: str | None, status: int) -> None:
    reply = send(shared, target, json.dumps(TARGETS[target][1]).encode(), content_type=content_type)
    check(reply, status, "unsupported_media_type" if status == 415 else None)


WRONG_TYPES = {
    "tgi": [
        {"inputs": "Hi", "parameters": "x"},
        {"inputs": "Hi", "parameters": []},
        {"inputs": "Hi", "parameters": {"max_new_tokens": "four"}},
        {"inputs": "Hi", "parameters": {"max_new_tokens": 2.5}},
        {"inputs": "Hi", "parameters": {"stop": "x"}},
        {"inputs": "Hi", "parameters": {"stop": [1]}},
        {"inputs": "Hi", "parameters": {"do_sample": "maybe"}},
        {"inputs": "Hi", "parameters": {"seed": "x"}},
        {"inputs": "Hi", "parameters": {"temperature": "hot"}},
        {"inputs": "Hi", "parameters": {"top_k": [1]}},
        {"inputs": ["Hi"]},
        {"inputs": ""},
    ],
    "chat": [
        {"messages": "hi"},
        {"messages": []},
        {"messages": [{"role": 5, "content": "x"}]},
        {"messages": [{"content": "x"}]},
        {"messages": ["x"]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": "x"},
        {"messages": [{"role": "user", "content": "x"}], "n": "x"},
        {"messages": [{"role": "user", "content": "x"}], "stop": 5},
        {"messages": [{"role": "user", "content": "x"}], "stream_options": 5},
        {"messages": [{"role": "user", "content": "x"}], "logit_bias": {"1": 5}},
    ],
    "completions": [
        {"prompt": 5},
        {"prompt": []},
        {"prompt": [1, 2]},
        {"prompt": [""]},
        {"prompt": "x", "max_tokens": "x"},
        {"prompt": "x", "echo": "x"},
        {"prompt": "x", "logprobs": "x"},
        {"prompt": "x", "suffix": "y"},
    ],
    "tokenize": [{"inputs": 5}, {"inputs": None}, {}, {"inputs": "x", "add_special_tokens": "x"}],
}
ROUTES_OF = {
    "tgi": ["/invocations", "/", "/generate", "/generate_stream"],
    "chat": ["/invocations", "/v1/chat/completions"],
    "completions": ["/invocations", "/v1/completions"],
    "tokenize": ["/tokenize"],
}


@pytest.mark.parametrize("shape", list(WRONG_TYPES))
def test_wrong_types_are_422(shared: Serve, shape: str) -> None:
    for route in ROUTES_OF[shape]:
        for body in WRONG_TYPES[shape]:
            reply = post_json(shared.port, route, body)
            error_body(reply, 422, None)
    assert_healthy(shared)


@pytest.mark.parametrize("target", ["generate", "chat", "completions", "invocations-tgi"])
def test_huge_text_within_the_limit_is_422(shared: Serve, target: str) -> None:
    key, raw = text_value(target, json.dumps("lorem ipsum " * 5000))  # 60 KB: under the limit, over the tokens
    msg = error_body(send(shared, target, with_raw(TARGETS[target][1], key, raw)), 422, "validation")
    assert "tokens" in msg, msg
    reply = send(shared, "tokenize", with_raw({"inputs": ""}, "inputs", json.dumps("lorem ipsum " * 5000)))
    assert reply.status == 200 and len(reply.json()) > 5000


def test_no_body_routes_and_methods(shared: Serve) -> None:
    for path in ("/ping", "/health", "/info", "/v1/models", "/metrics", "/openapi.json"):
        assert request(shared.port, "GET", path, content_type=None).status == 200, path
    error_body(request(shared.port, "GET", "/generate", content_type=None), 405, "method_not_allowed")
    error_body(request(shared.port, "POST", "/ping", b"{}"), 405, "method_not_allowed")
    error_body(request(shared.port, "GET", "/nope", content_type=None), 404, "not_found")
    error_body(request(shared.port, "DELETE", "/invocations", content_type=None), 405, "method_not_allowed")


def test_still_generates_afterwards(shared: Serve) -> None:
    for target in ("generate", "chat", "completions"):
        reply = send(shared, target, json.dumps(TARGETS[target][1]).encode())
        assert reply.status == 200, reply.body
