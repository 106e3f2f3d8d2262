"""Unit tests for engine.block_manager: free list, ref counts, block tables and usage.

Pure Python: the block manager must be importable without torch (checked in a subprocess).
"""

import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_manager import BlockManager
from engine.sequence import Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_seq(n: int = 4, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(n)), max_new_tokens=4)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(4, 0)


def test_initial_state_all_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.num_free_blocks == 8
    assert bm.usage == 0.0
    assert bm.ref_counts == [0] * 8
    assert sorted(bm.free_block_ids) == list(range(8))


@pytest.mark.parametrize(
    ("num_tokens", "expected"),
    [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)],
)
def test_blocks_needed_rounds_up(num_tokens, expected):
    bm = BlockManager(num_blocks=8, block_size=4)
    assert bm.blocks_needed(make_seq(), num_tokens) == expected


def test_allocate_grows_block_table_incrementally():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq()
    assert bm.allocate(seq, 3)
    assert len(seq.block_table) == 1
    first = list(seq.block_table)
    # Still inside the first block: nothing new.
    assert bm.allocate(seq, 4)
    assert seq.block_table == first
    assert bm.blocks_needed(seq, 4) == 0
    # One past the block boundary: exactly one more block, appended after the old ones.
    assert bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and seq.block_table[0] == first[0]
    assert bm.allocate(seq, 16)
    assert len(seq.block_table) == 4
    assert len(set(seq.block_table)) == 4
    assert bm.num_free_blocks == 4
    # Asking for fewer tokens than already covered never shrinks the table.
    assert bm.allocate(seq, 1)
    assert len(seq.block_table) == 4


def test_allocate_sets_ref_counts_and_takes_from_free_list():
    bm = BlockManager(num_blocks=6, block_size=2)
    seq = make_seq()
    assert bm.allocate(seq, 5)  # 3 blocks
    for block_id in seq.block_table:
        assert bm.ref_counts[block_id] == 1
        assert block_id not in bm.free_block_ids
    assert sum(bm.ref_counts) == 3
    assert bm.num_free_blocks == 3


def test_two_sequences_get_disjoint_blocks():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, b = make_seq(rid="a"), make_seq(rid="b")
    assert bm.allocate(a, 4)
    assert bm.allocate(b, 6)
    assert not set(a.block_table) & set(b.block_table)
    assert bm.num_free_blocks == 1


def test_can_allocate_matches_free_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq()
    assert bm.can_allocate(seq, 16)
    assert not bm.can_allocate(seq, 17)
    assert bm.allocate(seq, 8)
    # Counts only the extra blocks beyond those the sequence already has.
    assert bm.can_allocate(seq, 16)
    assert not bm.can_allocate(seq, 17)
    other = make_seq(rid="o")
    assert bm.can_allocate(other, 8)
    assert not bm.can_allocate(other, 9)


def test_allocate_when_short_fails_without_side_effects():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(rid="a"), make_seq(rid="b")
    assert bm.allocate(a, 12)  # 3 of 4 blocks
    before = (list(bm.free_block_ids), list(bm.ref_counts), list(a.block_table))
    b.block_table = []
    assert not bm.allocate(b, 8)  # needs 2, only 1 free
    assert b.block_table == []
    assert (list(bm.free_block_ids), list(bm.ref_counts), list(a.block_table)) == before
    # Growing an existing table past the pool also changes nothing.
    assert not bm.allocate(a, 20)
    assert (list(bm.free_block_ids), list(bm.ref_counts), list(a.block_table)) == before


def test_free_returns_blocks_and_clears_table():
    bm = BlockManager(num_blocks=5, block_size=3)
    a, b = make_seq(rid="a"), make_seq(rid="b")
    assert bm.allocate(a, 7)  # 3 blocks
    assert bm.allocate(b, 4)  # 2 blocks
    assert bm.num_free_blocks == 0
    a_blocks = list(a.block_table)
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free_blocks == 3
    assert sorted(bm.free_block_ids) == sorted(a_blocks)
    assert all(bm.ref_counts[i] == 0 for i in a_blocks)
    assert all(bm.ref_counts[i] == 1 for i in b.block_table)
    bm.free(b)
    assert bm.num_free_blocks == 5
    assert bm.ref_counts == [0] * 5
    # Freeing an empty table is a no-op.
    bm.free(b)
    assert bm.num_free_blocks == 5


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=2, block_size=2)
    a = make_seq(rid="a")
    assert bm.allocate(a, 4)
    used = set(a.block_table)
    bm.free(a)
    b = make_seq(rid="b")
    assert bm.allocate(b, 4)
    assert set(b.block_table) == used


def test_shared_block_stays_until_last_reference_dropped():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = make_seq(rid="a"), make_seq(rid="b")
    assert bm.allocate(a, 2)
    shared = a.block_table[0]
    # Share a's block with b by hand (the ref-count contract a prefix cache would rely on).
    bm.ref_counts[shared] += 1
    b.block_table.append(shared)
    bm.free(a)
    assert shared not in bm.free_block_ids
    assert bm.ref_counts[shared] == 1
    bm.free(b)
    assert shared in bm.free_block_ids
    assert bm.ref_counts[shared] == 0
    assert bm.num_free_blocks == 3


def test_usage_fraction():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq()
    assert bm.usage == 0.0
    bm.allocate(a, 4)
    assert bm.usage == pytest.approx(0.25)
    bm.allocate(a, 16)
    assert bm.usage == pytest.approx(1.0)
    bm.free(a)
    assert bm.usage == 0.0


def test_block_manager_imports_no_torch():
    code = "import sys, engine.block_manager, engine.sequence; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, (
        "importing engine.block_manager pulled in torch (engine/__init__.py imports torch-heavy modules eagerly)"
        + result.stderr
    )
