"""PAYLOAD_LIMIT on the bytes actually read, whatever the framing, on every route that takes a body: over the limit
is 413 with a Content-Length, chunked (no Content-Length), and with a Content-Length that claims more than the limit
while little is sent; never a truncated body parsed as if whole. A body of exactly the limit is served, and a body
shorter than its Content-Length is a 400, not a hang.
"""

from __future__ import annotations

import json

import pytest

from tests.reliability._http import POST_ROUTES, error_body, head, raw, request
from tests.reliability.limits import PAYLOAD_LIMIT
from tests.support.serve_process import Serve

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

BODIES = {
    "/tokenize": {"inputs": "Hello there"},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2},
    "/v1/completions": {"prompt": "Hello there", "max_tokens": 2},
}
TGI = {"inputs": "Hello there", "parameters": {"max_new_tokens": 2}}


def valid(route: str) -> bytes:
    return json.dumps(BODIES.get(route, TGI)).encode()


def padded(route: str, size: int) -> bytes:
    """A valid body of exactly `size` bytes (JSON whitespace after the object)."""
    body = valid(route)
    return body + b" " * (size - len(body))


def pieces(data: bytes, size: int = 8192) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def over_limit_json(route: str) -> bytes:
    """A well-formed body one byte over the limit (a long string under an ignored key)."""
    body = json.dumps({**json.loads(valid(route)), "x": ""}).encode()
    return body[:-2] + b"y" * (PAYLOAD_LIMIT + 1 - len(body)) + b'"}'


@pytest.mark.parametrize("route", POST_ROUTES)
def test_over_the_limit_with_content_length_is_413(shared: Serve, route: str) -> None:
    body = over_limit_json(route)
    assert len(body) == PAYLOAD_LIMIT + 1
    msg = error_body(request(shared.port, "POST", route, body), 413, "payload_too_large")
    assert str(PAYLOAD_LIMIT) in msg


@pytest.mark.parametrize("route", POST_ROUTES)
def test_over_the_limit_chunked_is_413(shared: Serve, route: str) -> None:
    body = over_limit_json(route)
    error_body(request(shared.port, "POST", route, pieces(body)), 413, "payload_too_large")


@pytest.mark.parametrize("route", POST_ROUTES)
def test_valid_json_then_junk_past_the_limit_chunked_is_413_not_a_truncated_parse(shared: Serve, route: str) -> None:
    """The first PAYLOAD_LIMIT bytes are a valid body; what follows must not be dropped silently."""
    body = padded(route, PAYLOAD_LIMIT) + b"junk"
    error_body(request(shared.port, "POST", route, pieces(body)), 413, "payload_too_large")


@pytest.mark.parametrize("route", POST_ROUTES)
def test_exactly_the_limit_is_served(shared: Serve, route: str) -> None:
    body = padded(route, PAYLOAD_LIMIT)
    for framed in (body, pieces(body)):  # with a Content-Length, then chunked
        reply = request(shared.port, "POST", route, framed)
        assert reply.status == 200, reply.body[:300]


@pytest.mark.parametrize("route", ["/generate", "/v1/chat/completions", "/tokenize"])
def test_a_content_length_over_the_limit_is_413_before_the_body_arrives(shared: Serve, route: str) -> None:
    """The header alone decides: the server answers without waiting for bytes that never come."""
    headers = {"Content-Type": "application/json", "Content-Length": str(PAYLOAD_LIMIT + 1)}
    reply = raw(shared.port, head(route, shared.port, headers), valid(route), timeout=10)
    error_body(reply, 413, "payload_too_large")


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/tokenize"])
def test_a_body_shorter_than_its_content_length_is_400(shared: Serve, route: str) -> None:
    """The client announces more than it sends and stops sending: a clear 400, not a parse of what came."""
    body = valid(route)
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body) + 100)}
    reply = raw(shared.port, head(route, shared.port, headers), body, shut_write=True, timeout=10)
    msg = error_body(reply, 400, "bad_request")
    assert str(len(body) + 100) in msg, msg


def test_the_server_is_healthy_afterwards(shared: Serve) -> None:
    assert shared.status("/ping") == 200
    assert request(shared.port, "POST", "/generate", valid("/generate")).status == 200
