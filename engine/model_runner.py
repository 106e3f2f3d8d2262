"""ModelRunner: builds one rank's model shard, makes the execution plan, sizes and binds its paged KV cache, and runs
one step.

A step is one flattened batch: decode rows first, then prefill chunks. Rank 0 builds its inputs as plain lists
(`StepInput`, what the other ranks receive); the attention backend moves them to the device. Logits are computed only
for the rows that sample; rank 0 hands them to the engine, which samples.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch

from engine.attention import create_backend
from engine.attention.base import attention_metadata
from engine.config import EngineConfig
from engine.device import cpu_threads, default_dtype, rank_device, resolve_dtype
from engine.kv_sizing import device_memory, profile_kv_blocks
from engine.loader import iter_weights
from engine.model_source import ModelFiles
from engine.models import get_model_class, model_implementation
from engine.parallel import SINGLE_RANK, ParallelState, building_with
from engine.plan import ExecutionPlan, resolve_plan, resolve_quant_kernel
from engine.quant.config import checkpoint_method, resolve_quantization
from engine.quant.layer import QuantBuild, building_quantized, finish
from engine.quant.report import weight_bytes
from engine.scheduler import ScheduledBatch
from engine.step_input import StepInput

logger = logging.getLogger(__name__)

__all__ = ["ModelRunner", "StepInput"]


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        files: ModelFiles,
        hf_config,
        max_model_len: int,
        parallel: ParallelState = SINGLE_RANK,
    ) -> None:
        self.config, self.parallel, self.hf_config = config, parallel, hf_config
        self.device = rank_device(config.device, parallel.rank, parallel.world_size)
        self.dtype = resolve_dtype(config.dtype, self.device)
        threads = cpu_threads(config.num_threads, parallel.world_size)
        if self.device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.send_step: Callable[[StepInput], None] | None = None  # rank 0 of several: hands each step on
        self.block_size = config.block_size or (16 if self.device.type == "cuda" else 32)
        self.max_model_len = max_model_len
        self.implementation = model_implementation(hf_config, config.model_implementation)
        # the fallback serves a GGUF file dequantized unless a quantization is asked for (which it then refuses)
        requested = "none" if self.implementation == "transformers" and config.quantize is None else config.quantize
        method, _ = checkpoint_method(hf_config)
        if self.implementation == "transformers" and method is not None:
            raise ValueError(
                f"a {method} checkpoint is not supported through the transformers fallback; serve an unquantized "
                "checkpoint of this model"
            )
        self.quant = resolve_quantization(
            requested, hf_config, bool(files.gguf_file), self.device, group_size=config.quant_group_size
        )
        build, quant = None, "none"
        if self.quant is not None:
            build = QuantBuild(self.quant, resolve_quant_kernel(config, self.quant, self.device, self.dtype),
                               self.device, self.dtype)  # fmt: skip
            quant = f"{self.quant.describe()} on {build.kernel}"
        model = self._build(files, build) if self.implementation == "native" else self._build_fallback(files)
        layers = model.attention_layers()
        options = frozenset(o for layer in layers for o in layer.option_names)
        graphs_allowed = getattr(model, "cuda_graphs", True)  # the model may rule them out
        head_dim = layers[0].head_dim
        plan = resolve_plan(config, self.device, self.dtype, head_dim, self.block_size, options, graphs_allowed, quant)
        plan = dataclasses.replace(plan, model=self.implementation)
        if self.implementation == "transformers":  # transformers' own linears and norms: none of the CPU fast paths
            plan = dataclasses.replace(plan, cpu_gemm=None, fused_ops=False, decoder_stack=False)
        if plan.cpu_gemm is not None:
            model.pack_for_cpu(gemm_kernel=plan.cpu_gemm)  # 16-bit: the GEMM kernel's panels or oneDNN's
        if parallel.rank == 0:
            dense, held = weight_bytes(model, self.dtype)
            dtype_name = str(self.dtype).removeprefix("torch.")
            logger.info("weights: %.1f MiB in %s -> %.1f MiB held (quantization: %s)", dense / 2**20, dtype_name,
                        held / 2**20, quant)  # fmt: skip
        if plan.fused_ops:  # norms, activations, rotary and greedy picks as compiled passes
            model.use_fused_cpu_ops()
        self.model = model.eval()
        self.encoder_decoder = bool(getattr(model, "is_encoder_decoder", False))
        self._released: list[str] = []  # encoder-decoder: requests to forget at the next step
        self.backend = create_backend(plan, self.block_size)
        # The CUDA profile run (KV sizing) runs a step through run(): the plan and "no graphs yet" must be in place.
        self.plan: ExecutionPlan = dataclasses.replace(plan, decoder_stack=False)
        self.graphs = None
        self.num_blocks = self._allocate_kv_cache()
        # CPU bf16 with every compiled path: the decoder layers run as one compiled call per step, where they can.
        stack = plan.decoder_stack and model.use_decoder_stack()
        self.plan = dataclasses.replace(plan, decoder_stack=stack)
        if self.plan.cuda_graphs:
            from engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(self, self.plan.cuda_graphs)
        if parallel.rank == 0:
            logger.info("execution plan: %s", self.plan.describe())

    def _build(self, files: ModelFiles, build: QuantBuild | None) -> torch.nn.Module:
        """The native model: built in the dtype on the device (sharded, quantized layers as planned), then loaded."""
        with default_dtype(self.dtype), self.device, building_with(self.parallel), building_quantized(build):
            model = get_model_class(self.hf_config)(self.hf_config, max_position=self.max_model_len)
        gguf_native = self.quant is not None and self.quant.method == "gguf"
        model.load_weights(iter_weights(files, self.hf_config, gguf_native=gguf_native))
        finish(model)
        return model

    def _build_fallback(self, files: ModelFiles) -> torch.nn.Module:
        """transformers' model on the paged cache (engine/models/transformers_fallback.py), 16/32-bit; sharded by its
        declared tensor-parallel plan on several ranks."""
        from engine.models.transformers_fallback import TransformersCausalLM

        if self.quant is not None:
            raise ValueError(
                f"quantization ({self.quant.describe()}) is not supported through the transformers fallback; "
                "serve the model unquantized (HF_MODEL_QUANTIZE unset)"
            )
        arch = (getattr(self.hf_config, "architectures", None) or [self.hf_config.model_type])[0]
        logger.info("model: %s through the transformers fallback (transformers' modelling code, our paged KV)", arch)
        return TransformersCausalLM.load(
            files, self.hf_config, self.device, self.dtype, self.config.trust_remote_code, self.parallel
        )

    # Facts of the plan, for callers and tests.
    @property
    def fused_ops(self) -> bool:
        return self.plan.fused_ops

    @property
    def decoder_stack(self) -> bool:
        return self.plan.decoder_stack

    @property
    def paired(self) -> bool:
        return self.plan.attention == "cpu_paired"

    @property
    def decode_kernel(self) -> bool:
        return self.plan.attention in ("cpu", "cpu_paired")

    def _allocate_kv_cache(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        k_shape, v_shape = self.backend.cache_shapes(1, a.num_kv_heads, a.head_dim)
        bytes_per_block = len(layers) * (math.prod(k_shape) + math.prod(v_shape)) * self.dtype.itemsize
        cfg = self.config
        if cfg.max_batch_total_tokens is not None:
            num_blocks = math.ceil(cfg.max_batch_total_tokens / self.block_size)
        elif (memory := device_memory(self.device)) is not None:  # CUDA: what a profile step leaves of the fraction
            num_blocks = profile_kv_blocks(self, bytes_per_block, memory)
        else:
            # Never more than every running sequence at full context could use.
            useful = math.ceil(cfg.max_num_seqs * self.max_model_len / self.block_size)
            num_blocks = min(int(cfg.cpu_kv_cache_bytes // bytes_per_block), useful)
        num_blocks = self.parallel.min_over_ranks(num_blocks, self.device)  # every rank holds the same blocks
        if num_blocks < 1:
            raise ValueError("not enough memory for a single KV-cache block; lower the model size or raise the budget")
        self.num_kv_heads = a.num_kv_heads
        self.backend.bind(a.num_kv_heads, general=any(layer.has_options for layer in layers))
        for layer in layers:
            layer.bind(self.backend, *self.backend.allocate(num_blocks, a.num_kv_heads, a.head_dim))
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB, %s layout)",
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            num_blocks * bytes_per_block / 2**20,
            self.backend.name,
        )
        return num_blocks

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """The step's model inputs as plain lists: decode rows first, then prefill chunks."""
        step = StepInput()
        ids, positions, slots, bs = step.input_ids, step.positions, step.slots, self.block_size
        for item in batch.decodes:
            seq, p = item.seq, item.start
            ids.append(seq.token_at(p))
            positions.append(p)
            slots.append(seq.block_table[p // bs] * bs + p % bs)
            step.sample_rows.append(len(ids) - 1)
            step.decode_tables.append(seq.block_table)
            step.decode_lens.append(p + 1)
        for item in batch.prefills:
            seq, start, end = item.seq, item.start, item.end
            step.prefills.append((len(ids), start, end, seq.block_table[: -(-end // bs)]))
            ids.extend(seq.token_slice(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(seq.block_table, start, end))
            if item.sample:
                step.sample_rows.append(len(ids) - 1)
        if self.encoder_decoder:
            step.seq_ids = [item.seq.request_id for item in (*batch.decodes, *batch.prefills)]
            step.encoder_inputs = [  # a one-token decoder prompt may be scheduled as a decode row
                (item.seq.request_id, item.seq.encoder_token_ids)
                for item in (*batch.decodes, *batch.prefills)
                if item.start == 0
            ]
            step.released, self._released = self._released, []
        return step

    def release(self, request_id: str) -> None:
        """A request is finished or aborted: encoder-decoder models drop its cached encoder output next step."""
        if self.encoder_decoder:
            self._released.append(request_id)

    def execute(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Run one step (rank 0) -> logits [sampling rows, V] in batch order, or None when no row samples."""
        step = self.prepare(batch)
        if self.send_step is not None:  # the other ranks run the same step
            self.send_step(step)
        return self.run(step)

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor | None:
        """Forward pass and the logits of the sampling rows (every rank computes them: the LM head gathers).
        float32, or the model's dtype where the fused CPU greedy pick reads 16-bit logits as they are."""
        if self.graphs is not None and self.graphs.can_run(step):
            return self.graphs.run(step)
        tensors = self.backend.step_tensors(step)
        if self.encoder_decoder:
            self.model.begin_step(step)
        with attention_metadata(tensors.meta):
            if getattr(self.model, "computes_logits", False):  # the transformers fallback: its own head, sampling rows
                rows = tensors.sample_rows
                if not step.sample_rows:  # no row samples (a prompt's middle chunk): no head at all, not every row's
                    rows = torch.empty(0, dtype=torch.long, device=tensors.input_ids.device)
                logits = self.model(tensors.input_ids, tensors.positions, rows)
                return (logits if self.plan.fused_ops else logits.float()) if step.sample_rows else None
            hidden = self.model(tensors.input_ids, tensors.positions)
        if not step.sample_rows:
            return None
        if tensors.sample_rows is not None:
            hidden = hidden.index_select(0, tensors.sample_rows)
        return self.model.compute_logits(hidden, keep_dtype=self.plan.fused_ops)
