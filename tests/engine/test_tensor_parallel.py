"""Tensor parallelism through the offline API on CPU (gloo, float32): two ranks give the greedy tokens of one
rank and of transformers, each rank holds about half the weights, a killed or hung rank fails the engine
fast and clearly, closing leaves no process behind, and a degree that does not divide the model is refused
before any process starts. A GPU-marked test runs the CUDA path (degree 1, and every GPU where there are several).
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch

from engine import LLM
from engine.loader import iter_weights
from engine.model_source import load_hf_config, resolve_model
from engine.parallel_config import ParallelConfigError, valid_degrees
from engine.weight_slice import TensorSlice
from tests.support.oracle import Engines, Oracle
from tests.support.serve_process import wait_gone
from tests.support.tiny_models import SPECS, TinyModels, TinySpec, greedy, random_prompt

TP_SPECS = {
    "llama_gqa": SPECS["llama_gqa"],  # 4 heads, 2 KV heads: 2 + 1 per rank
    "qwen2": SPECS["qwen2"],  # q/k/v biases sharded with their heads
    # one KV head (replicated on both ranks), tied embeddings, 401-row vocabulary (padded to 2 x 201)
    "tp_kv1_tied": TinySpec(arch="llama", num_key_value_heads=1, tie_word_embeddings=True, extra_vocab=1, seed=11),
}
CONFIG = dict(dtype="float32", max_batch_total_tokens=16384, max_batch_prefill_tokens=48)  # chunked prefill too
PROMPTS = [random_prompt(n, seed) for n, seed in [(3, 1), (17, 2), (40, 3), (64, 4), (90, 5)]]
NEW_TOKENS = 24


def model_path(tiny_models: TinyModels, name: str) -> str:
    return str(tiny_models(name, TP_SPECS.get(name)))


def weight_count(llm: LLM) -> int:
    return sum(p.numel() for p in llm.engine.runner.model.parameters())


@pytest.mark.integration
@pytest.mark.parametrize("name", list(TP_SPECS))
def test_two_ranks_give_the_tokens_of_one_rank_and_transformers(
    name: str, tiny_models: TinyModels, engines: Engines, oracle: Oracle
) -> None:
    path = model_path(tiny_models, name)
    one = engines(name, **CONFIG)
    reference = one.generate(PROMPTS, greedy(NEW_TOKENS))
    with LLM(path, tensor_parallel_size=2, **CONFIG) as two:
        (pid,) = two.engine.tp_group.pids
        rank1 = psutil.Process(pid)
        outs = two.generate(PROMPTS, greedy(NEW_TOKENS))
        assert weight_count(two) < 0.6 * weight_count(one)  # rank 0 holds its shard only
        assert two.engine.runner.num_blocks == one.engine.runner.num_blocks
    assert wait_gone([rank1]) == []  # closed: the other rank is gone
    for prompt, out, ref in zip(PROMPTS, outs, reference):
        assert out.token_ids == ref.token_ids == oracle.greedy(name, prompt, NEW_TOKENS)
        assert out.logprobs == pytest.approx(ref.logprobs, abs=1e-4)


def test_each_rank_reads_only_its_slices_of_safetensors(tiny_models: TinyModels) -> None:
    files = resolve_model(model_path(tiny_models, "llama_gqa"))
    weights = dict(iter_weights(files, load_hf_config(files)))
    assert weights and all(isinstance(w, TensorSlice) for w in weights.values())  # nothing read yet


@pytest.mark.integration
def test_a_rank_killed_while_idle_fails_the_health_check_naming_it(tiny_models: TinyModels) -> None:
    """What the server's loop checks every second; a rank killed mid-step: tests/serve/test_process_tensor_parallel."""
    with LLM(model_path(tiny_models, "llama_gqa"), tensor_parallel_size=2, **CONFIG) as llm:
        (pid,) = llm.engine.tp_group.pids
        assert llm.generate([5, 6, 7], greedy(4))[0].token_ids
        llm.engine.check_health()
        os.kill(pid, signal.SIGKILL)
        llm.engine.tp_group.procs[0].join(10)
        with pytest.raises(RuntimeError, match=r"^tensor-parallel rank 1 exited with code -9$"):
            llm.engine.check_health()
        with pytest.raises(RuntimeError, match="failed earlier"):
            llm.generate([5, 6, 7], greedy(4))
        assert not llm.engine.has_unfinished_requests()  # the failed call aborted its request


@pytest.mark.integration
def test_a_hung_rank_fails_the_engine_within_the_collective_timeout(tiny_models: TinyModels) -> None:
    timeout = 8.0
    llm = LLM(model_path(tiny_models, "llama_gqa"), tensor_parallel_size=2, collective_timeout_s=timeout, **CONFIG)
    try:
        (pid,) = llm.engine.tp_group.pids
        rank1 = psutil.Process(pid)
        rank1.suspend()  # SIGSTOP: alive, but never answers a collective
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="^a tensor-parallel step failed: .*Timed out"):
            llm.generate([5, 6, 7], greedy(4))
        assert timeout - 1 < time.monotonic() - began < timeout + 15
        with pytest.raises(RuntimeError, match="failed earlier"):
            llm.generate([5, 6, 7], greedy(4))
    finally:
        llm.close()  # kills the stopped rank
    assert wait_gone([rank1]) == []


@pytest.mark.parametrize("degree", [3, 8])
def test_a_degree_that_does_not_divide_the_model_is_refused_before_any_process(
    degree: int, tiny_models: TinyModels
) -> None:
    children = set(psutil.Process().children())
    with pytest.raises(ParallelConfigError) as e:
        LLM(model_path(tiny_models, "llama_gqa"), tensor_parallel_size=degree, **CONFIG)
    assert str(e.value) == (
        f"tensor-parallel degree {degree} does not divide the model (4 attention heads, 2 key/value heads, "
        "intermediate size 128); degrees that work: 1, 2, 4"
    )
    assert set(psutil.Process().children()) == children


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_one_rank_on_cuda_gives_the_tokens_of_transformers(tiny_models: TinyModels, oracle: Oracle) -> None:
    with LLM(model_path(tiny_models, "llama_gqa"), device="cuda", tensor_parallel_size=1, **CONFIG) as llm:
        assert llm.engine.runner.device.type == "cuda"
        outs = llm.generate(PROMPTS, greedy(NEW_TOKENS))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == oracle.greedy("llama_gqa", prompt, NEW_TOKENS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2+ GPUs")
def test_every_gpu_gives_the_tokens_of_transformers(tiny_models: TinyModels, oracle: Oracle) -> None:
    degree = max(d for d in valid_degrees(4, 2, 128) if d <= torch.cuda.device_count())
    with LLM(model_path(tiny_models, "llama_gqa"), tensor_parallel_size=degree, **CONFIG) as llm:
        assert llm.engine.parallel.backend == "nccl"
        outs = llm.generate(PROMPTS, greedy(NEW_TOKENS))
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == oracle.greedy("llama_gqa", prompt, NEW_TOKENS)
