"""Reading a tool-call output back (serve/structured.py constrains it): `{"name":"f","arguments":{...}}` is a call of
f, `{"content":"..."}` a text answer. The JSON is compact, so both have one textual form, and a stream can be cut into
OpenAI's tool-call deltas as the text arrives: the name once known, then the arguments' text piece by piece.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

CALL_PREFIX = '{"name":"'
ARGUMENTS_KEY = '","arguments":'
CONTENT_PREFIX = '{"content":"'


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # the arguments object's JSON text

    def as_openai(self, call: str) -> dict[str, Any]:
        return {"id": call, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse(text: str) -> ToolCall | str | None:
    """A complete output -> the call, the text answer, or None when it is not one (cut short, stopped)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, dict) and set(value) == {"name", "arguments"} and isinstance(value["name"], str):
        start = len(CALL_PREFIX) + len(value["name"]) + len(ARGUMENTS_KEY)
        if text.startswith(CALL_PREFIX + value["name"] + ARGUMENTS_KEY) and text.endswith("}"):
            return ToolCall(value["name"], text[start:-1])
        return ToolCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False))
    if isinstance(value, dict) and set(value) == {"content"} and isinstance(value["content"], str):
        return value["content"]
    return None


def read(text: str) -> ToolCall | str:
    """An output as a client gets it: a call (whose arguments, when cut short, are the text there is), or text (a
    text answer's content, decoded as far as it goes; any other output as it is). A whole call or answer reads as
    one however the request ended (a budget or stop sequence may end it right after the closing brace), as
    ToolStream.finish reads it."""
    whole = parse(text)
    if whole is not None:
        return whole
    if text.startswith(CALL_PREFIX):
        name_end = text.find(ARGUMENTS_KEY, len(CALL_PREFIX))
        if name_end >= 0:
            return ToolCall(text[len(CALL_PREFIX) : name_end], text[name_end + len(ARGUMENTS_KEY) :])
    if text.startswith(CONTENT_PREFIX):
        return _decoded_string_prefix(text[len(CONTENT_PREFIX) :])
    return text


def _decoded_string_prefix(raw: str) -> str:
    """The longest prefix of a JSON string's inside (no opening quote) that decodes whole: a partial escape or half
    a surrogate pair at the end waits for the next piece; the closing quote ends it."""
    end, i = len(raw), 0
    while i < len(raw):
        if raw[i] == '"':
            end = i
            break
        i += 2 if raw[i] == "\\" else 1
    for cut in range(end, max(-1, end - 13), -1):
        try:
            text = json.loads(f'"{raw[:cut]}"')
        except ValueError:
            continue
        if text and "\ud800" <= text[-1] <= "\udbff":
            continue
        return text
    return ""


@dataclass
class ToolStream:
    """One choice's text -> what to send: ("call", name) once, ("arguments", piece)..., or ("content", piece)...
    `finish` flushes what was held back (the wrapper's closing brace is never sent)."""

    text: str = ""
    kind: str | None = None  # "call" | "content" | "raw" (not a tool output: sent as content)
    name: str = ""  # the called function, once known
    sent: int = 0  # characters of the current part already sent

    def add(self, piece: str) -> list[tuple[str, str]]:
        self.text += piece
        out: list[tuple[str, str]] = []
        if self.kind is None:
            self._decide(out)
        if self.kind == "call":
            body = self.text[self._arguments_start() :]
            if len(body) - 1 > self.sent:  # hold back the last character: it may be the wrapper's "}"
                out.append(("arguments", body[self.sent : len(body) - 1]))
                self.sent = len(body) - 1
        elif self.kind == "content":
            decoded = _decoded_string_prefix(self.text[len(CONTENT_PREFIX) :])
            if len(decoded) > self.sent:
                out.append(("content", decoded[self.sent :]))
                self.sent = len(decoded)
        elif self.kind == "raw" and len(self.text) > self.sent:
            out.append(("content", self.text[self.sent :]))
            self.sent = len(self.text)
        return out

    def _decide(self, out: list[tuple[str, str]]) -> None:
        if self.text.startswith(CALL_PREFIX):
            name_end = self.text.find(ARGUMENTS_KEY, len(CALL_PREFIX))
            if name_end >= 0:
                self.kind, self.name = "call", self.text[len(CALL_PREFIX) : name_end]
                out.append(("call", self.name))
        elif self.text.startswith(CONTENT_PREFIX):
            self.kind = "content"
        elif not (CALL_PREFIX.startswith(self.text) or CONTENT_PREFIX.startswith(self.text)):
            self.kind = "raw"

    def _arguments_start(self) -> int:
        return len(CALL_PREFIX) + len(self.name) + len(ARGUMENTS_KEY)

    def finish(self) -> list[tuple[str, str]]:
        """The rest at the end of the output (a complete call's closing brace dropped; a cut one sent as it is)."""
        if self.kind is None:
            self.kind = "raw"
        if self.kind == "call":
            body = self.text[self._arguments_start() :]
            complete = isinstance(parse(self.text), ToolCall)
            rest = body[self.sent : -1] if complete else body[self.sent :]
            return [("arguments", rest)] if rest else []
        if self.kind == "content" and isinstance(parse(self.text), str):
            return self.add("")
        rest = self.text[self.sent :] if self.kind == "raw" else ""
        return [("content", rest)] if rest else []
