"""KV-cache sizing on CUDA, by a profile run as vLLM does: run a worst-case prefill step and the sampler on its
widest batch, read the peak of torch's allocator, and give the rest of `gpu_memory_utilization` (TGI's
CUDA_MEMORY_FRACTION) of the device to the cache. Memory torch does not allocate (CUDA context, NCCL, cuBLAS and
Triton modules loaded by the profile step) is counted too. CUDA graphs are captured later, in what the fraction leaves.
The allocator is read through `DeviceMemory`, so a CPU test can run the whole profile path with made-up numbers.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine.sampler import Sampler, SamplingRequest
from engine.sampling_params import SamplingParams
from engine.step_input import StepInput

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)
GIB = 2**30


class DeviceMemory(Protocol):
    """What the profile run reads of a device's memory (torch.cuda's functions, for one device)."""

    def synchronize(self) -> None: ...
    def empty_cache(self) -> None: ...
    def mem_get_info(self) -> tuple[int, int]: ...  # (free, total) bytes of the device
    def memory_allocated(self) -> int: ...
    def memory_reserved(self) -> int: ...
    def reset_peak_memory_stats(self) -> None: ...
    def max_memory_allocated(self) -> int: ...


@dataclass(frozen=True)
class CudaMemory:
    device: torch.device

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def mem_get_info(self) -> tuple[int, int]:
        return torch.cuda.mem_get_info(self.device)

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def memory_reserved(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def reset_peak_memory_stats(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def device_memory(device: torch.device) -> DeviceMemory | None:
    """The allocator the profile run reads: CUDA's; None elsewhere (the CPU sizes its cache from a byte budget)."""
    return CudaMemory(device) if device.type == "cuda" else None


def profile_step(runner: ModelRunner) -> StepInput:
    """The largest prefill a step can hold: one chunk of max_batch_prefill_tokens (capped by the context)."""
    n = max(1, min(runner.config.max_batch_prefill_tokens, runner.max_model_len - 1))
    blocks = list(range(math.ceil(n / runner.block_size)))
    step = StepInput(
        input_ids=[0] * n,
        positions=list(range(n)),
        slots=list(range(n)),
        prefills=[(0, 0, n, blocks)],
        sample_rows=[n - 1],
    )
    if runner.encoder_decoder:  # an encoder input as long, its cross K/V released at the next step
        step.seq_ids, step.encoder_inputs = ["profile"], [("profile", [0] * n)]
        runner.release("profile")
    return step


def _profile(runner: ModelRunner, memory: DeviceMemory) -> None:
    """One worst-case step and one worst-case sampler call, on a cache just large enough for the step."""
    step = profile_step(runner)
    layers = runner.model.attention_layers()
    a = layers[0]
    runner.backend.bind(a.num_kv_heads, general=any(layer.has_options for layer in layers))
    blocks = len(step.prefills[0][3])
    for layer in layers:
        layer.bind(runner.backend, *runner.backend.allocate(blocks, a.num_kv_heads, a.head_dim))
    try:
        runner.run(step)
        rows = runner.config.max_num_seqs
        vocab = runner.hf_config.vocab_size
        logits = torch.randn(rows, vocab, device=runner.device)
        params = SamplingParams(do_sample=True, top_p=0.9, top_k=50, repetition_penalty=1.1, top_n_tokens=5)
        history = list(range(min(256, vocab)))
        generator = torch.Generator(device=runner.device).manual_seed(0)
        Sampler()(logits, [SamplingRequest(params, history, generator) for _ in range(rows)])
        memory.synchronize()
    finally:
        for layer in layers:
            layer.k_cache = layer.v_cache = torch.empty(0)


def profile_kv_blocks(runner: ModelRunner, bytes_per_block: int, memory: DeviceMemory) -> int:
    """KV blocks that fit in `gpu_memory_utilization` of the device once the profile step's peak and the memory
    outside torch are taken (before the cache or any CUDA graph is allocated; may be < 1: the caller refuses)."""
    memory.synchronize()
    memory.empty_cache()
    weights = memory.memory_allocated()
    memory.reset_peak_memory_stats()
    _profile(runner, memory)
    peak = memory.max_memory_allocated()
    memory.empty_cache()
    # read after the profile step: the cuBLAS handles and Triton modules it loaded live outside torch's allocator
    free, total = memory.mem_get_info()
    non_torch = max(0, (total - free) - memory.memory_reserved())  # context, NCCL, cuBLAS, Triton modules
    budget = total * runner.config.gpu_memory_utilization - peak - non_torch
    blocks = int(budget // bytes_per_block)
    logger.info(
        "CUDA memory: %.2f GiB total x %.2f; weights %.2f GiB, step peak %.2f GiB (activations %.2f), outside torch "
        "%.2f GiB -> KV cache %.2f GiB, %d blocks (CUDA graphs are captured in the rest)",
        total / GIB, runner.config.gpu_memory_utilization, weights / GIB, peak / GIB, (peak - weights) / GIB,
        non_torch / GIB, max(0, blocks) * bytes_per_block / GIB, blocks,
    )  # fmt: skip
    return blocks
