"""The split-KV (flash-decoding) path of paged_attention: a decode-only batch's keys split over num_kv_splits
programs and merged, against the pure-torch reference and the unsplit kernel: long and one-token contexts (splits
with no key), padding, more splits than key tiles, each option (a window leaves most splits empty); the split
count heuristic; the misuse that must raise.
"""

from __future__ import annotations

from types import ModuleType

import pytest
import torch

from engine.attention.triton_config import MAX_KV_SPLITS, choose_num_kv_splits
from tests.triton.cases import SENTINEL, TOL, check, make_case, run_both

pytestmark = pytest.mark.slow

# decode rows: a one-token context, block edges, a long context, padding both ways (q_len 0; seq_len 0)
Q_LENS, SEQ_LENS = [1, 1, 1, 0, 1, 1], [1, 17, 150, 0, 0, 64]


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_split_matches_reference(kernels: ModuleType, device: torch.device, dtype: torch.dtype, splits: int) -> None:
    case = make_case(Q_LENS, SEQ_LENS, 8, 2, 64, 16, dtype, device, seed=splits)
    out = check(kernels, case, num_kv_splits=splits)
    assert bool((out[3] == SENTINEL).all()) and not bool((out[:3] == SENTINEL).any())  # row 3: seq_len 0
    unsplit, _ = run_both(kernels, case)
    torch.testing.assert_close(out.float(), unsplit.float(), **TOL[dtype])


OPTIONS = {
    "window": {"sliding_window": 8},
    "softcap": {"softcap": 2.0},
    "alibi": {"alibi_slopes": torch.linspace(0.5, 0.01, 8)},
    "all": {"sliding_window": 40, "softcap": 2.0, "alibi_slopes": torch.linspace(0.5, 0.01, 8)},
}


@pytest.mark.parametrize("option", OPTIONS)
def test_split_with_options(kernels: ModuleType, device: torch.device, option: str) -> None:
    case = make_case(Q_LENS, SEQ_LENS, 8, 2, 80, 32, torch.float32, device, seed=11)
    options = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in OPTIONS[option].items()}
    check(kernels, case, num_kv_splits=4, **options)


def test_split_mqa(kernels: ModuleType, device: torch.device) -> None:
    check(kernels, make_case(Q_LENS, SEQ_LENS, 4, 1, 64, 16, torch.bfloat16, device, seed=5), num_kv_splits=5)


def test_split_needs_decode_only_batch(kernels: ModuleType, device: torch.device) -> None:
    case = make_case([2, 1], [5, 9], 4, 2, 64, 16, torch.float32, device)
    out = torch.empty_like(case["q"])
    with pytest.raises(ValueError, match="decode-only"):
        kernels.paged_attention(out=out, **case, num_kv_splits=2)
    with pytest.raises(ValueError, match="num_kv_splits"):
        kernels.paged_attention(out=out, **{**case, "max_query_len": 1}, num_kv_splits=MAX_KV_SPLITS + 1)


def test_choose_num_kv_splits() -> None:
    assert choose_num_kv_splits(num_seqs=256, num_kv_heads=8, max_seq_len=32768, num_sms=132) == 1  # SMs busy
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=8, max_seq_len=200, num_sms=132) == 1  # short context
    long_context = choose_num_kv_splits(num_seqs=2, num_kv_heads=8, max_seq_len=32768, num_sms=132)
    assert 1 < long_context <= MAX_KV_SPLITS
    assert 2 * 8 * long_context >= 132  # fills the SMs
    assert choose_num_kv_splits(num_seqs=1, num_kv_heads=1, max_seq_len=10**6, num_sms=132) == MAX_KV_SPLITS
