"""The execution plan: every choice between fast paths, made once at start-up from (device, dtype, what is installed,
config) and logged in one line. Layers and the runner are handed the plan; they never re-decide per call.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from engine.config import ATTENTION_BACKENDS, EngineConfig
from engine.layers import cpu_attention_kernels, cpu_fused_ops, cpu_gemm
from engine.quant import cpu_kernel
from engine.quant.config import QuantConfig

# Layer options (see layers/attention.py) each backend computes; the twin (and the CPU backends through it) all.
_EVERY_OPTION = frozenset({"sliding_window", "logit_softcap", "alibi", "position_bias"})
BACKEND_OPTIONS = {
    "torch": _EVERY_OPTION,
    "cpu": _EVERY_OPTION,
    "cpu_paired": _EVERY_OPTION,
    "triton": frozenset({"sliding_window", "logit_softcap", "alibi"}),
    "flash_attn": frozenset({"sliding_window", "logit_softcap", "alibi"}),
}

# Decode batch sizes captured as CUDA graphs (each step pads up to the next one), as far as max_num_seqs.
GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


@dataclass(frozen=True)
class ExecutionPlan:
    device: torch.device
    dtype: torch.dtype
    attention: str  # "torch" | "cpu" | "cpu_paired" | "triton" | "flash_attn"
    fused_ops: bool  # CPU: compiled norm / SiLU * up / rotary / K-V write / greedy pick
    cpu_gemm: bool | None  # CPU bf16 matmuls: the compiled GEMM (True), oneDNN (False); None off the CPU
    decoder_stack: bool  # CPU bf16: every decoder layer in one compiled call, where the model allows it
    cuda_graphs: tuple[int, ...]  # decode batch sizes replayed as CUDA graphs; () = eager
    quant: str = "none"  # "none" or "<method> on <kernel>" (resolve_quant_kernel)
    model: str = "native"  # "native" | "transformers" (the fallback: transformers' modelling code on our paged KV)

    def describe(self) -> str:
        matmul = {None: "cublas", True: "gemm_kernel", False: "onednn"}[self.cpu_gemm]
        if self.device.type == "cpu" and (self.dtype == torch.float32 or self.cpu_gemm is None):
            matmul = "torch"
        graphs = f"on({self.cuda_graphs[0]}..{self.cuda_graphs[-1]})" if self.cuda_graphs else "off"
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"device={self.device} dtype={dtype} attention={self.attention} matmul={matmul} "
            f"fused_ops={'on' if self.fused_ops else 'off'} decoder_stack={'on' if self.decoder_stack else 'off'} "
            f"graphs={graphs} sampler=device quant={self.quant.replace(' ', '_')} "
            f"model={'native' if self.model == 'native' else 'transformers_fallback'}"
        )


def triton_available(device: torch.device) -> str | None:
    """None when Triton kernels can run on `device`, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    import triton

    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if device.type == "cpu" and runtime is not None and runtime.interpret:
        return None  # TRITON_INTERPRET=1: the kernels run on CPU tensors (slowly), for tests
    return "triton runs on CUDA GPUs (or on the CPU under TRITON_INTERPRET=1)"


def flash_attn_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "flash-attn runs on CUDA GPUs only"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (the GPU image builds it only with --build-arg FLASH_ATTN=1)"
    return None


def _cpu_attention(config: EngineConfig, dtype: torch.dtype, head_dim: int, block_size: int) -> str | None:
    """The compiled CPU backend for this cache, or None where no kernel builds (or the config turned them off)."""
    cpu = torch.device("cpu")
    if not config.cpu_attention_kernels or not cpu_attention_kernels.supports(cpu, dtype):
        return None
    return "cpu_paired" if cpu_attention_kernels.supports_paired(cpu, dtype, head_dim, block_size) else "cpu"


