"""A tensor-parallel rank other than 0: a spawned process that loads its shard of the model and runs every
step rank 0 sends it (same forward, same collectives, no sampling) until told to stop.

It reports ("hello"), then ("ready") or ("error", kind, text) on its pipe. It never outlives rank 0: a closed
pipe, a failed collective or the parent's exit (a watchdog thread) ends it with code 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING

from engine.config import EngineConfig
from engine.model_source import ModelFiles
from engine.parallel_config import ParallelConfig

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    parallel: ParallelConfig
    port: int  # rank 0's rendezvous store
    config: EngineConfig
    files: ModelFiles
    max_model_len: int
    log_level: int


def _exit_with_parent() -> None:
    """A watchdog thread: when rank 0's process is gone, exit at once (even inside a hung collective)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        logger.error("rank 0 exited; exiting")
        _exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _exit(code: int) -> None:
    """Leave without running the process group's destructors (they may block on a dead peer)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """multiprocessing target of rank `spec.rank`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops every rank in order
    _exit_with_parent()
    logging.basicConfig(
        level=spec.log_level, format=f"%(asctime)s %(levelname)s [tp rank {spec.rank}] %(name)s: %(message)s"
    )
    conn.send(("hello",))
    from engine.distributed import connect_store, join_group, leave_group
    from engine.model_runner import ModelRunner
    from engine.model_source import load_hf_config

    try:
        store = connect_store(spec.port, spec.parallel.world_size, spec.parallel.timeout_s)
        state = join_group(spec.parallel, spec.rank, store)
        hf_config = load_hf_config(spec.files, spec.config.trust_remote_code)
        runner = ModelRunner(spec.config, spec.files, hf_config, spec.max_model_len, state)
    except Exception as e:
        model_problem = isinstance(e, (ValueError, FileNotFoundError))
        if not model_problem:
            logger.exception("start-up failed")
        try:
            text = str(e) if model_problem else f"{type(e).__name__}: {e}"
            conn.send(("error", "model" if model_problem else "fatal", text))
        except OSError:
            pass
        _exit(2 if model_problem else 1)
    conn.send(("ready",))
    code = follow(runner, conn)
    if code == 0:
        leave_group()
    _exit(code)


def follow(runner: ModelRunner, conn: Connection) -> int:
    """Run each step rank 0 sends until it sends None (0), goes away, or a step fails (1)."""
    while True:
        try:
            step = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            logger.error("rank 0 closed the pipe; exiting")
            return 1
        if step is None:
            return 0
        try:
            runner.run(step)
        except Exception:
            logger.exception("a step failed; exiting")
            return 1
