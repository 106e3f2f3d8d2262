"""The engine process and ZmqEngineClient together, without HTTP: streaming, admission errors, abort on close,
drain and stop over the launcher's pipe, and the client's view of an engine that died.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from serve.engine_process import run
from serve.engine_protocol import (
    EngineRequest,
    GenerationError,
    ModelInfo,
    OverloadedError,
    UnavailableError,
    ValidationError,
)
from serve.engine_server import EngineProcessConfig, EngineServer
from serve.ipc import Addresses, EngineFacts
from serve.zmq_client import ZmqEngineClient
from tests.support.serve_process import write_chain_model

pytestmark = pytest.mark.integration

INFO = ModelInfo("chain", "float32", "cpu", 100, 200, 1000, 100, 2, [1])


@dataclass
class Engine:
    proc: BaseProcess
    conn: Connection
    facts: EngineFacts
    client: ZmqEngineClient


def start_engine(model: Path, runtime: Path, max_concurrent: int = 2, stale_after: float = 1.0) -> Engine:
    addresses = Addresses.in_dir(str(runtime))
    config = EngineProcessConfig(
        EngineConfig(model=str(model), dtype="float32", max_batch_total_tokens=8192, num_threads=1),
        addresses,
        max_concurrent,
    )
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=run, args=(config, child), daemon=True)
    proc.start()
    child.close()
    assert conn.poll(120), "the engine did not report"
    kind, facts = conn.recv()
    assert kind == "ready", facts
    client = ZmqEngineClient(addresses, INFO, stale_after=stale_after)
    assert client.wait_for_stats(10) is not None
    return Engine(proc, conn, facts, client)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chain_model(tmp_path_factory.mktemp("chain"))


@pytest.fixture(scope="module")
def engine(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    e = start_engine(model, tmp_path_factory.mktemp("rt"))
    yield e
    if e.proc.is_alive():
        e.conn.send("stop")
        e.proc.join(10)
    e.client.close()
    assert e.proc.exitcode == 0


def request(rid: str, max_new_tokens: int, prompt: list[int] | None = None) -> EngineRequest:
    return EngineRequest(rid, prompt or [0, 5, 6], SamplingParams(max_new_tokens=max_new_tokens), time.monotonic())


def wait_until(predicate, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_stream_reports_every_token_and_timings(engine: Engine) -> None:
    assert engine.facts.max_model_len == 2048
    events = list(engine.client.generate(request("a", 12)))
    assert [len(e.token_ids) for e in events] == [1] * 12
    last = events[-1]
    assert last.finished and last.finish_reason == "length" and last.num_generated_tokens == 12
    assert last.request_id == "a" and last.generated_text == "".join(e.text for e in events)
    assert set(last.timings) >= {"queue", "first_token", "total"} and last.timings["total"] >= last.timings["queue"]


def test_admission_errors_raise_on_first_next(engine: Engine) -> None:
    bad = engine.client.generate(request("bad", 4, prompt=[10_000]))
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        next(bad)
    streams = [engine.client.generate(request(f"long{i}", 2000)) for i in range(2)]
    for stream in streams:
        next(stream)
    with pytest.raises(OverloadedError):
        next(engine.client.generate(request("third", 4)))
    for stream in streams:  # closing early aborts: the engine frees both slots
        stream.close()
    wait_until(lambda: (s := engine.client.stats()) is not None and s.in_flight == 0)
    assert len(list(engine.client.generate(request("after", 3)))) == 3


def test_drain_refuses_new_requests_and_reports_drained(engine: Engine) -> None:
    stream = engine.client.generate(request("inflight", 300))
    next(stream)
    engine.conn.send("drain")
    wait_until(lambda: (s := engine.client.stats()) is not None and s.draining)
    with pytest.raises(UnavailableError, match="shutting down"):
        next(engine.client.generate(request("late", 3)))
    rest = list(stream)
    assert rest[-1].finished and rest[-1].num_generated_tokens == 300
    assert engine.conn.poll(10) and engine.conn.recv() == ("drained",)


def test_engine_death_fails_streams_and_stales_stats(model: Path, tmp_path: Path) -> None:
    e = start_engine(model, tmp_path, stale_after=60)  # the dropped connection tells, long before stats go stale
    stream = e.client.generate(request("doomed", 2000))
    next(stream)
    e.proc.kill()
    e.proc.join()
    started = time.monotonic()
    with pytest.raises(GenerationError, match="stopped answering"):
        list(stream)
    assert time.monotonic() - started < 5
    assert e.client.stats() is None
    with pytest.raises(UnavailableError):
        next(e.client.generate(request("later", 3)))
    e.client.close()


def test_stop_fails_what_is_in_flight_and_exits_zero(model: Path, tmp_path: Path) -> None:
    """The launcher's "stop" after a drain timeout: streams end with an error, the engine exits cleanly."""
    e = start_engine(model, tmp_path)
    stream = e.client.generate(request("cut", 2000))
    next(stream)
    e.conn.send("stop")
    with pytest.raises(GenerationError, match="shutting down"):
        list(stream)
    e.proc.join(20)
    assert e.proc.exitcode == 0
    e.client.close()


class ExplodingEngine:
    """Stands in for LLMEngine: accepts requests, then its first step raises."""

    scheduler = SimpleNamespace(num_waiting=0, num_running=0, num_preemptions=0)
    block_manager = SimpleNamespace(usage=0.0, num_blocks=1, hit_tokens=0)

    def __init__(self) -> None:
        self.requests: set[str] = set()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str) -> str:
        self.requests.add(request_id)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        self.requests.discard(request_id)
        return True

    def step(self) -> list:
        raise RuntimeError("boom")

    def check_health(self) -> None:  # one rank: always healthy
        pass


def test_step_exception_fails_in_flight_requests_and_exits_1(tmp_path: Path) -> None:
    addresses = Addresses.in_dir(str(tmp_path))
    conn, child = multiprocessing.Pipe()
    server = EngineServer(ExplodingEngine(), EngineProcessConfig(EngineConfig(), addresses, 4), child)  # type: ignore[arg-type]
    result: list[int] = []
    loop = threading.Thread(target=lambda: result.append(server.serve()))
    loop.start()
    client = ZmqEngineClient(addresses, INFO)
    try:
        assert client.wait_for_stats(10) is not None
        with pytest.raises(GenerationError, match="the engine failed: RuntimeError: boom"):
            next(client.generate(request("x", 4)))
        loop.join(10)
        assert result == [1]
    finally:
        client.close()
        server.close()