def resolve_attention(
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    options: frozenset[str] = frozenset(),
) -> str:
    """The backend: the requested one (an error where it cannot run here or lacks an option the model needs), else
    the best one here that computes every option the model's layers use."""
    requested = config.attention_backend
    if requested is None:
        if device.type == "cuda":
            best = "triton" if triton_available(device) is None else "torch"
        else:
            best = _cpu_attention(config, dtype, head_dim, block_size) or "torch"
        return best if options <= BACKEND_OPTIONS[best] else "torch"
    chosen = _requested_attention(requested, config, device, dtype, head_dim, block_size)
    missing = options - BACKEND_OPTIONS[chosen]
    if missing:
        raise ValueError(
            f"attention backend {requested!r} (ATTENTION_BACKEND) does not compute {', '.join(sorted(missing))}, "
            "which this model needs; choose another one or leave it to auto"
        )
    return chosen


def _requested_attention(
    requested: str, config: EngineConfig, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
) -> str:
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {requested!r}")
    if requested == "torch":
        return "torch"
    if requested == "cpu":
        chosen = _cpu_attention(config, dtype, head_dim, block_size) if device.type == "cpu" else None
        if chosen is None:
            raise ValueError(
                f"attention backend 'cpu' (ATTENTION_BACKEND) is not available: it needs the CPU, a C compiler and "
                f"float32 or bfloat16 (got {device.type}, {dtype})"
            )
        return chosen
    why = triton_available(device) if requested == "triton" else flash_attn_available(device)
    if why is None and requested == "flash_attn" and dtype not in (torch.float16, torch.bfloat16):
        why = f"flash-attn computes in float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    if why is not None:
        raise ValueError(f"attention backend {requested!r} (ATTENTION_BACKEND) is not available: {why}")
    return requested


def resolve_quant_kernel(config: EngineConfig, quant: QuantConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The matmul of the quantized layers (engine/quant/matmul.py): its kernel, else the dequantizing twin."""
    if not config.quant_kernel:
        return "twin"
    if quant.method.startswith("bitsandbytes"):
        return "bitsandbytes"
    if quant.method == "fp8":
        fp8_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
        return "scaled_mm" if fp8_gpu else "dequantized"  # FP8 checkpoints elsewhere: served in the dtype
    if device.type == "cuda":
        return "triton" if triton_available(device) is None else "twin"
    if dtype != torch.bfloat16 or not cpu_kernel.available():
        return "twin"
    return cpu_kernel.kernel_name()


def resolve_plan(
    config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    block_size: int,
    options: frozenset[str] = frozenset(),
    graphs_allowed: bool = True,
    quant: str = "none",
) -> ExecutionPlan:
    """`options`: the attention options the model's layers use; `graphs_allowed`: False for models whose step reads
    the device on the host (MoE routing counts), which CUDA graphs cannot replay; `quant`: the weight format and
    matmul chosen for the checkpoint (engine/quant)."""
    attention = resolve_attention(config, device, dtype, head_dim, block_size, options)
    on_cpu = device.type == "cpu"
    fused = on_cpu and config.cpu_fused_ops and cpu_fused_ops.supports(device, dtype)
    gemm = cpu_gemm.preferred(config.cpu_gemm) if on_cpu else None
    # the decoder stack runs the bf16 GEMM kernel's weights, or the int kernel's (engine/quant); it steps aside for
    # other quantized matmuls
    on_kernel = bool(gemm) if quant == "none" else quant.rsplit(" on ", 1)[-1] in cpu_kernel.KERNELS
    stack = attention == "cpu_paired" and fused and on_kernel and config.cpu_decoder_stack
    graphs: tuple[int, ...] = ()
    # bitsandbytes' LLM.int8 finds its outlier columns per call (a host sync): no graph captures it
    capturable = graphs_allowed and (quant == "none" or not quant.startswith("bitsandbytes"))
    if device.type == "cuda" and config.cuda_graphs and attention in ("triton", "flash_attn") and capturable:
        graphs = tuple(b for b in GRAPH_BUCKETS if b < config.max_num_seqs) + (min(config.max_num_seqs, 512),)
        graphs = tuple(sorted(set(graphs)))
    return ExecutionPlan(device, dtype, attention, fused, gemm, stack, graphs, quant)
