"""A grammar as a request names it, and its validation without a tokenizer (cheap, torch-free: the HTTP workers
check a schema or regex with it before a request reaches the engine).

llguidance is the grammar library (the comparison is in docs/structured-output.md). JSON is generated compact: no
whitespace between tokens, so a model cannot loop on whitespace and a tool call has one textual form.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

# The largest schema or regex accepted, in bytes of its (compact JSON) text: compiling it stays within milliseconds.
MAX_GRAMMAR_BYTES = 65536
_JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A grammar that cannot be used (the HTTP layer answers it with a 422): "grammar is not valid: <reason>"."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"grammar is not valid: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class GrammarSpec:
    """kind "json": `value` is a JSON schema as compact JSON text; kind "regex": a regular expression the whole
    output must match. Hashable: compiled grammars are cached by it."""

    kind: Literal["json", "regex"]
    value: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool | str) -> GrammarSpec:
        """From a schema (a dict, a boolean schema, or its JSON text); GrammarError if it is not JSON."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from e
        if schema is True:
            schema = {}  # any JSON value
        if schema is False:
            raise GrammarError("the schema `false` allows no output")
        if not isinstance(schema, dict):
            raise GrammarError("a JSON schema must be an object or a boolean")
        return cls("json", json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @classmethod
    def regex(cls, pattern: str) -> GrammarSpec:
        if not isinstance(pattern, str):
            raise GrammarError("a regex grammar must be a string")
        return cls("regex", pattern)

    def llguidance_grammar(self) -> str:
        """The grammar in llguidance's form (what its matchers are built from)."""
        from llguidance import LLMatcher

        if self.kind == "json":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=_JSON_OPTIONS)
        return LLMatcher.grammar_from_regex(self.value)


@functools.lru_cache(maxsize=512)
def check_grammar(spec: GrammarSpec) -> None:
    """Raise GrammarError if the grammar is too big, or the library cannot compile it (an unsupported JSON-schema
    keyword, a regex with look-around or back-references, a dangling $ref, ...). Cached: a valid spec costs once."""
    from llguidance import LLMatcher

    if spec.kind not in ("json", "regex"):
        raise GrammarError(f"unknown grammar type {spec.kind!r}")
    size = len(spec.value.encode())
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"the grammar is {size} bytes; at most {MAX_GRAMMAR_BYTES} are supported")
    try:
        error = LLMatcher.validate_grammar(spec.llguidance_grammar())
    except Exception as e:  # the library refusing the input is the input's problem
        raise GrammarError(str(e)) from e
    if error:
        raise GrammarError(_first_line(error))


def _first_line(message: str) -> str:
    """llguidance's messages may quote the grammar over several lines: keep the explanation."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid grammar"
    first = re.sub(r"^at \d+\(\d+\): ", "", lines[0])
    # 'invalid regex "(a" (in regex): regex parse error:' is followed by the pattern, a caret line, "error: <why>"
    why = next((line[len("error:") :].strip() for line in lines[1:] if line.startswith("error:")), None)
    if why:
        head = re.sub(r"( [(]in regex[)])?:? ?regex parse error:$", "", first)
        return f"{head or 'invalid regex'}: {why}"
    return first
