"""Rank 0's handle on ranks 1..N-1 of a sharded engine: spawns them, hands each step to them, notices a rank
that died or hung, and stops them all (on close, at interpreter exit, or after a failure: no orphans).

Steps travel on one pipe per rank (pickled once), so an idle engine holds no collective open and a rank
that goes away shows as a broken pipe; the tensors themselves move through the process group.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import pickle
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from engine.config import EngineConfig
from engine.distributed import check_not_initialized, join_group, leave_group, open_store
from engine.model_source import ModelFiles
from engine.parallel import ParallelState
from engine.parallel_config import ParallelConfig
from engine.tp_worker import WorkerSpec, worker_main

logger = logging.getLogger(__name__)
STOP_TIMEOUT_S = 10.0  # for the ranks to leave after the stop message, before they are killed


class TensorParallelGroup:
    def __init__(self, config: EngineConfig, parallel: ParallelConfig, files: ModelFiles, max_model_len: int):
        self.parallel = parallel
        self.procs: list[BaseProcess] = []
        self.conns: list[Connection] = []
        self.failure: BaseException | None = None
        self.closed = self.joined = False
        check_not_initialized()
        store = open_store(parallel.port_range, parallel.world_size, parallel.timeout_s)
        self.port = store.port
        atexit.register(self.close)
        ctx = multiprocessing.get_context("spawn")
        level = logging.getLogger().getEffectiveLevel()
        try:
            for rank in range(1, parallel.world_size):
                conn, child = ctx.Pipe()
                spec = WorkerSpec(rank, parallel, store.port, config, files, max_model_len, level)
                proc = ctx.Process(target=worker_main, args=(spec, child), name=f"tp-rank-{rank}", daemon=True)
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(conn)
            self._expect("hello")
            self.state: ParallelState = join_group(parallel, 0, store)
            self.joined = True
        except BaseException:
            self.close()
            raise
        logger.info("tensor parallelism: %d ranks over %s (rendezvous port %d)",
                    parallel.world_size, parallel.backend, self.port)  # fmt: skip

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    # ---- start-up ---------------------------------------------------------------------------

    def _expect(self, what: str) -> None:
        """Wait for every rank to report `what`; raise on an error report, an exit or the timeout."""
        deadline = time.monotonic() + self.parallel.timeout_s
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while True:
                ready = wait([conn, proc.sentinel], max(0.0, deadline - time.monotonic()))
                message = self._recv(conn) if conn in ready else None
                if message is not None and message[0] == what:
                    break
                if message is not None and message[0] == "error":
                    raise _error(rank, message)
                if ready and message is None:  # the pipe closed or the process exited
                    proc.join(5.0)
                    raise RuntimeError(
                        f"tensor-parallel rank {rank} exited with code {proc.exitcode} while starting (its log says "
                        'why; a script that starts a sharded engine needs an `if __name__ == "__main__":` guard)'
                    )
                if not ready:
                    raise RuntimeError(f"tensor-parallel rank {rank} did not start in {self.parallel.timeout_s:.0f}s")

    def wait_ready(self) -> None:
        """Every rank loaded its shard and allocated its KV cache."""
        self._expect("ready")

    def startup_error(self, wait_s: float = 2.0) -> Exception | None:
        """The first error a rank reported while starting (after rank 0 failed), if any."""
        deadline = time.monotonic() + wait_s
        for rank, conn in enumerate(self.conns, start=1):
            while conn.poll(max(0.0, deadline - time.monotonic())):
                message = self._recv(conn)
                if message is None:
                    break
                if message[0] == "error":
                    return _error(rank, message)
        return None

    @staticmethod
    def _recv(conn: Connection) -> tuple | None:
        try:
            return conn.recv()
        except (EOFError, OSError):
            return None

    # ---- steps ------------------------------------------------------------------------------

    def send(self, step: object) -> None:
        """Hand one step to every other rank."""
        if self.failure is not None:
            raise RuntimeError(f"the tensor-parallel group failed earlier ({self.failure}); start a new engine")
        payload = pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)
        for conn in self.conns:
            conn.send_bytes(payload)  # a rank that died: BrokenPipeError, which the engine passes to fail()

    def fail(self, error: Exception) -> Exception:
        """Mark the group unusable after a failed step; the error to raise, naming a rank that died."""
        if self.failure is not None:  # failed before: `error` already says so
            return error
        dead = self._exited(wait_s=1.0)  # a killed rank: let its exit show
        self.failure = RuntimeError(f"{dead}: {error}" if dead else f"a tensor-parallel step failed: {error}")
        return self.failure

    def _exited(self, wait_s: float = 0.0) -> str | None:
        """'tensor-parallel rank R exited with code C' for the first rank that exited, else None."""
        gone = wait([p.sentinel for p in self.procs], timeout=wait_s)  # readable once a process has ended
        for rank, proc in enumerate(self.procs, start=1):
            if proc.sentinel in gone:
                proc.join(1.0)
                return f"tensor-parallel rank {rank} exited with code {proc.exitcode}"
        return None

    def check(self) -> None:
        """Raise if the group failed or any rank has exited (an idle engine notices a dead rank too)."""
        if self.failure is not None:
            raise RuntimeError(f"the tensor-parallel group failed earlier: {self.failure}")
        dead = self._exited()
        if dead:
            self.failure = RuntimeError(dead)
            raise self.failure

    # ---- stopping ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every rank: in order when the group is healthy, killed otherwise; then leave the group."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if self.failure is None:
            payload = pickle.dumps(None)
            for conn in self.conns:
                try:
                    conn.send_bytes(payload)
                except OSError:
                    pass
            deadline = time.monotonic() + STOP_TIMEOUT_S
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL: also ends a rank stopped or hung inside a collective
            proc.join()
        for conn in self.conns:
            conn.close()
        if self.joined:
            leave_group()


def _error(rank: int, message: tuple) -> Exception:
    _, kind, text = message
    return (ValueError if kind == "model" else RuntimeError)(f"tensor-parallel rank {rank}: {text}")
