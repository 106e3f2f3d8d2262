"""Ahead-of-time compilation of every Triton kernel variant for sm_80 and sm_90, with no GPU: the same constexprs
and options the launchers use (engine.attention.triton_kernels), ptxas from Triton's NVIDIA backend. Run as a
child process by test_compile.py (`python -m tests.triton.compile_variants` prints one JSON object), because a
process that imported triton under TRITON_INTERPRET=1 cannot compile.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

# compute capability -> shared memory a block may use: 8.x is held to sm_86 / sm_89 (A10G, L4, L40S: 99 KiB),
# below the A100's 163 KiB; 9.0 is the H100's 227 KiB
ARCHS = {80: 99 * 1024, 90: 227 * 1024}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Variant:
    kernel: str  # "attention", "merge" (of split-KV parts) or "write_kv"
    dtype: str  # a key of DTYPES
    head_dim: int
    block_size: int = 16
    group: int = 4  # query heads per KV head (attention); KV heads (write_kv)
    max_query_len: int = 64  # 1: decode-only tiles
    options: tuple[str, ...] = ()  # of "window", "softcap", "alibi"
    splits: int = 1  # num_kv_splits (attention with max_query_len 1, merge)

    @property
    def name(self) -> str:
        if self.kernel == "write_kv":
            return f"write_kv-{self.dtype}-h{self.group}-d{self.head_dim}"
        if self.kernel == "merge":
            return f"merge-{self.dtype}-d{self.head_dim}-splits{self.splits}"
        mode = "decode" if self.max_query_len == 1 else "prefill"
        extra = "".join(f"-{part}" for part in (*self.options, *([f"splits{self.splits}"] if self.splits > 1 else [])))
        return f"attention-{self.dtype}-d{self.head_dim}-bs{self.block_size}-g{self.group}-{mode}{extra}"


ALL_OPTIONS = ("window", "softcap", "alibi")
VARIANTS = [
    *(Variant("attention", dt, hd) for dt in DTYPES for hd in (64, 80, 128, 256)),
    *(Variant("attention", "bf16", hd, max_query_len=1) for hd in (64, 128, 256)),
    Variant("attention", "fp16", 80, max_query_len=1),
    Variant("attention", "fp32", 256, max_query_len=1),
    Variant("attention", "bf16", 128, block_size=32),
    Variant("attention", "fp32", 80, block_size=32, max_query_len=1),
    *(Variant("attention", "bf16", 128, options=(option,)) for option in ALL_OPTIONS),
    Variant("attention", "bf16", 128, max_query_len=1, options=ALL_OPTIONS),
    Variant("attention", "bf16", 256, options=ALL_OPTIONS),
    Variant("attention", "fp32", 256, options=ALL_OPTIONS),
    Variant("attention", "bf16", 128, group=1),  # MHA
    Variant("attention", "bf16", 128, group=8, max_query_len=1),
    Variant("attention", "bf16", 256, group=16, max_query_len=1),
    Variant("attention", "bf16", 128, group=128, max_query_len=1),  # MQA, 128 heads: the widest tile
    Variant("attention", "fp32", 128, group=8, max_query_len=1),
    Variant("attention", "bf16", 128, max_query_len=1, splits=16),
    Variant("attention", "fp32", 256, group=8, max_query_len=1, splits=3, options=ALL_OPTIONS),
    Variant("merge", "bf16", 128, splits=16),
    Variant("merge", "fp16", 80, splits=3),
    Variant("merge", "fp32", 256, splits=64),
    Variant("write_kv", "bf16", 128, group=8),
    Variant("write_kv", "fp16", 80, group=1),
    Variant("write_kv", "fp32", 256, group=3),
    Variant("write_kv", "bf16", 128, group=64),
]


def _compile_inputs(variant: Variant) -> tuple[Any, dict[str, str], dict[str, Any], dict[str, Any], dict[Any, Any]]:
    import torch

    from engine.attention import triton_config as config
    from engine.attention import triton_kernels as kernels

    ptr = f"*{variant.dtype}"
    split = "*fp32" if variant.splits > 1 else ptr  # the split workspace; out stands in without splitting
    if variant.kernel == "write_kv":
        fn, constexprs = kernels._write_kv_kernel, config.write_kv_constexprs(variant.group, variant.head_dim)
        options = config.WRITE_KV_OPTIONS
        types = {"k_ptr": ptr, "v_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "slot_ptr": "*i32"}  # as launched
    elif variant.kernel == "merge":
        fn, constexprs = kernels._merge_splits_kernel, config.merge_constexprs(variant.splits, variant.head_dim)
        options = config.MERGE_OPTIONS
        types = {"out_ptr": ptr, "split_out_ptr": split, "split_lse_ptr": split, "seq_lens_ptr": "*i32",
                 "query_start_loc_ptr": "*i32"}  # fmt: skip
    else:
        fn = kernels._paged_attention_kernel
        constexprs, tiles = config.attention_constexprs(
            variant.head_dim, getattr(torch, DTYPES[variant.dtype]), variant.group, variant.block_size,
            variant.max_query_len, sliding_window="window" in variant.options, softcap="softcap" in variant.options,
            alibi="alibi" in variant.options, num_kv_splits=variant.splits,
        )  # fmt: skip
        options = tiles.launch_options()
        types = {
            "q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "out_ptr": ptr, "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
            "alibi_ptr": "*fp32" if "alibi" in variant.options else "*i32",  # seq_lens stands in without ALiBi
            "split_out_ptr": split, "split_lse_ptr": split, "scale": "fp32", "softcap": "fp32",
        }  # fmt: skip
    # every other argument is an int (strides, block_size, sliding_window)
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    # what the JIT specializes at launch: 16-byte aligned pointers, strides (and block_size) multiples of 16, as
    # they are for every supported head dim; the block-table stride and the window are left unknown
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if name not in constexprs
        and (name.endswith("_ptr") or name.startswith("stride_") or name == "block_size")
        and name != "stride_bt"
    }
    return fn, signature, constexprs, options, attrs


def compile_one(variant: Variant, arch: int) -> dict[str, Any]:
    """{"asm": the stages produced, "shared": bytes, "registers", "spilled": local/stack bytes} or {"error"}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        fn, signature, constexprs, options, attrs = _compile_inputs(variant)
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # reported against this variant alone
        return {"error": f"{type(e).__name__}: {e}"[-2000:]}
    result: dict[str, Any] = {"asm": sorted(kernel.asm), "shared": kernel.metadata.shared}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:  # registers and spills, from the cubin itself
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run(
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    if found:
        result["registers"] = int(found[1])
        result["spilled"] = int(found[2]) + int(found[3])
    return result


def _compile_pair(job: tuple[Variant, int]) -> tuple[str, dict[str, Any]]:
    variant, arch = job
    return f"{variant.name}@sm_{arch}", compile_one(variant, arch)


def main() -> None:
    jobs = [(variant, arch) for variant in VARIANTS for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(_compile_pair, jobs))
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
