"""API requests for structured output -> a GrammarSpec the engine constrains decoding with, checked here at the edge
(torch-free): TGI's `parameters.grammar`, OpenAI's `response_format`, and `tools` with `tool_choice`.

Tool calls use the constrained-choice approach TGI documents: the output is one JSON object, a choice (`anyOf`) among
`{"name": "<function>", "arguments": {<its parameters>}}` for each allowed function, and with `tool_choice` "auto" also
`{"content": "<a text answer>"}`. serve/tool_calls.py reads the object back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.grammar.spec import GrammarError, GrammarSpec, check_grammar
from serve.engine_protocol import ValidationError

_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule: a name needs no escaping inside JSON
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def checked(spec: GrammarSpec) -> GrammarSpec:
    """The spec if the grammar library can compile it; else a 422 in TGI's words ("grammar is not valid: ...")."""
    try:
        check_grammar(spec)
    except GrammarError as e:
        raise ValidationError(str(e)) from e
    return spec


def _schema(value: Any, where: str) -> GrammarSpec:
    try:
        return GrammarSpec.json_schema(value)
    except GrammarError as e:
        raise ValidationError(f"grammar is not valid: {where}: {e.reason}") from e


def tgi_grammar(grammar: dict[str, Any] | None) -> GrammarSpec | None:
    """TGI's `{"type": "json" | "json_object", "value": <schema or its text>}`, `{"type": "regex", "value": "..."}`
    and `{"type": "json_schema", "value": {"name": ..., "schema": {...}}}`."""
    if grammar is None:
        return None
    kind, value = grammar.get("type"), grammar.get("value")
    if kind in ("json", "json_object"):
        spec = _schema(value, "`value`")
    elif kind == "json_schema":
        if not isinstance(value, dict) or not isinstance(value.get("schema"), (dict, bool)):
            raise ValidationError("grammar is not valid: `value` must be an object with a `schema` object")
        spec = _schema(value["schema"], "`value.schema`")
    elif kind == "regex":
        if not isinstance(value, str):
            raise ValidationError("grammar is not valid: a regex `value` must be a string")
        spec = GrammarSpec.regex(value)
    else:
        raise ValidationError(f"grammar type must be one of `json`, `json_schema`, `regex`. Given: {kind!r}")
    return checked(spec)


def response_format_grammar(response_format: dict[str, Any] | None) -> GrammarSpec | None:
    """OpenAI's `{"type": "text"}` (none), `{"type": "json_object"}` (any JSON object) and
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`; also TGI's chat shape, a grammar with a
    `value` as in `parameters.grammar` (`{"type": "json_object" | "json", "value": <schema>}`, `regex`, ...), which
    huggingface_hub's InferenceClient sends for OpenAI's `json_schema`."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if "value" in response_format and "json_schema" not in response_format:
        return tgi_grammar(response_format)
    if kind == "json_object":
        return checked(GrammarSpec.json_schema({"type": "object"}))
    if kind == "json_schema":
        config = response_format.get("json_schema")
        if not isinstance(config, dict) or not isinstance(config.get("name"), str):
            raise ValidationError("`response_format.json_schema` must be an object with a `name`")
        schema = config.get("schema", {"type": "object"})
        if not isinstance(schema, (dict, bool)):
            raise ValidationError("`response_format.json_schema.schema` must be a JSON schema object")
        return checked(_schema(schema, "`response_format.json_schema.schema`"))
    raise ValidationError(
        f"`response_format.type` must be one of `text`, `json_object`, `json_schema`. Given: {kind!r}"
    )


@dataclass(frozen=True)
class ToolPlan:
    """A chat request with tools: the tools for the chat template, and the grammar of the call (None: no call)."""

    tools: list[dict[str, Any]]  # as the request gave them (OpenAI's shape; transformers' templates take it)
    grammar: GrammarSpec | None
    names: tuple[str, ...]  # the functions the output may call


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameters schema, with OpenAI's checks."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise ValidationError(f'`tools[{i}]` must be {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise ValidationError(f"`tools[{i}].function.name` must match ^[a-zA-Z0-9_-]{{1,64}}$. Given: {name!r}")
        if name in functions:
            raise ValidationError(f"`tools` holds the function `{name}` twice")
        parameters = function.get("parameters", _EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise ValidationError(f"`tools[{i}].function.parameters` must be a JSON schema object")
        functions[name] = parameters
    return functions


def _rebased(schema: Any, base: str) -> Any:
    """`schema` with every document-relative `$ref` ("#...") made relative to `base` (where it now lives)."""
    if isinstance(schema, dict):
        return {
            k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#") else _rebased(v, base)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_rebased(v, base) for v in schema]
    return schema


def _choice(tool_choice: str | dict[str, Any] | None, has_tools: bool) -> str | tuple[str]:
    """ "none" | "auto" | "required" | (function name,)."""
    if tool_choice is None:
        return "auto" if has_tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValidationError(
                f"`tool_choice` must be `none`, `auto`, `required` or a function. Given: {tool_choice!r}"
            )
        return tool_choice
    function = tool_choice.get("function")
    if tool_choice.get("type", "function") != "function" or not isinstance(function, dict):
        raise ValidationError('`tool_choice` must be {"type": "function", "function": {"name": ...}}')
    name = function.get("name")
    if not isinstance(name, str):
        raise ValidationError("`tool_choice.function.name` must be a string")
    return (name,)


def tool_plan(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan | None:
    """None without tools (or with `tool_choice` "none" and no tools); a 422 for a choice the tools cannot meet."""
    choice = _choice(tool_choice, bool(tools))
    if not tools:
        if choice in ("none", "auto"):
            return None
        raise ValidationError("`tool_choice` needs `tools`")
    functions = _functions(tools)
    if choice == "none":
        return ToolPlan([], None, ())  # the model is not told of the tools and cannot call one
    if isinstance(choice, tuple):
        if choice[0] not in functions:
            raise ValidationError(f"`tool_choice` names the function `{choice[0]}`, which is not in `tools`")
        names: tuple[str, ...] = choice
    else:
        names = tuple(functions)
    # Each function's parameters schema lives in the root's $defs, so its own root-relative refs ("#/$defs/Pet",
    # as the openai SDK writes nested pydantic models; "#" for recursion) still resolve once rebased there.
    defs = {f"fn_{name}": _rebased(functions[name], f"#/$defs/fn_{name}") for name in names}
    options: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/fn_{name}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in names
    ]
    if choice == "auto":  # a text answer is the other choice
        options.append(
            {
                "type": "object",
                "properties": {"content": {"type": "string"}},
                "required": ["content"],
                "additionalProperties": False,
            }
        )
    schema = {**options[0], "$defs": defs} if len(options) == 1 else {"anyOf": options, "$defs": defs}
    return ToolPlan(list(tools), checked(_schema(schema, "`tools`")), names)
