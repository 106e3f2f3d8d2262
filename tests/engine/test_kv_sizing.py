"""The profile-run KV sizing (engine/kv_sizing.py) as a CUDA engine starts, on the CPU: the device's allocator is
replaced by made-up numbers, everything else is real. The runner is built, a worst-case prefill step runs through
run() and the sampler, the cache gets what the numbers leave of the memory fraction, and the engine then gives
transformers' tokens (the throw-away profile cache is gone, the real one bound).
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.model_runner import ModelRunner
from tests.support.oracle import Oracle
from tests.support.tiny_models import TinyModels, greedy, random_prompt

MIB = 2**20
MODEL = "llama_gqa"


class FakeMemory:
    """A device of `total` bytes: `used` outside torch, `allocated` by torch before the profile, `peak` during it;
    the profile step loads `loaded` more bytes outside torch (cuBLAS handles, Triton modules)."""

    def __init__(self, total: int, used: int, allocated: int, peak: int, loaded: int = 0) -> None:
        self.total, self.used, self.allocated, self.peak, self.loaded = total, used, allocated, peak, loaded
        self.calls: list[str] = []

    def synchronize(self) -> None:
        self.calls.append("synchronize")

    def empty_cache(self) -> None:
        self.calls.append("empty_cache")

    def mem_get_info(self) -> tuple[int, int]:
        self.calls.append("mem_get_info")
        used = self.used + (self.loaded if "reset_peak" in self.calls else 0)
        return self.total - used - self.allocated, self.total

    def memory_allocated(self) -> int:
        return self.allocated

    def memory_reserved(self) -> int:
        return self.allocated

    def reset_peak_memory_stats(self) -> None:
        self.calls.append("reset_peak")

    def max_memory_allocated(self) -> int:
        self.calls.append("max_allocated")
        return self.peak


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_profile_sizing_builds_a_working_engine(
    backend: str, tiny_models: TinyModels, oracle: Oracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    memory = FakeMemory(total=64 * MIB, used=2 * MIB, allocated=1 * MIB, peak=3 * MIB, loaded=MIB)
    monkeypatch.setattr("engine.model_runner.device_memory", lambda device: memory)
    steps: list[int] = []
    real_run = ModelRunner.run

    def spy(self: ModelRunner, step):  # type: ignore[no-untyped-def]
        steps.append(step.num_tokens)
        return real_run(self, step)

    monkeypatch.setattr(ModelRunner, "run", spy)
    fraction, prefill = 0.5, 48
    llm = LLM(
        str(tiny_models(MODEL)), dtype="float32", attention_backend=backend, block_size=16,
        gpu_memory_utilization=fraction, max_batch_prefill_tokens=prefill, max_num_seqs=8,
    )  # fmt: skip
    runner = llm.engine.runner
    assert steps[0] == prefill  # the worst-case prefill step ran through run(), between the peak reset and read
    assert memory.calls.index("reset_peak") < memory.calls.index("max_allocated")
    # memory outside torch is read after the profile step, which loaded more of it
    assert memory.calls.index("max_allocated") < memory.calls.index("mem_get_info")
    layers = runner.model.attention_layers()
    per_block = sum(x.numel() * x.element_size() for layer in layers for x in (layer.k_cache, layer.v_cache))
    per_block //= runner.num_blocks
    # the fraction, less the profile step's peak, less what lies outside torch once the step ran
    assert runner.num_blocks == int((64 * MIB * fraction - 3 * MIB - 3 * MIB) // per_block)
    assert all(layer.k_cache.shape[0] == runner.num_blocks for layer in layers)
    assert llm.engine.block_manager.num_blocks == runner.num_blocks
    prompts = [random_prompt(n, seed=50 + n) for n in (5, 40, 70)]
    for prompt, out in zip(prompts, llm.generate(prompts, greedy(8))):
        assert out.token_ids == oracle.greedy(MODEL, prompt, 8)


def test_a_fraction_too_small_for_one_block_is_refused(
    tiny_models: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = FakeMemory(total=64 * MIB, used=2 * MIB, allocated=1 * MIB, peak=40 * MIB)
    monkeypatch.setattr("engine.model_runner.device_memory", lambda device: memory)
    with pytest.raises(ValueError, match="not enough memory for a single KV-cache block"):
        LLM(str(tiny_models(MODEL)), dtype="float32", attention_backend="torch", gpu_memory_utilization=0.5,
            max_batch_prefill_tokens=16, max_num_seqs=4)  # fmt: skip
    assert torch.get_default_dtype() == torch.float32
