"""The Triton paged-attention kernel (run by Triton's interpreter on CPU tensors) against its pure-torch twin
(which tests/unit/test_paged_reference.py checks against torch SDPA and transformers): decode rows, prefill, chunks
over a cached prefix, mixed batches, padding; MHA, GQA, MQA and an uneven group; block edges; head dims 64 and 80;
block sizes 16 and 32; float32, float16 and bfloat16; sliding window, softcap and ALiBi, alone and together.
Tolerances: tests/triton/cases.py.
"""

from __future__ import annotations

import itertools
from types import ModuleType

import pytest
import torch

from engine.attention.paged_reference import paged_attention_reference
from tests.triton.cases import SENTINEL, TOL, check, make_case, run_both

pytestmark = pytest.mark.slow

# name: (q_len per sequence, seq_len per sequence); a query row at position p sees positions <= p
BATCHES = {
    "decode": ([1, 1, 1, 1], [1, 16, 17, 40]),  # block edges: exactly one block, one more
    "prefill": ([5, 16, 17], [5, 16, 17]),  # no cache
    "chunk_over_prefix": ([7, 16], [39, 48]),  # chunked prefill / prefix-cache hits
    "mixed": ([1, 9, 1, 20, 1], [33, 30, 1, 20, 64]),  # decodes and chunks in one flattened batch
    "padded": ([1, 0, 3, 0, 1], [10, 0, 5, 0, 0]),  # q_len 0, and a row whose seq_len is 0: both write nothing
}
HEADS = {"mha": (4, 4), "gqa": (8, 2), "mqa": (4, 1), "group3": (6, 2)}  # (query heads, KV heads)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("batch", BATCHES)
def test_matches_reference(kernels: ModuleType, device: torch.device, batch: str, heads: str) -> None:
    q_lens, seq_lens = BATCHES[batch]
    out = check(kernels, make_case(q_lens, seq_lens, *HEADS[heads], 64, 16, torch.float32, device))
    written = out != SENTINEL
    assert written.any()
    starts = list(itertools.accumulate(q_lens, initial=0))
    for s, seq_len in enumerate(seq_lens):  # padding rows untouched, every other row written in full
        rows = written[starts[s] : starts[s + 1]]
        assert bool(rows.all()) if seq_len > 0 else not bool(rows.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("block_size", [16, 32])
def test_dtypes_head_dims_block_sizes(
    kernels: ModuleType, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int
) -> None:
    check(kernels, make_case(*BATCHES["mixed"], 8, 2, head_dim, block_size, dtype, device, seed=head_dim + block_size))


def test_float16(kernels: ModuleType, device: torch.device) -> None:
    check(kernels, make_case(*BATCHES["chunk_over_prefix"], 4, 1, 80, 16, torch.float16, device))


# a decode row deep in a long context (several key tiles; a window starting tiles in) next to the mixed batch
OPTION_BATCH = ([1, 9, 1, 20, 1], [33, 30, 150, 20, 64])
OPTIONS = {
    "window": {"sliding_window": 8},
    "window_one": {"sliding_window": 1},  # each row sees only itself
    "softcap": {"softcap": 2.0},  # small, so the cap bites (logits of ~unit q, k at scale 1/8 reach ~3)
    "alibi": {"alibi_slopes": 2.0 ** -torch.arange(1, 9, dtype=torch.float32)},
    "all": {"sliding_window": 13, "softcap": 2.0, "alibi_slopes": torch.linspace(0.5, 0.01, 8)},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("option", OPTIONS)
def test_options(kernels: ModuleType, device: torch.device, option: str, dtype: torch.dtype) -> None:
    case = make_case(*OPTION_BATCH, 8, 2, 64, 16, dtype, device, seed=7)
    options = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in OPTIONS[option].items()}
    with_option = check(kernels, case, **options)
    plain, _ = run_both(kernels, case)
    assert not torch.allclose(with_option.float(), plain.float(), atol=1e-2)  # the option changed the output


def test_softcap_scales_logits(kernels: ModuleType, device: torch.device) -> None:
    """Logits far above the cap: capped at +-softcap, unlike the plain softmax."""
    case = make_case([3], [20], 4, 2, 64, 16, torch.float32, device, seed=3)
    case["scale"] = 1.0
    check(kernels, case, softcap=5.0)


def test_grid_larger_than_needed(kernels: ModuleType, device: torch.device) -> None:
    """max_query_len only sizes the grid: a larger one (a padded CUDA graph) changes nothing."""
    case = make_case(*BATCHES["mixed"], 8, 2, 64, 16, torch.float32, device)
    small, _ = run_both(kernels, case)
    case["max_query_len"] = 3 * case["max_query_len"]
    torch.testing.assert_close(run_both(kernels, case)[0], small, rtol=0, atol=0)


def test_strided_out(kernels: ModuleType, device: torch.device) -> None:
    """out may be a strided view too (heads contiguous); nothing outside it is written."""
    case = make_case(*BATCHES["mixed"], 4, 2, 64, 16, torch.float32, device)
    tokens, heads, dim = case["q"].shape
    buffer = torch.full((tokens, heads + 3, dim), SENTINEL, device=device)
    out = buffer[:, 1 : heads + 1]
    kernels.paged_attention(out=out, **case)
    ref = paged_attention_reference(out=torch.empty(tokens, heads, dim, device=device), **case)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert bool((buffer[:, 0] == SENTINEL).all()) and bool((buffer[:, heads + 1 :] == SENTINEL).all())


def test_bad_shapes_raise(kernels: ModuleType, device: torch.device) -> None:
    case = make_case([1], [5], 4, 2, 64, 16, torch.float32, device)
    out = torch.empty_like(case["q"])
    with pytest.raises(ValueError, match="does not fit"):
        kernels.paged_attention(out=out, **{**case, "q": torch.empty(1, 3, 64, device=device)})
    with pytest.raises(ValueError, match="power of two"):
        k_cache = torch.empty(4, 24, 2, 64, device=device)
        kernels.paged_attention(out=out, **{**case, "k_cache": k_cache, "v_cache": k_cache})
    with pytest.raises(ValueError, match="positive"):
        kernels.paged_attention(out=out, **case, softcap=0.0)
    with pytest.raises(ValueError, match="positive"):
        kernels.paged_attention(out=out, **case, sliding_window=0)
    with pytest.raises(ValueError, match="alibi"):
        kernels.paged_attention(out=out, **case, alibi_slopes=torch.ones(3, device=device))
