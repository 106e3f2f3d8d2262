"""`serve`'s life as SageMaker sees it, probed with /ping every 20 ms from launch to exit: the probe is answered fast
in every state (loading, workers booting, ready, draining, engine dead), never left to time out;
- SIGTERM under load: in-flight streams all finish, /ping and new requests get 503 at once, exit 0;
- the engine killed (in steady state, and right after the first /ping 200 while a second worker may still be
  booting): /ping 503 within a second, generation requests 503 with a JSON body, then `serve` exits non-zero.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability._http import Probe, Reply, error_body, post_json, request, summary
from tests.support.serve_process import Serve, base_env, free_port, wait_gone, write_chain_model

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

CONTEXT = 1024
ANSWER_WITHIN_S = 1.0  # every probe; SageMaker gives a health check 2 s
DEAD_WITHIN_S = 1.0  # engine killed -> /ping 503


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Greedy output cycles forever (no EOS): streams last exactly as long as asked."""
    return write_chain_model(tmp_path_factory.mktemp("chain"), context=CONTEXT)


@pytest.fixture
def launch(chain: Path, tmp_path: Path) -> Iterator:
    servers: list[Serve] = []

    def start(**extra: str) -> tuple[Serve, Probe]:
        env = base_env(
            HF_MODEL_ID=str(chain), SM_OPT_ML_DIR=str(tmp_path / "opt_ml"), SAGEMAKER_BIND_TO_PORT=str(free_port()),
            DTYPE="float32", MAX_TOTAL_TOKENS=str(CONTEXT), MAX_CONCURRENT_REQUESTS="8", **extra,
        )  # fmt: skip
        (tmp_path / "opt_ml").mkdir(exist_ok=True)
        port = int(env["SAGEMAKER_BIND_TO_PORT"])
        probe = Probe(port).start()  # before the launcher exists: refused until it binds
        server = Serve(env, tmp_path / f"serve{len(servers)}.log")
        servers.append(server)
        return server, probe

    yield start
    for server in servers:
        server.close()


