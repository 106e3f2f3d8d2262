"""The execution plan: which attention backend, matmul and extras each (device, dtype, availability, config)
combination gets, and a clear error for a forced backend that cannot run here."""

from __future__ import annotations

import pytest
import torch

from engine import plan as plan_module
from engine.config import EngineConfig
from engine.plan import GRAPH_BUCKETS, resolve_plan

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


def _plan(device=CPU, dtype=torch.bfloat16, head_dim=64, block_size=32, **config):
    return resolve_plan(EngineConfig(**config), device, dtype, head_dim, block_size)


def test_cpu_bf16_takes_every_compiled_path() -> None:
    p = _plan()
    assert (p.attention, p.fused_ops, p.decoder_stack, p.cuda_graphs) == ("cpu_paired", True, True, ())
    assert "attention=cpu_paired" in p.describe() and "graphs=off" in p.describe()


def test_cpu_float32_and_odd_shapes_take_the_plain_kernel() -> None:
    assert _plan(dtype=torch.float32).attention == "cpu"
    assert _plan(head_dim=63).attention == "cpu"  # the paired layout needs an even head_dim
    assert not _plan(dtype=torch.float32).decoder_stack


def test_cpu_without_kernels_falls_back_to_the_twin() -> None:
    assert _plan(cpu_attention_kernels=False).attention == "torch"
    assert _plan(dtype=torch.float16).attention == "torch"  # no float16 kernel
    assert not _plan(cpu_fused_ops=False).decoder_stack


def test_forced_backends_on_cpu() -> None:
    assert _plan(attention_backend="torch").attention == "torch"
    assert _plan(attention_backend="cpu").attention == "cpu_paired"
    with pytest.raises(ValueError, match="'cpu' .*ATTENTION_BACKEND.* not available"):
        _plan(attention_backend="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match="'flash_attn' .* not available: flash-attn runs on CUDA"):
        _plan(attention_backend="flash_attn")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", False)
    with pytest.raises(ValueError, match="'triton' .* not available: triton runs on CUDA"):
        _plan(attention_backend="triton")
    monkeypatch.setattr(triton.knobs.runtime, "interpret", True)
    assert _plan(attention_backend="triton").attention == "triton"


def test_cuda_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA (decided from the device alone; nothing here touches a GPU): triton attention, graphs per bucket up
    to max_num_seqs, no CPU paths."""
    monkeypatch.setattr(plan_module, "triton_available", lambda device: None)
    p = _plan(CUDA, max_num_seqs=48)
    assert (p.attention, p.fused_ops, p.cpu_gemm, p.decoder_stack) == ("triton", False, None, False)
    assert p.cuda_graphs == tuple(b for b in GRAPH_BUCKETS if b <= 48)
    assert "matmul=cublas" in p.describe() and "graphs=on(1..48)" in p.describe()
    assert _plan(CUDA, max_num_seqs=100).cuda_graphs[-1] == 100
    assert _plan(CUDA, cuda_graphs=False).cuda_graphs == ()
    assert _plan(CUDA, attention_backend="torch").cuda_graphs == ()  # graphs need the static-buffer backends
    monkeypatch.setattr(plan_module, "triton_available", lambda device: "triton is not installed")
    assert _plan(CUDA).attention == "torch"
    with pytest.raises(ValueError, match="triton is not installed"):
        _plan(CUDA, attention_backend="triton")


def test_flash_attn_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "flash_attn_available", lambda device: None)
    monkeypatch.setattr(plan_module, "triton_available", lambda device: None)
    assert _plan(CUDA, attention_backend="flash_attn").attention == "flash_attn"
    assert _plan(CUDA).attention == "triton"  # flash-attn is opt-in
    with pytest.raises(ValueError, match="'flash_attn' .* not available: flash-attn computes in float16 or bfloat16"):
        _plan(CUDA, dtype=torch.float32, attention_backend="flash_attn")  # its kernels have no float32


def test_bad_backend_name_is_refused() -> None:
    with pytest.raises(ValueError, match="attention_backend must be one of torch, cpu, triton, flash_attn"):
        EngineConfig(attention_backend="xformers")


def test_options_the_backend_lacks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model whose layers need an option the best backend lacks (T5's relative position bias on Triton) gets
    the twin under auto, and a clear error when that backend is forced; MoE models rule CUDA graphs out."""
    monkeypatch.setattr(plan_module, "triton_available", lambda device: None)
    bias = frozenset({"position_bias"})
    window = frozenset({"sliding_window", "logit_softcap"})
    assert resolve_plan(EngineConfig(), CUDA, torch.bfloat16, 64, 16, window).attention == "triton"
    p = resolve_plan(EngineConfig(), CUDA, torch.bfloat16, 64, 16, bias)
    assert p.attention == "torch" and p.cuda_graphs == ()
    with pytest.raises(ValueError, match="'triton' .* does not compute position_bias"):
        resolve_plan(EngineConfig(attention_backend="triton"), CUDA, torch.bfloat16, 64, 16, bias)
    assert resolve_plan(EngineConfig(), CUDA, torch.bfloat16, 64, 16, graphs_allowed=False).cuda_graphs == ()
    assert resolve_plan(EngineConfig(), CPU, torch.bfloat16, 64, 32, bias).attention == "cpu_paired"


@pytest.mark.parametrize("amx", [False, True])
def test_int_formats_take_amx_tiles_where_the_cpu_has_them(monkeypatch: pytest.MonkeyPatch, amx: bool) -> None:
    """The plan names the CPU int kernel with AMX tiles ("cpu_amx") where this CPU and OS run them; the decoder stack
    takes both; float32 engines and configs without kernels keep the twin."""
    from engine.quant import cpu_kernel
    from engine.quant.config import QuantConfig

    monkeypatch.setattr(cpu_kernel, "available", lambda: True)
    monkeypatch.setattr(cpu_kernel, "amx_available", lambda: amx)
    int4 = QuantConfig("int4")
    kernel = plan_module.resolve_quant_kernel(EngineConfig(), int4, CPU, torch.bfloat16)
    assert kernel == ("cpu_amx" if amx else "cpu_kernel")
    assert plan_module.resolve_quant_kernel(EngineConfig(), int4, CPU, torch.float32) == "twin"
    assert plan_module.resolve_quant_kernel(EngineConfig(quant_kernel=False), int4, CPU, torch.bfloat16) == "twin"
    p = resolve_plan(EngineConfig(), CPU, torch.bfloat16, 64, 32, quant=f"int4 g128 on {kernel}")
    assert p.decoder_stack and p.describe().endswith(f"quant=int4_g128_on_{kernel} model=native")
