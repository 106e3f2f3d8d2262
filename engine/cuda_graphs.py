"""Decode steps replayed as CUDA graphs: one graph per batch-size bucket, captured at start-up from static input
buffers (the attention backend's GraphBuffers) padded to the bucket. A step then costs one host->device copy and one
replay instead of a launch per kernel. Prefill and mixed steps run eagerly. With tensor parallelism every rank
captures the same buckets in the same order, so the all-reduces sit inside the graphs.
"""

from __future__ import annotations

import bisect
import logging
import math
from typing import TYPE_CHECKING

import torch

from engine.attention.base import attention_metadata
from engine.attention.triton_config import choose_num_kv_splits
from engine.step_input import StepInput

if TYPE_CHECKING:
    from engine.attention.triton import GraphBuffers
    from engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def forward_from_buffers(runner: ModelRunner, buffers: GraphBuffers, bucket: int, num_kv_splits: int) -> torch.Tensor:
    """The logits [bucket, V] of the decode step in `buffers`' overlay for `bucket` rows: what each graph captures
    (no host sync, no tensor built from host values; padding rows write and attend nothing)."""
    ids, positions, meta = buffers.views(bucket)
    meta.num_kv_splits = num_kv_splits
    with attention_metadata(meta):
        hidden = runner.model(ids, positions)
    return runner.model.compute_logits(hidden)


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, buckets: tuple[int, ...]) -> None:
        self.runner, self.buckets = runner, sorted(buckets)
        self.backend = runner.backend
        self.max_blocks = math.ceil(runner.max_model_len / runner.block_size)
        self.buffers = self.backend.graph_buffers(self.buckets[-1], self.max_blocks)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        dev = runner.device
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
        free_before = torch.cuda.mem_get_info(dev)[0]
        pool = None
        with torch.inference_mode():
            for bucket in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory pool
                graph, logits = self._capture(bucket, pool)
                pool = graph.pool()
                self.graphs[bucket] = (graph, logits)
        torch.cuda.synchronize(dev)
        used = free_before - torch.cuda.mem_get_info(dev)[0]
        logger.info(
            "CUDA graphs: %d decode buckets up to %d rows, %.1f MiB", len(self.buckets), self.buckets[-1], used / 2**20
        )

    def _forward(self, bucket: int) -> torch.Tensor:
        # the split count is fixed per bucket for the longest context: the kernel splits the keys a row really has
        splits = choose_num_kv_splits(bucket, self.backend.num_kv_heads, self.runner.max_model_len, self.num_sms)
        return forward_from_buffers(self.runner, self.buffers, bucket, splits)

    def _capture(self, bucket: int, pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self.backend.fill_graph_buffers(self.buffers, StepInput(), bucket)  # all padding: nothing is written
        stream = torch.cuda.Stream(self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):  # warm up outside the graph (autotuning, lazy init)
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self._forward(bucket)
        return graph, logits

    def can_run(self, step: StepInput) -> bool:
        return (
            step.is_decode_only
            and len(step.decode_tables) <= self.buckets[-1]
            and max(len(t) for t in step.decode_tables) <= self.max_blocks
        )

    def run(self, step: StepInput) -> torch.Tensor:
        """The logits [D, V] of a decode-only step (a view of the graph's output: read it before the next step)."""
        n = len(step.decode_tables)
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        self.backend.fill_graph_buffers(self.buffers, step, bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits[:n]
