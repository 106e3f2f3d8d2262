"""Frozen engine configuration, validated on construction (ValueError naming the field).

Sizes that depend on the model or the device (context length, KV blocks) are resolved by the
engine at start-up; fields left None here mean "derive it".
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("torch", "cpu", "triton", "flash_attn")
# auto: the native implementation where the architecture has one, else the transformers fallback
MODEL_IMPLEMENTATIONS = ("auto", "native", "transformers")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # local dir, .gguf file, hub id; None = the embedded default model
    revision: str | None = None
    hf_token: str | None = None
    trust_remote_code: bool = False
    model_implementation: str = "auto"  # one of MODEL_IMPLEMENTATIONS (engine/models/transformers_fallback.py)
    dtype: str = "auto"  # auto: bfloat16 (float16 on GPUs without bf16)
    device: str = "auto"  # auto: cuda when available, else cpu
    max_num_seqs: int = 256  # running sequences at once
    max_batch_prefill_tokens: int = 4096  # prompt tokens computed per step (chunked beyond)
    max_batch_total_tokens: int | None = None  # KV-cache capacity in tokens; None: memory budget
    max_model_len: int | None = None  # context length; None: the model's max_position_embeddings
    block_size: int | None = None  # tokens per KV block; None: 16 on GPU, 32 on CPU
    enable_prefix_caching: bool = True  # reuse the KV blocks of prompts' shared leading tokens
    gpu_memory_utilization: float = 0.9  # CUDA: fraction of device memory for weights + KV
    cpu_kv_cache_bytes: int = 2 << 30  # CPU: KV budget when max_batch_total_tokens is None
    seed: int = 0  # seeds requests that sample without a seed of their own
    num_threads: int | None = None  # CPU: torch threads per rank; None = torch's default (1 rank), cores / N (N ranks)
    # Tensor parallelism: ranks (one process each; GPUs on CUDA, gloo on CPU); None = every visible GPU (1 on CPU)
    tensor_parallel_size: int | None = 1
    port_range: tuple[int, int] | None = None  # ports the rendezvous may bind; None: any free port
    collective_timeout_s: float = 600.0  # a collective waiting longer on a rank fails the engine
    cpu_attention_kernels: bool = True  # CPU: the compiled attention kernels (decode and prefill) where a C compiler is
    cpu_fused_ops: bool = True  # CPU: compiled RMSNorm / SiLU * up / rotary / greedy pick (same condition)
    # CPU: bf16 matmuls on the compiled AVX-512 kernel (else oneDNN's packed matmul); None: the kernel unless the CPU
    # has AMX tiles, where oneDNN's AMX matmuls are faster
    cpu_gemm: bool | None = None
    cpu_decoder_stack: bool = True  # CPU bf16 with the compiled paths: all decoder layers in one compiled call per step
    # None: the best the device has (triton on CUDA, the compiled kernels on CPU); else one of ATTENTION_BACKENDS
    attention_backend: str | None = None
    cuda_graphs: bool = True  # CUDA: replay decode-only steps as CUDA graphs, per batch-size bucket
    # Quantization (engine/quant): None = what the checkpoint holds (GPTQ / AWQ / FP8 / bitsandbytes / GGUF types with
    # a kernel); else one of engine.quant.config.METHODS
    quantize: str | None = None
    quant_kernel: bool = True  # quantized matmuls on their kernels (False: the dequantizing twins, for tests)
    quant_group_size: int = 128  # int4 / int8 made at load: inputs per scale (the largest of this, 64, 32 dividing)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_batch_prefill_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_batch_total_tokens", "max_model_len", "num_threads", "block_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not (isinstance(self.collective_timeout_s, (int, float)) and 0 < self.collective_timeout_s < 1e9):
            raise ValueError(f"collective_timeout_s must be a positive number, got {self.collective_timeout_s!r}")
        if self.port_range is not None and not (
            len(self.port_range) == 2 and 1 <= self.port_range[0] <= self.port_range[1] <= 65535
        ):
            raise ValueError(f"port_range must be (low, high) with 1 <= low <= high <= 65535, got {self.port_range!r}")
        if self.attention_backend is not None and self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.model_implementation not in MODEL_IMPLEMENTATIONS:
            choices = ", ".join(MODEL_IMPLEMENTATIONS)
            raise ValueError(f"model_implementation must be one of {choices}, got {self.model_implementation!r}")
        from engine.quant.config import METHODS

        if self.quantize is not None and self.quantize not in METHODS:
            raise ValueError(f"quantize must be one of {', '.join(METHODS)}, got {self.quantize!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
