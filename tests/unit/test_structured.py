"""Structured output without a model: the edge's grammar checks import no torch; grammar specs and their messages;
a tool-call output read back whole and cut into stream pieces at every boundary, which join to the same call."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.grammar.spec import MAX_GRAMMAR_BYTES, GrammarError, GrammarSpec, check_grammar
from serve.engine_protocol import ValidationError
from serve.structured import response_format_grammar, tgi_grammar, tool_plan
from serve.tool_calls import ToolCall, ToolStream, parse, read


def test_the_edge_checks_grammars_without_torch() -> None:
    code = (
        "import sys; from serve.structured import tgi_grammar, tool_plan; "
        "tgi_grammar({'type': 'json', 'value': {'type': 'object'}}); "
        "tool_plan([{'type': 'function', 'function': {'name': 'f'}}], 'required'); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_specs_are_canonical_and_hashable() -> None:
    a = GrammarSpec.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    b = GrammarSpec.json_schema('{"type": "object",   "properties": {"a": {"type": "integer"}}}')
    assert a == b and hash(a) == hash(b) and a.value == '{"type":"object","properties":{"a":{"type":"integer"}}}'
    assert GrammarSpec.json_schema(True).value == "{}"
    with pytest.raises(GrammarError, match="`false` allows no output"):
        GrammarSpec.json_schema(False)
    assert GrammarSpec.regex("a").llguidance_grammar().startswith("{")


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (GrammarSpec.regex("(a"), 'invalid regex "(a": unclosed group'),
        (GrammarSpec.regex(r"(a)\1"), "backreferences are not supported"),
        (GrammarSpec.json_schema({"type": 5}), "type must be a string or array of strings"),
        (GrammarSpec.json_schema({"type": "array", "uniqueItems": True}), "Unimplemented keys"),
        (GrammarSpec.regex("a" * (MAX_GRAMMAR_BYTES + 1)), f"at most {MAX_GRAMMAR_BYTES} are supported"),
    ],
)
def test_grammar_errors_say_why(spec: GrammarSpec, reason: str) -> None:
    with pytest.raises(GrammarError) as info:
        check_grammar(spec)
    assert str(info.value).startswith("grammar is not valid: ") and reason in info.value.reason


def test_api_shapes_map_to_specs() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    assert tgi_grammar({"type": "json", "value": schema}) == GrammarSpec.json_schema(schema)
    assert tgi_grammar({"type": "json_object", "value": json.dumps(schema)}) == GrammarSpec.json_schema(schema)
    assert tgi_grammar({"type": "json_schema", "value": {"name": "n", "schema": schema}}) == GrammarSpec.json_schema(
        schema
    )
    assert tgi_grammar({"type": "regex", "value": "[ab]+"}) == GrammarSpec.regex("[ab]+")
    assert response_format_grammar({"type": "text"}) is None and response_format_grammar(None) is None
    assert response_format_grammar({"type": "json_object"}) == GrammarSpec.json_schema({"type": "object"})
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert response_format_grammar(fmt) == GrammarSpec.json_schema(schema)
    # TGI's chat shape (huggingface_hub's InferenceClient turns OpenAI's json_schema into it): the value is the grammar
    for kind in ("json_object", "json"):
        assert response_format_grammar({"type": kind, "value": schema}) == GrammarSpec.json_schema(schema)
    assert response_format_grammar({"type": "regex", "value": "[ab]+"}) == GrammarSpec.regex("[ab]+")
    with pytest.raises(ValidationError, match="grammar is not valid"):
        response_format_grammar({"type": "json_object", "value": {"type": "object", "not": {}}})
    with pytest.raises(ValidationError, match="best_of|grammar type"):
        tgi_grammar({"type": "lark", "value": "start: x"})


def test_tool_plans() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert tool_plan(None, None) is None and tool_plan([], "none") is None
    none = tool_plan(tools, "none")
    assert none is not None and none.grammar is None and none.tools == []
    required = tool_plan(tools, "required")
    assert required is not None and required.names == ("f",)
    assert '"content"' not in required.grammar.value and '"content"' in tool_plan(tools, "auto").grammar.value
    named = tool_plan(tools, {"type": "function", "function": {"name": "f"}})
    assert named is not None and named.grammar == required.grammar


CALL = '{"name":"get_weather","arguments":{"city":"Par\\"is","days":[1,{"x":"}"}]}}'
TEXT = '{"content":"héllo \\"w\\" \\u00e9\\ud83d\\ude00\\n end"}'


def test_outputs_read_back() -> None:
    assert parse(CALL) == ToolCall("get_weather", '{"city":"Par\\"is","days":[1,{"x":"}"}]}')
    assert parse(TEXT) == 'héllo "w" é😀\n end'
    assert parse('{"name":"f"') is None and parse("plain") is None
    assert read('{"name":"f","arguments":{"a":') == ToolCall("f", '{"a":')
    assert read('{"content":"ab\\u00') == "ab"
    assert read("free text") == "free text"
    # a budget that ran out right after the closing brace (finish reason "length"): still the whole call
    assert read('{"name":"f","arguments":{"a":1}}') == ToolCall("f", '{"a":1}')


@pytest.mark.parametrize("text", [CALL, TEXT, "just text {", CALL[:30], TEXT[:25]])
def test_stream_pieces_join_to_what_is_read_at_every_cut(text: str) -> None:
    expected = read(text)
    for size in (1, 2, 3, 5, 8, len(text)):
        stream = ToolStream()
        pieces = []
        for i in range(0, len(text), size):
            pieces += stream.add(text[i : i + size])
        pieces += stream.finish()
        kinds = [k for k, _ in pieces]
        if isinstance(expected, ToolCall):
            assert kinds[0] == "call" and kinds.count("call") == 1 and set(kinds) == {"call", "arguments"}
            assert pieces[0][1] == expected.name
            assert "".join(v for k, v in pieces if k == "arguments") == expected.arguments
        else:
            assert set(kinds) <= {"content"} and "".join(v for _, v in pieces) == expected