def wait_for(probe: Probe, server: Serve, status: int, timeout: float = 120) -> float:
    """Monotonic time of the first probe answered `status`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, s, _ in list(probe.samples):
            if s == status:
                return probe.started + t
        assert server.proc.poll() is None, server.log()[-3000:]
        time.sleep(0.01)
    raise AssertionError(f"/ping never answered {status}: {summary(probe.samples)}\n{server.log()[-3000:]}")


def check_answered(samples: list[tuple[float, int | str, float]], server: Serve) -> None:
    """Once the port opens it answers every probe, fast, until `serve` exits: no probe times out or is refused in
    between (a connection caught in the backlog as the port closes at exit may be reset)."""
    answered = [i for i, (_, s, _) in enumerate(samples) if isinstance(s, int)]
    assert answered, summary(samples)
    first, last = answered[0], answered[-1]
    assert all(s == "ConnectionRefusedError" for _, s, _ in samples[:first]), summary(samples)
    assert all(isinstance(s, int) for _, s, _ in samples[first : last + 1]), (summary(samples), server.log()[-3000:])
    assert all(s in ("ConnectionRefusedError", "ConnectionResetError") for _, s, _ in samples[last + 1 :]), summary(
        samples
    )
    slow = [(round(t, 2), s, round(lat, 3)) for t, s, lat in samples[first : last + 1] if lat > ANSWER_WITHIN_S]
    assert not slow, (slow, summary(samples))


def stream(server: Serve, tokens: int, first: threading.Event, out: list) -> None:
    body = {"inputs": "é", "parameters": {"max_new_tokens": tokens}}
    reply = post_json(server.port, "/generate_stream", body, timeout=120)
    out.append(reply)
    first.set()


def test_sigterm_under_load_finishes_every_stream_and_exits_0(launch) -> None:
    server, probe = launch(SERVE_WORKERS="2")
    ready_at = wait_for(probe, server, 200)
    tree = [server.ps, *server.descendants()]
    started, replies, threads = threading.Event(), [], []
    for i in range(6):
        t = threading.Thread(target=stream, args=(server, 300 + 20 * i, started, replies))
        t.start()
        threads.append(t)
    deadline = time.monotonic() + 90  # a loaded 2-core machine starts them slowly
    while metric_in_flight(server) < 6:
        assert time.monotonic() < deadline, "the streams never all started"
        time.sleep(0.05)
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    late = post_json(server.port, "/generate", {"inputs": "é", "parameters": {"max_new_tokens": 2}})
    assert error_body(late, 503, "unhealthy")
    for t in threads:
        t.join(120)
    assert server.wait_exit(60) == 0, server.log()[-3000:]
    samples = probe.stop()
    assert len(replies) == 6
    for i, reply in enumerate(sorted(replies, key=lambda r: len(r.body))):
        events = reply.events()
        assert reply.status == 200 and events[-1]["generated_text"] is not None, reply.body[-300:]
        assert len(events) == 300 + 20 * i  # every token, to the end
    check_answered(samples, server)
    after = [s for t, s, _ in samples if probe.started + t > sigterm_at + 0.3]
    assert after and all(s in (503, "ConnectionRefusedError", "ConnectionResetError") for s in after), summary(samples)
    assert {s for t, s, _ in samples if ready_at <= probe.started + t < sigterm_at} == {200}, summary(samples)
    assert wait_gone(tree) == []


def metric_in_flight(server: Serve) -> float:
    text = request(server.port, "GET", "/metrics", content_type=None).body.decode()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("llm_requests_in_flight "))


def engine_death(server: Serve, probe: Probe) -> None:
    tree = [server.ps, *server.descendants()]
    engine = server.engine_process()
    killed_at = time.monotonic()
    engine.kill()
    dead_at = wait_for_after(probe, server, 503, killed_at)
    assert dead_at - killed_at < DEAD_WITHIN_S, (dead_at - killed_at, summary(probe.samples))
    reply: Reply = post_json(server.port, "/generate", {"inputs": "é", "parameters": {"max_new_tokens": 2}})
    error_body(reply, 503, "unhealthy")
    code = server.wait_exit(60)
    time.sleep(0.2)
    samples = probe.stop()
    assert code not in (0, None), server.log()[-3000:]
    check_answered(samples, server)
    after = [s for t, s, _ in samples if probe.started + t > dead_at]
    assert set(after) <= {503, "ConnectionRefusedError", "ConnectionResetError"}, summary(samples)
    assert wait_gone(tree, timeout=30) == [], server.log()[-3000:]
    assert "engine process exited with code" in server.log()


def wait_for_after(probe: Probe, server: Serve, status: int, after: float, timeout: float = 10) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, s, _ in list(probe.samples):
            if s == status and probe.started + t >= after:
                return probe.started + t
        time.sleep(0.01)
    raise AssertionError(f"/ping never answered {status}: {summary(probe.samples)}\n{server.log()[-3000:]}")


def test_engine_killed_in_steady_state(launch) -> None:
    server, probe = launch(SERVE_WORKERS="1")
    wait_for(probe, server, 200)
    status, _ = server.post("/generate", {"inputs": "é", "parameters": {"max_new_tokens": 4}})
    assert status == 200
    engine_death(server, probe)


def test_engine_killed_right_after_the_first_200_while_workers_boot(launch) -> None:
    """Loading answers 503 fast with a JSON body (the port is open from the start), then the first 200; the engine
    dies at once, while the second worker may still be booting."""
    server, probe = launch(SERVE_WORKERS="2")
    wait_for(probe, server, 503, timeout=60)
    assert "loading" in error_body(request(probe.port, "GET", "/ping", content_type=None), 503, "unhealthy")
    error_body(post_json(probe.port, "/generate", {"inputs": "é"}), 503, "unhealthy")
    wait_for(probe, server, 200)
    loading = [s for _, s, _ in probe.samples if s != "ConnectionRefusedError"][:-1]
    assert loading and set(loading) == {503}, summary(probe.samples)
    engine_death(server, probe)
