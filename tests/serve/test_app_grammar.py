"""Structured output over HTTP (in-process engine, tiny random model): TGI's `grammar` on /generate, /generate_stream
and /invocations; OpenAI's `response_format` on chat and completions; `tools` with every `tool_choice`, streamed as
OpenAI's tool-call deltas; the chat template sees the tools; every bad schema, regex or choice is a 422 (never a 5xx).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from flask.testing import FlaskClient

from serve.openai_protocol import ChatRequest
from tests.support.served_app import CHAT, Served, error
from tests.support.sse import sse_events

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PHONE = r"[0-9]{3}-[0-9]{4}"


def tgi(grammar: dict, **parameters) -> dict:
    return {"inputs": "My name", "parameters": {"max_new_tokens": 100, "grammar": grammar, **parameters}}


@pytest.mark.parametrize("value", [PERSON, json.dumps(PERSON)])
@pytest.mark.parametrize("sampling", [{}, {"do_sample": True, "seed": 4, "temperature": 1.5}])
def test_tgi_json_grammar(api: FlaskClient, value: object, sampling: dict) -> None:
    r = api.post("/generate", json=tgi({"type": "json", "value": value}, details=True, **sampling))
    assert r.status_code == 200, r.json
    assert r.json["details"]["finish_reason"] == "eos_token"
    jsonschema.validate(json.loads(r.json["generated_text"]), PERSON)


def test_tgi_regex_grammar_streamed_and_on_invocations(api: FlaskClient) -> None:
    events = sse_events(api.post("/generate_stream", json=tgi({"type": "regex", "value": PHONE})).data)
    text = events[-1]["generated_text"]
    assert re.fullmatch(PHONE, text) and "".join(e["token"]["text"] for e in events) == text
    assert events[-1]["details"]["finish_reason"] == "eos_token"
    body = tgi({"type": "json_schema", "value": {"name": "person", "schema": PERSON}})
    (answer,) = api.post("/invocations", json=body).json
    jsonschema.validate(json.loads(answer["generated_text"]), PERSON)


def test_a_budget_cut_grammar_is_length(api: FlaskClient) -> None:
    r = api.post("/generate", json=tgi({"type": "json", "value": PERSON}, max_new_tokens=4, details=True))
    assert r.json["details"]["finish_reason"] == "length" and r.json["generated_text"].startswith('{"')


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/invocations"])
def test_chat_response_format_json_schema(api: FlaskClient, route: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    r = api.post(route, json={**CHAT, "response_format": fmt, "max_tokens": 100, "n": 2, "seed": 1})
    assert r.status_code == 200, r.json
    for choice in r.json["choices"]:
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_json_object_on_chat_and_completions(api: FlaskClient) -> None:
    fmt = {"type": "json_object"}
    chat = api.post("/v1/chat/completions", json={**CHAT, "response_format": fmt, "max_tokens": 100, "temperature": 0})
    completion = api.post("/v1/completions", json={"prompt": "x", "response_format": fmt, "max_tokens": 100})
    for text, reason in [
        (chat.json["choices"][0]["message"]["content"], chat.json["choices"][0]["finish_reason"]),
        (completion.json["choices"][0]["text"], completion.json["choices"][0]["finish_reason"]),
    ]:
        if reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # an open-ended object may outrun the budget; it is still an object's beginning
            assert reason == "length" and text.startswith("{")


def _check_call(call: dict, names: set[str]) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] in names
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[call["function"]["name"]])


@pytest.mark.parametrize(
    ("choice", "names"),
    [("required", {"get_weather", "get_time"}), ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})],
)
def test_tool_calls(api: FlaskClient, choice: object, names: set[str]) -> None:
    body = {**CHAT, "tools": TOOLS, "tool_choice": choice, "max_tokens": 80, "n": 3, "seed": 5}
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.json
    for c in r.json["choices"]:
        assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None
        (call,) = c["message"]["tool_calls"]
        _check_call(call, names)


# What the openai SDK's `pydantic_function_tool` sends for a nested model: root-relative refs into the function's own
# $defs (and a recursive "#"), which must resolve once the function sits inside the tool-call grammar.
OWNER = {
    "$defs": {
        "Pet": {
            "type": "object",
            "properties": {"kind": {"enum": ["cat", "dog"]}, "age": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["kind", "age"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {"pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "minItems": 1, "maxItems": 2}},
    "required": ["pets"],
    "additionalProperties": False,
}
TREE = {
    "type": "object",
    "properties": {"kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1}},
    "required": ["kids"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_tools_whose_parameters_use_refs(api: FlaskClient, choice: str) -> None:
    tools = [
        {"type": "function", "function": {"name": "owner", "parameters": OWNER}},
        {"type": "function", "function": {"name": "tree", "parameters": TREE}},
    ]
    schemas = {"owner": OWNER, "tree": TREE}
    body = {**CHAT, "tools": tools, "tool_choice": choice, "max_tokens": 88, "n": 4, "seed": 7}
    r = api.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.json
    finished = [c["finish_reason"] for c in r.json["choices"]]
    for c in r.json["choices"]:
        if c["finish_reason"] == "tool_calls":
            (call,) = c["message"]["tool_calls"]
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]])
    assert set(finished) <= {"tool_calls", "stop", "length"}
    assert "tool_calls" in finished or choice == "auto", finished


def test_tool_choice_auto_answers_in_text_or_calls(api: FlaskClient) -> None:
    kinds = set()
    for seed in range(6):
        body = {**CHAT, "tools": TOOLS, "max_tokens": 80, "seed": seed}  # tool_choice defaults to auto
        (c,) = api.post("/v1/chat/completions", json=body).json["choices"]
        if c["finish_reason"] == "tool_calls":
            _check_call(c["message"]["tool_calls"][0], set(SCHEMAS))
            kinds.add("call")
        else:
            assert "tool_calls" not in c["message"] and isinstance(c["message"]["content"], str)
            kinds.add(c["finish_reason"])
    assert kinds <= {"call", "stop", "length"} and kinds


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_streamed_tool_calls_join_to_the_answer(api: FlaskClient, choice: str) -> None:
    body = {**CHAT, "tools": TOOLS, "tool_choice": choice, "max_tokens": 80, "seed": 2}
    whole = api.post("/v1/chat/completions", json=body).json["choices"][0]
    events = sse_events(api.post("/v1/chat/completions", json={**body, "stream": True}).data)
    assert events[-1] == "[DONE]"
    chunks = [e["choices"][0] for e in events[:-1]]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    deltas = [c["delta"] for c in chunks]
    if whole["finish_reason"] == "tool_calls":
        calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
        assert calls[0]["index"] == 0 and calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
        assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
        expected = whole["message"]["tool_calls"][0]["function"]
        assert calls[0]["function"]["name"] == expected["name"]
        assert "".join(c["function"]["arguments"] for c in calls) == expected["arguments"]
        assert all(d["content"] is None for d in deltas)
    else:
        assert "".join(d["content"] or "" for d in deltas) == whole["message"]["content"]


def test_tool_history_and_tools_reach_the_template(serve_env: Served) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    request = ChatRequest.model_validate({"messages": messages, "tools": TOOLS})
    validator = serve_env.app().extensions["serve"].validator
    plan = validator.chat(request)
    assert plan.prompt_texts[0].startswith("<|tools|>get_weather get_time <|user|>Weather?")
    none = validator.chat(ChatRequest.model_validate({"messages": messages, "tools": TOOLS, "tool_choice": "none"}))
    assert not none.prompt_texts[0].startswith("<|tools|>") and none.params[0].grammar is None


GRAMMAR_422 = [
    (
        tgi({"type": "json", "value": {"type": "object", "not": {}}}),
        'grammar is not valid: Unimplemented keys: ["not"]',
    ),
    (tgi({"type": "regex", "value": "(?=a)b"}), "grammar is not valid: invalid regex"),
    (tgi({"type": "regex", "value": 5}), "grammar is not valid: a regex `value` must be a string"),
    (tgi({"type": "json", "value": "{nope"}), "grammar is not valid: `value`: the JSON schema is not valid JSON"),
    (tgi({"type": "json", "value": [1]}), "grammar is not valid: `value`: a JSON schema must be an object"),
    (tgi({"type": "json", "value": {"$ref": "#/nowhere"}}), "grammar is not valid: Pointer '/nowhere' does not exist"),
    (tgi({"type": "ebnf", "value": "x"}), "grammar type must be one of `json`, `json_schema`, `regex`. Given: 'ebnf'"),
    (tgi({"type": "regex", "value": "a" * 70000}), "grammar is not valid: the grammar is 70000 bytes; at most 65536"),
    (
        tgi({"type": "regex", "value": "a"}, best_of=2, do_sample=True),
        "grammar is not supported with `best_of` > 1",
    ),
]


@pytest.mark.parametrize(("body", "message"), GRAMMAR_422)
def test_tgi_grammar_422(api: FlaskClient, body: dict, message: str) -> None:
    assert error(api.post("/generate", json=body), 422, "validation").startswith(message)


CHAT_422 = [
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "`tool_choice` names the function `nope`, which is not in `tools`",
    ),
    ({"tool_choice": "required"}, "`tool_choice` needs `tools`"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "`tool_choice` must be `none`, `auto`, `required` or a function"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "`tools` holds the function `get_weather` twice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "`tools[0].function.name` must match"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
        "grammar is not valid: Unimplemented keys",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"schema": PERSON}}},
        "`response_format.json_schema` must be an object with a `name`",
    ),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"uniqueItems": True, "type": "array"}},
            }
        },
        "grammar is not valid: ",
    ),
    (
        {"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
        "`response_format` cannot be combined with `tools`",
    ),
]


@pytest.mark.parametrize(("extra", "message"), CHAT_422)
def test_chat_grammar_422(api: FlaskClient, extra: dict, message: str) -> None:
    assert error(api.post("/v1/chat/completions", json={**CHAT, **extra}), 422, "validation").startswith(message)


HOSTILE = [
    True,
    False,
    {},
    {"type": "null"},
    {"type": ["integer", "string", "array"]},
    {"enum": []},
    {"anyOf": []},
    {"type": "integer", "minimum": 5, "maximum": 1},
    {"type": "string", "minLength": 9, "maxLength": 2},
    {"type": "string", "pattern": "[[:alpha:]"},
    {"type": "string", "format": "no-such-format"},
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "required": ["x"], "properties": {"x": False}},
    {"type": "array", "minItems": 10**12},
    {"type": "number", "multipleOf": 0},
    {"properties": 5},
    {"enum": [{"a": [1, {"b": None}]}, 1e308, -0.0]},
    {"type": "string", "pattern": "(a|b)*c{1000}"},
    {"allOf": [{"type": "integer"}, {"type": "string"}]},
    {"oneOf": [{"$ref": "#/x/y"}]},
]


@pytest.mark.parametrize("schema", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_no_schema_gets_a_5xx(api: FlaskClient, schema: object) -> None:
    r = api.post("/generate", json=tgi({"type": "json", "value": schema}, max_new_tokens=6))
    assert r.status_code in (200, 422), (r.status_code, r.json)
    if r.status_code == 422:
        assert r.json["error"].startswith("grammar is not valid: ")
