"""Client disconnects: closing a streamed response (what gunicorn does when the client goes away)
aborts the engine request and frees its KV blocks, whether the stream had started or not; the
request is logged and counted as cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder

from tests.support.served_app import Served


@pytest.fixture
def slow_steps(serve_env: Served, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each engine step takes 20 ms, so a 100-token request is still running when the client leaves."""
    real_step, calls = serve_env.engine.step, [0]

    def step() -> list:
        calls[0] += 1
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(serve_env.engine, "step", step)
    return calls


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


STREAMS = [
    ("/generate_stream", {"inputs": "Hello world", "parameters": {"max_new_tokens": 100}}),
    ("/invocations", {"inputs": "Hello world", "parameters": {"max_new_tokens": 100}, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100, "stream": True}),
    ("/v1/completions", {"prompt": "Hello", "max_tokens": 100, "stream": True, "n": 2}),
]


@pytest.mark.parametrize(("route", "body"), STREAMS)
@pytest.mark.parametrize("frames_read", [0, 3])
def test_disconnect_aborts_and_frees_kv(
    serve_env: Served, api: FlaskClient, slow_steps: list[int], route: str, body: dict, frames_read: int
) -> None:
    engine, blocks = serve_env.engine, serve_env.engine.block_manager
    r = api.post(route, json=body, buffered=False)
    assert r.status_code == 200
    frames = iter(r.response)
    for _ in range(frames_read):
        assert next(frames).startswith(b"data:")
    assert engine.num_requests >= 1 and blocks.num_free_blocks < blocks.num_blocks
    r.close()  # the client went away
    assert wait_for(lambda: engine.num_requests == 0 and not engine.has_unfinished_requests())
    assert wait_for(lambda: blocks.num_free_blocks == blocks.num_blocks and serve_env.client.num_in_flight == 0)
    assert slow_steps[0] < 60, "the request ran to completion instead of being aborted"


def test_disconnect_is_counted_as_cancelled(serve_env: Served, slow_steps: list[int]) -> None:
    app = serve_env.app()
    client = app.test_client()
    r = client.post("/generate_stream", json=STREAMS[0][1], buffered=False)
    next(iter(r.response))
    r.close()
    text = client.get("/metrics").get_data(as_text=True)
    assert 'tgi_request_failure_total{err="cancelled"} 1.0' in text
    assert serve_env.idle()


def test_close_before_the_body_is_read_aborts(serve_env: Served, slow_steps: list[int]) -> None:
    """The WSGI server may close the body without ever iterating it: the request is still aborted."""
    app = serve_env.app()
    environ = EnvironBuilder(path="/generate_stream", method="POST", json=STREAMS[0][1]).get_environ()
    statuses: list[str] = []
    body = app(environ, lambda status, headers, exc_info=None: statuses.append(status))
    assert statuses == ["200 OK"] and serve_env.engine.num_requests == 1
    body.close()  # type: ignore[attr-defined]
    assert wait_for(lambda: serve_env.engine.num_requests == 0)
    assert serve_env.idle()
