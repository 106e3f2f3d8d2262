"""The tensor-parallel plan without processes: which degrees divide a model (one-line errors naming the numbers
and the degrees that work), the GPU-count check with the count injected, the transformers fallback's degrees (by
its declared plan), threads per rank, the rendezvous port from a range, and the lazy safetensors slices each rank
reads its part through.
"""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.config import EngineConfig
from engine.device import cpu_threads
from engine.distributed import open_store
from engine.parallel_config import (
    ParallelConfigError,
    check_gpu_count,
    check_model_divides,
    resolve_parallel_config,
    valid_degrees,
)
from engine.weight_slice import TensorSlice, materialize, narrow_clamped


def hf(heads: int, kv_heads: int, intermediate: int) -> SimpleNamespace:
    return SimpleNamespace(
        architectures=["LlamaForCausalLM"],  # native (the fallback's degrees: test below)
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
    )


@pytest.mark.parametrize(
    ("shape", "degrees"),
    [
        ((32, 8, 14336), [1, 2, 4, 8, 16, 32]),  # Llama 3 8B: 16 and 32 ranks replicate the 8 KV heads
        ((64, 8, 28672), [1, 2, 4, 8, 16, 32, 64]),  # Llama 3 70B
        ((4, 1, 128), [1, 2, 4]),  # one KV head: replicated on every rank
        ((8, 8, 100), [1, 2, 4]),  # the MLP blocks 8
        ((12, 4, 3072), [1, 2, 4, 12]),  # 3 and 6 ranks cannot share 4 KV heads
        ((9, 3, 1536), [1, 3]),  # SmolLM2-135M (the default model): 9 ranks would split its MLP unevenly
    ],
)
def test_valid_degrees(shape: tuple[int, int, int], degrees: list[int]) -> None:
    assert valid_degrees(*shape) == degrees


def test_a_degree_that_does_not_divide_is_one_line_naming_the_numbers() -> None:
    with pytest.raises(ParallelConfigError) as e:
        check_model_divides(hf(4, 2, 128), 3)
    assert str(e.value) == (
        "tensor-parallel degree 3 does not divide the model (4 attention heads, 2 key/value heads, "
        "intermediate size 128); degrees that work: 1, 2, 4"
    )
    with pytest.raises(ParallelConfigError, match=r"intermediate size 100\); degrees that work: 1, 2, 4$"):
        check_model_divides(hf(8, 8, 100), 8)
    check_model_divides(hf(4, 1, 128), 4)  # KV heads fewer than ranks: replicated, fine


def test_more_ranks_than_visible_gpus_is_refused() -> None:
    with pytest.raises(ParallelConfigError, match=r"^tensor-parallel degree 4 needs 4 GPUs, but 2 are visible"):
        check_gpu_count(4, 2)
    check_gpu_count(2, 2)
    model, cuda = hf(32, 8, 14336), torch.device("cuda")
    with pytest.raises(ParallelConfigError, match="needs 8 GPUs, but 1 is visible"):
        resolve_parallel_config(EngineConfig(tensor_parallel_size=8), model, device=cuda, gpu_count=1)
    auto = resolve_parallel_config(EngineConfig(tensor_parallel_size=None), model, device=cuda, gpu_count=4)
    assert (auto.world_size, auto.backend) == (4, "nccl")  # unset: every visible GPU
    with pytest.raises(ParallelConfigError, match="names one GPU"):
        resolve_parallel_config(EngineConfig(tensor_parallel_size=2), model, device=torch.device("cuda:1"), gpu_count=2)


def test_the_fallback_uses_every_gpu_only_where_the_model_declares_a_tensor_parallel_plan() -> None:
    from transformers import AutoConfig

    cuda = torch.device("cuda")
    shape = dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=256)
    planned, unplanned = AutoConfig.for_model("olmo", **shape), AutoConfig.for_model("olmo2", **shape)
    unset = EngineConfig(tensor_parallel_size=None)
    assert resolve_parallel_config(unset, planned, device=cuda, gpu_count=4).world_size == 4
    assert resolve_parallel_config(unset, unplanned, device=cuda, gpu_count=4).world_size == 1
    with pytest.raises(ParallelConfigError, match=r"^tensor-parallel degree 2: .*fallback, which cannot shard it: "):
        resolve_parallel_config(EngineConfig(tensor_parallel_size=2), unplanned, device=cuda, gpu_count=4)
    with pytest.raises(ParallelConfigError, match="does not divide the model"):
        resolve_parallel_config(EngineConfig(tensor_parallel_size=3), planned, device=cuda, gpu_count=4)


def test_cpu_plan_is_gloo_and_one_rank_by_default() -> None:
    cpu = torch.device("cpu")
    plan = resolve_parallel_config(EngineConfig(tensor_parallel_size=None), hf(4, 2, 128), device=cpu)
    assert (plan.world_size, plan.backend) == (1, "gloo")
    config = EngineConfig(tensor_parallel_size=2, port_range=(20000, 20010), collective_timeout_s=5)
    plan = resolve_parallel_config(config, hf(4, 2, 128), device=cpu)
    assert (plan.world_size, plan.backend, plan.port_range, plan.timeout_s) == (2, "gloo", (20000, 20010), 5.0)
    with pytest.raises(ValueError, match="collective_timeout_s"):
        EngineConfig(collective_timeout_s=0)
    with pytest.raises(ValueError, match="port_range"):
        EngineConfig(port_range=(10, 5))


def test_cpu_threads_per_rank() -> None:
    assert cpu_threads(None, 1, cores=16) is None  # one rank: torch's default, as before
    assert cpu_threads(None, 2, cores=16) == 8
    assert cpu_threads(None, 4, cores=2) == 1
    assert cpu_threads(3, 4, cores=16) == 3  # configured: every rank


def test_rendezvous_port_comes_from_the_range_and_skips_taken_ports() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        top = min(taken + 20, 65535)
        store = open_store((taken, top), 2, 5.0)
        assert taken < store.port <= top
        with pytest.raises(RuntimeError, match=f"no free port in {taken}-{taken}"):
            open_store((taken, taken), 2, 5.0)
        del store
    assert open_store(None, 2, 5.0).port > 0


def test_tensor_slice_reads_only_the_narrowed_part(tmp_path: Path) -> None:
    full = torch.arange(48.0).reshape(6, 8)
    save_file({"w": full}, tmp_path / "w.safetensors")
    with safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        lazy = TensorSlice(f.get_slice("w"))
        assert lazy.shape == full.shape and lazy.dim() == 2
        part = lazy.narrow(0, 2, 3).narrow(1, 4, 4)
        assert part.shape == (3, 4) and torch.equal(materialize(part), full[2:5, 4:8])
        assert torch.equal(materialize(narrow_clamped(lazy, 0, 4, 4)), full[4:6])  # the last rank's padded rows
        assert materialize(narrow_clamped(lazy, 0, 7, 2)).shape == (0, 8)
        with pytest.raises(ValueError, match="outside dimension 0"):
            lazy.narrow(0, 4, 3)
    assert materialize(full) is full  # plain tensors (.bin, GGUF) go through unchanged
