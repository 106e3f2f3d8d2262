"""The real `serve` under pressure: more streams than MAX_CONCURRENT_REQUESTS (only 200 and 429, every admitted
stream complete, /ping 200 throughout), more KV than the cache holds (preemption, yet every output token-identical to
the same request run alone) and a storm of clients hanging up mid-stream (every request leaves the engine and the KV
cache returns to idle).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.reliability._http import Probe, Reply, error_body, post_json, request, summary
from tests.reliability.limits import KV_TOKENS, MAX_CONCURRENT, SHARED
from tests.support.serve_process import Serve

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

# Prompts whose greedy answers run to 300 tokens on the shared random model (no early EOS needed, but more KV).
PROMPTS = [f"Request {i}: tell me about topic {i}." for i in (1, 2, 3, 6, 7)] + ["Hello there"]


def metric(server: Serve, name: str) -> float:
    text = request(server.port, "GET", "/metrics", content_type=None).body.decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_idle(server: Serve, timeout: float) -> float:
    """Seconds until the engine reports no request in flight and no KV block in use."""
    started = time.monotonic()
    while metric(server, "llm_requests_in_flight") != 0 or metric(server, "llm_kv_cache_usage_ratio") != 0.0:
        assert time.monotonic() - started < timeout, "requests or KV blocks were left behind"
        time.sleep(0.05)
    return time.monotonic() - started


def run_all(jobs: list[Any]) -> list[Any]:
    """Run the callables at once (released together); their results in order."""
    results: list[Any] = [None] * len(jobs)
    gate = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        gate.wait()
        try:
            results[i] = jobs[i]()
        except Exception as e:  # reported by the caller's asserts
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


OVERLOAD_REQUESTS = [
    ("/generate_stream", {"inputs": "Hello there", "parameters": {"max_new_tokens": 200}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "stream": True}),
    ("/v1/completions", {"prompt": "Hello there", "max_tokens": 200, "stream": True}),
    ("/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 200}}),
    ("/invocations", {"inputs": "Hello there", "parameters": {"max_new_tokens": 200}, "stream": True}),
]


def test_more_streams_than_the_limit_get_only_200_and_429(shared: Serve) -> None:
    n = 4 * MAX_CONCURRENT
    kinds = [OVERLOAD_REQUESTS[i % len(OVERLOAD_REQUESTS)] for i in range(n)]
    jobs = [lambda r=r: post_json(shared.port, *r) for r in kinds]
    probe = Probe(shared.port, interval=0.05).start()
    replies: list[Reply] = run_all(jobs)
    pings = probe.stop()
    statuses = [r.status if isinstance(r, Reply) else repr(r) for r in replies]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= 1 and statuses.count(200) >= 1, statuses
    for reply in replies:
        if reply.status == 429:
            assert error_body(reply, 429, "overloaded") == "Model is overloaded"
        elif reply.headers["content-type"].startswith("text/event-stream"):
            events = reply.events()
            assert not any(isinstance(e, dict) and "error" in e for e in events), events[-1]
            last = [e for e in events if e != "[DONE]"][-1]
            finished = last.get("generated_text") is not None or any(
                c.get("finish_reason") for c in last.get("choices", [])
            )
            assert finished or events[-1] == "[DONE]", last
        else:
            assert reply.json()["generated_text"] is not None
    assert pings and {s for _, s, _ in pings} == {200}, summary(pings)
    assert max(latency for *_, latency in pings) < 1.0, "a health check waited behind the streams"
    wait_idle(shared, 30)


def test_ping_is_answered_while_slow_clients_hold_every_thread(shared: Serve) -> None:
    """Clients that send headers and then stall hold a worker thread each; with more of them than threads, /ping
    must still be answered at once (it never waits in the pool's queue), and the stalled requests end with a 400."""
    stalled = []
    for _ in range(5 * int(SHARED["SERVE_THREADS"])):  # two workers: more than twice their threads
        sock = socket.create_connection(("127.0.0.1", shared.port), timeout=30)
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
        )
        stalled.append(sock)
    try:
        time.sleep(0.5)  # every thread is now blocked reading a body that does not come
        for _ in range(10):
            began = time.monotonic()
            reply = request(shared.port, "GET", "/ping", content_type=None, timeout=5)
            assert reply.status == 200 and time.monotonic() - began < 1.0, (reply.status, time.monotonic() - began)
    finally:
        for sock in stalled:
            sock.shutdown(socket.SHUT_WR)  # the body ends early: each is answered 400
        answers = []
        for sock in stalled:
            answers.append(sock.recv(64).split(b" ", 2)[1:2])
            sock.close()
    assert answers == [[b"400"]] * len(stalled), answers
    wait_idle(shared, 30)


