"""Every numeric request parameter at the edges (0, the denormal 5e-324, 1e-300, 1e300, -1, 2**63, 2**64, 10**30) on
TGI, chat and completions routes of a real `serve`, and the requests that used to crash the engine (a temperature or
repetition penalty of 1e-300 with sampling). Each answer is 200 or 422 with a JSON body, never 5xx (nor 424: the
engine must not fail on any value validation lets through), and after each one /ping is 200 and a plain request is
served.

Where validation decides, the status is exact; where a value reaches the engine (tiny or huge temperatures and
penalties, tiny top_p), 200 is expected and 422 is allowed (the engine may refuse what it cannot honour).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability._http import Reply, error_body, post_json, request
from tests.support.serve_process import Serve, running_serve

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

VALUES: list[Any] = [0, 5e-324, 1e-300, 1e300, -1, 2**63, 2**64, 10**30, 10**400]  # 10**400: 401 digits
ENGINE_EDGE = {200, 422}  # reaches the engine: served, or refused with a reason


def real(ok: Callable[[Any], bool]) -> Callable[[Any], int]:
    """A float parameter: an integer no float holds (10**400) is 422 before `ok`."""
    return lambda v: 200 if not (isinstance(v, int) and abs(v) > sys.float_info.max) and ok(v) else 422


positive = real(lambda v: v > 0)
open_unit = real(lambda v: 0 < v < 1)  # TGI's top_p / typical_p


def whole(ok: Callable[[int], bool]) -> Callable[[Any], int]:
    """An integer parameter: floats with a fraction, or too big for int64 as a float, are 422 before `ok`."""
    return lambda v: 200 if isinstance(v, int) and ok(v) else 422


# parameter -> (expected status for a value, whether a passing value reaches the engine's sampler)
TGI: dict[str, tuple[Callable[[Any], int], bool]] = {
    "temperature": (positive, True),
    "repetition_penalty": (positive, True),
    "frequency_penalty": (real(lambda v: -2 <= v <= 2), True),
    "top_k": (whole(lambda v: v > 0 and v < 2**63), True),
    "top_p": (open_unit, True),
    "typical_p": (open_unit, True),
    "max_new_tokens": (whole(lambda v: 0 < v <= 4), False),
    "truncate": (whole(lambda v: 0 < v < 511), False),
    "top_n_tokens": (whole(lambda v: 0 <= v <= 5), False),
    "best_of": (whole(lambda v: v == 1), False),
    "seed": (whole(lambda v: 0 <= v < 2**64), False),
}
CHAT: dict[str, tuple[Callable[[Any], int], bool]] = {
    "temperature": (real(lambda v: 0 <= v <= 2), True),
    "top_p": (real(lambda v: 0 < v <= 1), True),
    "frequency_penalty": (real(lambda v: -2 <= v <= 2), True),
    "presence_penalty": (real(lambda v: v == 0), False),
    "max_tokens": (whole(lambda v: 0 < v <= 4), False),
    "max_completion_tokens": (whole(lambda v: 0 < v <= 4), False),
    "n": (whole(lambda v: 0 < v <= 4), False),
    "seed": (whole(lambda v: 0 <= v < 2**64), False),
    "top_logprobs": (whole(lambda v: 0 <= v <= 5), False),
}
COMPLETIONS = {
    **{k: v for k, v in CHAT.items() if k not in ("max_completion_tokens", "top_logprobs")},
    "repetition_penalty": (positive, True),
    "logprobs": (whole(lambda v: 0 <= v <= 5), False),
    "best_of": (whole(lambda v: v == 1), False),
}


@pytest.fixture(scope="module")
def server(random_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    with running_serve(random_model, tmp_path_factory.mktemp("edges"), MAX_TOTAL_TOKENS="512") as s:
        yield s


def tgi_body(name: str, value: Any, sample: bool) -> dict[str, Any]:
    params: dict[str, Any] = {"max_new_tokens": 4, name: value}
    if sample:
        params["do_sample"] = True
    return {"inputs": "Hello there", "parameters": params}


def chat_body(name: str, value: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 4, name: value}
    if name == "top_logprobs":
        body["logprobs"] = True
    return body


def completion_body(name: str, value: Any) -> dict[str, Any]:
    return {"prompt": "Hello there", "max_tokens": 4, name: value}


def check(server: Serve, reply: Reply, expected: int, engine: bool, what: str) -> None:
    allowed = ENGINE_EDGE if engine and expected == 200 else {expected}
    assert reply.status in allowed, (what, reply.status, reply.body[:300], server.log()[-3000:])
    if reply.status != 200:
        error_body(reply, reply.status)
    elif reply.headers["content-type"].startswith("text/event-stream"):
        assert not any(isinstance(e, dict) and "error" in e for e in reply.events()), (what, reply.body[-300:])
    assert request(server.port, "GET", "/ping", content_type=None).status == 200, (what, server.log()[-3000:])
    if engine:  # the engine took it: it still serves the next request
        plain = post_json(server.port, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
        assert plain.status == 200, (what, plain.body)


@pytest.mark.parametrize("name", list(TGI))
def test_tgi_parameters(server: Serve, name: str) -> None:
    rule, engine = TGI[name]
    for value in VALUES:
        for sample in (False, True) if engine else (False,):
            route = "/invocations" if sample else "/generate"  # the SageMaker route takes the sampled variants
            reply = post_json(server.port, route, tgi_body(name, value, sample))
            check(server, reply, rule(value), engine, f"{route} {name}={value!r} do_sample={sample}")


@pytest.mark.parametrize("name", list(CHAT))
def test_chat_parameters(server: Serve, name: str) -> None:
    rule, engine = CHAT[name]
    for value in VALUES:
        reply = post_json(server.port, "/v1/chat/completions", chat_body(name, value))
        check(server, reply, rule(value), engine, f"chat {name}={value!r}")


@pytest.mark.parametrize("name", list(COMPLETIONS))
def test_completions_parameters(server: Serve, name: str) -> None:
    rule, engine = COMPLETIONS[name]
    for value in VALUES:
        reply = post_json(server.port, "/v1/completions", completion_body(name, value))
        check(server, reply, rule(value), engine, f"completions {name}={value!r}")


CRASHERS = [
    ("/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 4, "temperature": 1e-300}}),
    ("/generate_stream", {"inputs": "Hello there", "parameters": {"max_new_tokens": 4, "temperature": 1e-300}}),
    ("/invocations", {"inputs": "Hello there", "parameters": {"max_new_tokens": 4, "temperature": 1e-300}}),
    ("/", {"inputs": "Hello there", "parameters": {"max_new_tokens": 4, "temperature": 1e-300}, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1e-300}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 4, "temperature": 1e-300, "stream": True}),
    ("/invocations", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 1e-300}),
    (
        "/generate",
        {"inputs": "Hello there", "parameters": {"max_new_tokens": 4, "repetition_penalty": 1e-300, "do_sample": True}},
    ),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 4, "repetition_penalty": 1e-300}),
    ("/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 4, "temperature": 5e-324, "top_k": 5}}),
]


@pytest.mark.parametrize(("route", "body"), CRASHERS)
def test_requests_that_crashed_the_engine(server: Serve, route: str, body: dict[str, Any]) -> None:
    check(server, post_json(server.port, route, body), 200, True, f"{route} {body}")
