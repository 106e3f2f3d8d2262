"""The process group of one sharded engine. Rank 0 binds the rendezvous store itself, on a port from the
configured range (else any free port), before any other rank learns it: two engines on one host never race
for a port. Every rank joins with the collective timeout; an NCCL failure names /dev/shm when it is small.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.device import rank_device
from engine.parallel import ParallelState
from engine.parallel_config import ParallelConfig

logger = logging.getLogger(__name__)
HOST = "127.0.0.1"  # the ranks of one engine share a host
SHM_PATH = "/dev/shm"
SHM_ENOUGH_BYTES = 512 << 20  # below this NCCL's shared-memory transport tends to fail (Docker's default: 64 MiB)


def open_store(port_range: tuple[int, int] | None, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on 127.0.0.1 at a port from `port_range` (None: any free port)."""
    low, high = port_range or (0, 0)  # port 0: the kernel picks a free one
    last: Exception | None = None
    for port in range(low, high + 1):
        try:
            return dist.TCPStore(
                HOST, port, world_size, is_master=True, timeout=timedelta(seconds=timeout_s), wait_for_workers=False
            )
        except dist.DistNetworkError as e:  # the port is taken: try the next one
            last = e
    raise RuntimeError(f"no free port in {low}-{high} for the tensor-parallel rendezvous: {last}")


def connect_store(port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(HOST, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s))


def shm_problem() -> str | None:
    """Why /dev/shm may break NCCL (missing or small), or None."""
    try:
        free = shutil.disk_usage(SHM_PATH).free
    except OSError:
        return f"{SHM_PATH} is missing"
    if free < SHM_ENOUGH_BYTES:
        return f"{SHM_PATH} has only {free >> 20} MiB free"
    return None


def check_not_initialized() -> None:
    if dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is already initialized in this process (another sharded engine is running?); "
            "close it first"
        )


def join_group(parallel: ParallelConfig, rank: int, store: dist.TCPStore) -> ParallelState:
    """Join the engine's process group as `rank` and check that every rank is reachable."""
    check_not_initialized()
    shm = shm_problem() if parallel.backend == "nccl" else None
    if parallel.backend == "nccl":
        torch.cuda.set_device(rank)
        if shm is not None and rank == 0:
            logger.warning("%s: NCCL may fail; give the container --shm-size 1g or --ipc host", shm)
    dist.init_process_group(
        parallel.backend,
        store=store,
        rank=rank,
        world_size=parallel.world_size,
        timeout=timedelta(seconds=parallel.timeout_s),
    )
    state = ParallelState(rank, parallel.world_size, dist.group.WORLD)
    try:  # the first collective builds the communicators: where NCCL without /dev/shm fails
        state.min_over_ranks(0, rank_device("cuda" if parallel.backend == "nccl" else "cpu", rank, parallel.world_size))
    except Exception as e:
        leave_group()
        hint = f" ({shm}: run the container with --shm-size 1g or --ipc host)" if shm else ""
        raise RuntimeError(f"tensor-parallel rank {rank} could not reach the other ranks over {parallel.backend}: "
                           f"{e}{hint}") from e  # fmt: skip
    return state


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