def generate(server: Serve, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    reply = post_json(server.port, "/generate", body, timeout=180)
    assert reply.status == 200, reply.body[:300]
    details = reply.json()["details"]
    return {"ids": [t["id"] for t in details["tokens"]], "finish": details["finish_reason"]}


def test_kv_exhaustion_preempts_yet_every_output_equals_its_solo_run(shared: Serve) -> None:
    max_new = 300
    solo = [generate(shared, p, max_new) for p in PROMPTS]  # one at a time: no pressure
    assert len(PROMPTS) <= MAX_CONCURRENT and sum(len(s["ids"]) for s in solo) > KV_TOKENS
    before = metric(shared, "llm_preemptions_total")
    together = run_all([lambda p=p: generate(shared, p, max_new) for p in PROMPTS])
    assert metric(shared, "llm_preemptions_total") > before, "the cache never ran out: the test proves nothing"
    for prompt, alone, crowded in zip(PROMPTS, solo, together):
        assert crowded == alone, f"{prompt!r}: preemption changed the output"
    wait_idle(shared, 30)


def hang_up_after_first_event(server: Serve, path: str, body: dict[str, Any]) -> int:
    """Open a stream, read until its first event, then close the socket without a word; -> the status."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        payload = json.dumps(body).encode()
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        received = b""
        while b"data:" not in received and b"\r\n\r\n{" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        return int(received.split(b" ", 2)[1])
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
        sock.close()


def access_lines(server: Serve) -> list[dict[str, Any]]:
    """The access log's JSON lines so far (one per request, written when its response closes)."""
    return [json.loads(line) for line in server.log().splitlines() if line.startswith('{"id":')]


def test_disconnect_storm_returns_the_kv_cache_to_idle(shared: Serve) -> None:
    """Waves of clients hang up after their stream's first event: each such request is logged cancelled having
    generated a fraction of what it asked (the engine aborted it), and the KV cache is back to idle after each wave."""
    wait_idle(shared, 30)
    long = 480  # the chat prompt's tokens + 480 fit the 512-token context
    kinds = [
        ("/generate_stream", {"inputs": "Hello there", "parameters": {"max_new_tokens": long}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": long, "stream": True}),
        ("/v1/completions", {"prompt": "Hello there", "max_tokens": long, "stream": True}),
    ]
    for _ in range(3):  # waves: the slots freed by one wave's hang-ups are taken by the next
        seen = len(access_lines(shared))
        wave = [kinds[i % len(kinds)] for i in range(4 * MAX_CONCURRENT)]
        statuses = run_all([lambda k=k: hang_up_after_first_event(shared, *k) for k in wave])
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        wait_idle(shared, 30)
        deadline = time.monotonic() + 10
        while len(lines := access_lines(shared)[seen:]) < len(statuses):
            assert time.monotonic() < deadline, lines
            time.sleep(0.05)
        hung_up = [line for line in lines if line["status"] == 200]
        assert len(hung_up) == statuses.count(200), lines
        for line in hung_up:  # aborted, not run to the end (a stream may also have met EOS early)
            assert line["error_type"] == "cancelled" or line["finish_reason"] == "eos_token", line
            assert line["generated_tokens"] < long / 2, line
    assert metric(shared, "llm_kv_cache_usage_ratio") == 0.0
    reply = post_json(shared.port, "/generate", {"inputs": "Hello there", "parameters": {"max_new_tokens": 4}})
    assert reply.status == 200


def test_the_soak_command_against_this_server(shared: Serve, tmp_path: Path) -> None:
    """`python -m serve.soak` in miniature (`--url`): it reports the run, finds every process and passes."""
    from serve import soak

    out = tmp_path / "soak.json"
    argv = ["--url", f"http://127.0.0.1:{shared.port}", "--minutes", "0.1", "--streams", str(2 * MAX_CONCURRENT)]
    with pytest.raises(SystemExit) as exit_:
        soak.main([*argv, "--warmup", "1", "--window", "2", "--max-new-tokens", "16", "--output", str(out)])
    report = json.loads(out.read_text())
    assert exit_.value.code == 0, report["verdict"]
    assert set(report["rss"]) == {"launcher", "engine", "gunicorn", "worker0", "worker1"}
    assert report["requests"] > 0 and set(report["by_status"]) <= {"200", "429"} and len(report["windows"]) == 3
    assert report["kv_cache"]["usage_at_idle"] == 0.0
    with pytest.raises(SystemExit, match="loopback"):
        soak.main(["--url", "http://10.1.2.3:8080", "--minutes", "0.1"])
