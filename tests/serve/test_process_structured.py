"""Structured output through real clients against one real `serve` process (tiny random llama, float32): the openai
SDK's `parse` into a pydantic model, `tools` with `tool_choice="required"` streamed and not, TGI's `text_generation`
client's `grammar`, huggingface_hub's InferenceClient; 422 JSON errors for bad schemas, regexes and tool choices; and
constrained requests batched with free ones, whose greedy answers stay those engine.LLM gives alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import jsonschema
import openai
import pytest

# Installed by .ci/run with `pip install --no-deps text-generation` (its metadata pins huggingface_hub<1).
import text_generation
import torch
from huggingface_hub import InferenceClient
from pydantic import BaseModel, Field
from text_generation.types import Grammar, GrammarType

from engine import LLM, SamplingParams
from tests.support.serve_process import Serve, running_serve
from tests.support.served_app import build_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:text_generation"),  # its pydantic v1 calls
]

PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TIMEOUT = 60


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    name: str = Field(max_length=6)
    pets: list[Pet] = Field(max_length=2)
    verified: bool


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ITEMS = {  # nested objects, arrays, enums, bounded numbers, required and optional fields
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "owner": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 5}, "score": {"type": "number", "minimum": -1}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["id", "owner", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("structured_model"))  # llama_gqa with a chat template


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(model_dir, tmp_path_factory.mktemp("structured_serve")) as s:
        yield s


def openai_client(server: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="x", timeout=TIMEOUT, max_retries=0)


def test_openai_parse_into_a_pydantic_model(server: Serve) -> None:
    client = openai_client(server)
    for seed in (0, 1):
        answer = client.chat.completions.parse(
            model="tgi", messages=CHAT, response_format=Owner, max_tokens=200, seed=seed, temperature=1.0
        )
        owner = answer.choices[0].message.parsed
        assert isinstance(owner, Owner) and answer.choices[0].finish_reason == "stop"
        assert Owner.model_validate_json(answer.choices[0].message.content) == owner


def test_openai_tool_calls_required_streamed_and_not(server: Serve) -> None:
    client = openai_client(server)
    kw = dict(model="tgi", messages=CHAT, tools=TOOLS, tool_choice="required", max_tokens=150, seed=3)
    answer = client.chat.completions.create(**kw)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if call.function.name == "get_weather":
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    else:
        assert call.function.name == "get_time" and isinstance(json.loads(call.function.arguments), dict)

    with client.chat.completions.stream(**kw) as stream:  # the SDK's own accumulation of tool-call deltas
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)

    chunks = list(client.chat.completions.create(**kw, stream=True))  # OpenAI's delta shape, chunk by chunk
    deltas = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].index == 0 and deltas[0].type == "function" and deltas[0].id.startswith("call_")
    assert deltas[0].function.name == call.function.name and all(d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_openai_named_tool_choice(server: Serve) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    answer = openai_client(server).chat.completions.create(
        model="tgi", messages=CHAT, tools=TOOLS, tool_choice=choice, max_tokens=150, temperature=1.2, seed=9
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and answer.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


def test_tgi_client_grammar(server: Serve) -> None:
    client = text_generation.Client(server.url(""), timeout=TIMEOUT)
    r = client.generate(PROMPT, max_new_tokens=150, grammar=Grammar(type=GrammarType.Json, value=WEATHER))
    assert r.details.finish_reason.value == "eos_token"
    jsonschema.validate(json.loads(r.generated_text), WEATHER)
    pattern = r"[A-Z][a-z]{1,5} [0-9]{2}"
    r = client.generate(PROMPT, max_new_tokens=30, grammar=Grammar(type=GrammarType.Regex, value=pattern))
    assert re.fullmatch(pattern, r.generated_text)
    events = list(
        client.generate_stream(
            PROMPT, max_new_tokens=30, do_sample=True, seed=2, grammar=Grammar(type=GrammarType.Regex, value=pattern)
        )
    )
    assert re.fullmatch(pattern, events[-1].generated_text) and events[-1].details.finish_reason.value == "eos_token"
    with pytest.raises(text_generation.errors.ValidationError, match="grammar is not valid"):
        client.generate(PROMPT, grammar=Grammar(type=GrammarType.Regex, value="(?<=x)y"))  # refused by the worker
    with pytest.raises(text_generation.errors.ValidationError, match="grammar is not valid: no output satisfies it"):
        client.generate(PROMPT, grammar=Grammar(type=GrammarType.Json, value={"$ref": "#"}))  # by the engine (zmq)


def test_inference_client_grammar_and_tools(server: Serve) -> None:
    client = InferenceClient(base_url=server.url(""), timeout=TIMEOUT)
    r = client.text_generation(PROMPT, max_new_tokens=150, grammar={"type": "json", "value": ITEMS})
    jsonschema.validate(json.loads(r), ITEMS)
    fmt = {"type": "json_schema", "json_schema": {"name": "items", "schema": ITEMS}}
    answer = client.chat_completion(CHAT, max_tokens=150, response_format=fmt, seed=4, temperature=1.0)
    jsonschema.validate(json.loads(answer.choices[0].message.content), ITEMS)
    answer = client.chat_completion(CHAT, max_tokens=150, tools=TOOLS, tool_choice="required", seed=1)
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time") and answer.choices[0].finish_reason == "tool_calls"


OPENAI_422 = [
    (
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "`tool_choice` names the function `nope`, which is not in `tools`",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
        'grammar is not valid: Unimplemented keys: ["not"]',
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}}}, None),
]


@pytest.mark.parametrize(("extra", "message"), OPENAI_422)
def test_openai_sdk_gets_422_json_errors(server: Serve, extra: dict, message: str | None) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        openai_client(server).chat.completions.create(model="tgi", messages=CHAT, max_tokens=8, **extra)
    assert caught.value.status_code == 422 and caught.value.response.headers["content-type"] == "application/json"
    body = caught.value.response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    assert body["error"].startswith(message or "grammar is not valid: no output satisfies it")
    assert caught.value.body == body["error"]  # what the SDK shows


RAW_422 = [
    ("/generate", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(a)\\1"}}}, "grammar is not"),
    ("/generate_stream", {"inputs": "x", "parameters": {"grammar": {"type": "json", "value": {"type": "nope"}}}}, ""),
    ("/invocations", {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "x" * 70000}}}, ""),
    (
        "/invocations",
        {"messages": CHAT, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "`tool_choice` names the function `f`",
    ),
    (
        "/v1/completions",
        {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}},
        "`response_format.json_schema.schema` must be a JSON schema object",
    ),
]


@pytest.mark.parametrize(("path", "body", "message"), RAW_422)
def test_422_json_errors_on_every_route(server: Serve, path: str, body: dict, message: str) -> None:
    status, raw = server.post(path, body)
    assert status == 422, raw
    answer = json.loads(raw)
    assert set(answer) == {"error", "error_type"} and answer["error_type"] == "validation"
    assert answer["error"].startswith(message or "grammar is not valid: ")


def test_constrained_and_free_requests_batched_together(server: Serve, model_dir: Path) -> None:
    """Concurrent requests share the server's steps: the schema-constrained ones (greedy and sampled) validate, the
    regex ones match whole, the free greedy ones equal what engine.LLM gives for them alone."""
    torch.set_num_threads(1)
    llm = LLM(str(model_dir), dtype="float32", max_batch_total_tokens=4096)
    free_prompts = ["Paris is the capital of", "Once upon a time", PROMPT]
    reference = [o.text for o in llm.generate(free_prompts, SamplingParams(max_new_tokens=24, do_sample=False))]
    client = text_generation.Client(server.url(""), timeout=TIMEOUT)
    pattern = r"(yes|no), [0-9]{1,3}!"

    def free(prompt: str) -> str:
        return client.generate(prompt, max_new_tokens=24).generated_text

    def schema(seed: int) -> str:
        sampled = {"do_sample": True, "seed": seed, "temperature": 1.3} if seed else {}
        grammar = Grammar(type=GrammarType.Json, value=ITEMS)
        r = client.generate(f"Item {seed}:", max_new_tokens=150, grammar=grammar, **sampled)
        assert r.details.finish_reason.value == "eos_token"
        return r.generated_text

    def regex(seed: int) -> str:
        grammar = Grammar(type=GrammarType.Regex, value=pattern)
        return client.generate(f"Answer {seed}:", max_new_tokens=30, do_sample=True, seed=seed, grammar=grammar)

    with ThreadPoolExecutor(8) as pool:
        frees = [pool.submit(free, p) for p in free_prompts]
        schemas = [pool.submit(schema, seed) for seed in range(3)]
        regexes = [pool.submit(regex, seed) for seed in (1, 2)]
        assert [f.result() for f in frees] == reference
        for f in schemas:
            jsonschema.validate(json.loads(f.result()), ITEMS)
        for f in regexes:
            assert re.fullmatch(pattern, f.result().generated_text)
