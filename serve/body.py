"""The request body at the edge, before any schema sees it: read within PAYLOAD_LIMIT whatever the framing, and parsed
as JSON with the limits JSON itself lacks (nesting depth, numbers no float or int conversion holds, lone surrogates).

Every refusal is an HttpError: 413 for a body over the limit (by its Content-Length, or by the bytes actually read
when it is chunked), 400 for anything that is not a JSON text this server can use, with a message that names it.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from serve.errors import HttpError

MAX_JSON_DEPTH = 128  # arrays and objects, the body itself included; serde_json's limit (TGI's router parses with it)
_READ_CHUNK = 64 * 1024
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # \uD800-\uDFFF: the only way one gets in


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The body's bytes, at most `limit` of them; a longer body is refused, never cut."""
    header = environ.get("CONTENT_LENGTH") or None
    length: int | None = None
    if header is not None:
        if not header.strip().isdigit():
            raise HttpError(400, f"Invalid Content-Length header: {header[:40]!r}")
        length = int(header)
        if length > limit:
            raise HttpError(413, f"Payload too large: {length} bytes, the limit is {limit}")
    # A server that frames the body itself (gunicorn always; any server for a chunked one) ends the stream there, so
    # reading one byte past the limit is safe and tells an oversized body. Otherwise only Content-Length bytes may be.
    terminated = bool(environ.get("wsgi.input_terminated"))
    if length is None and not terminated:
        return b""
    want = limit + 1 if terminated else length
    assert want is not None
    stream, data = environ["wsgi.input"], bytearray()
    try:
        while len(data) < want:
            chunk = stream.read(min(_READ_CHUNK, want - len(data)))
            if not chunk:
                break
            data += chunk
    except Exception as e:  # the server's reader failed: a broken chunk, a reset or a timed-out client
        raise HttpError(400, f"The request body could not be read: {type(e).__name__}: {e}") from e
    if len(data) > limit:
        raise HttpError(413, f"Payload too large: more than {limit} bytes, the limit is {limit}")
    if length is not None and len(data) != length:
        raise HttpError(400, f"The request body ended after {len(data)} of the {length} bytes of its Content-Length")
    return bytes(data)


def parse_json(raw: bytes) -> Any:
    """The JSON value in `raw` (UTF-8, an optional BOM), within the limits above."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HttpError(400, f"The request body is not valid UTF-8: {e.reason} at byte {e.start}") from e
    try:
        data = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except RecursionError:  # deeper than the interpreter's stack allows: far deeper than the limit
        raise HttpError(400, _too_deep()) from None
    except ValueError as e:
        raise HttpError(400, f"Failed to parse the request body as JSON: {e}") from e
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(data, MAX_JSON_DEPTH):
        raise HttpError(400, _too_deep())
    if _SURROGATE_ESCAPE.search(text):
        _check_surrogates(data)
    return data


def _too_deep() -> str:
    return f"The request body nests JSON arrays and objects deeper than {MAX_JSON_DEPTH} levels"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"the number {literal[:40]} is out of range (a float holds at most about 1.8e308)")
    return value


def _bounded_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    get_limit = getattr(sys, "get_int_max_str_digits", None)  # Python >= 3.10.7: int() refuses longer strings
    limit = (get_limit() if get_limit else 0) or digits
    if digits > limit:
        raise ValueError(f"an integer of {digits} digits is too long (at most {limit} digits)")
    return int(literal)


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (iterative: no recursion on hostile input)."""
    stack = [(data, 1)] if isinstance(data, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _check_surrogates(data: Any) -> None:
    """A lone surrogate (an unpaired \\ud800-\\udfff escape) is no character: refuse it here, not in the tokenizer."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        escape = f"\\u{ord(e.object[e.start]):04x}"
        message = f"Failed to parse the request body as JSON: a lone surrogate {escape} (not Unicode)"
        raise HttpError(400, message) from None
