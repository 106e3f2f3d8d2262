"""The prefix cache (engine.block_manager, engine.scheduler) without torch: blocks registered when the step that
fills them is scheduled (so requests admitted together share them), matched by chained hashes of the leading tokens,
shared with reference counts, evicted least recently freed first, and the scheduler starting a request after its hits
(always leaving one token to compute); a failed step uncaches what it was to fill.
"""

from __future__ import annotations

import random

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence

from .test_scheduler import expected_output, fake_token

BS = 4


def seq_of(rid: str, tokens: list[int], max_new: int = 3) -> Sequence:
    return Sequence(rid, list(tokens), max_new)


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """As if the model ran every token of `seq` (blocks allocated, KV computed, blocks registered)."""
    assert bm.allocate(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.register(seq)
    return seq


def check_invariants(bm: BlockManager, seqs: list[Sequence]) -> None:
    refs = [0] * bm.num_blocks
    for s in seqs:
        for b in s.block_table:
            refs[b] += 1
    assert refs == bm.ref_counts, "ref counts differ from the block tables"
    free, evictable = set(bm.free_block_ids), set(bm.evictable)
    assert not free & evictable
    for b in range(bm.num_blocks):
        in_use = refs[b] > 0
        assert in_use + (b in free) + (b in evictable) == 1, f"block {b} is in no state or in two"
        assert (b in evictable) <= (bm.block_hash[b] is not None)
    assert {b for b in bm.cached.values()} == {b for b in range(bm.num_blocks) if bm.block_hash[b] is not None}


def test_a_later_sequence_takes_the_blocks_of_its_leading_tokens() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = computed(bm, seq_of("a", list(range(10))))  # blocks 0-3, 4-7 full and cached; 8-9 partial
    b = seq_of("b", list(range(8)) + [50, 51, 52])
    assert bm.match_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.ref_counts[x] for x in b.block_table] == [2, 2]
    check_invariants(bm, [a, b])


def test_a_match_leaves_at_least_one_token_to_compute() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = computed(bm, seq_of("a", list(range(8))))
    same = seq_of("b", list(range(8)))
    assert bm.match_prefix(same) == 4  # not 8: the last token must run to give the next token's logits
    check_invariants(bm, [a, same])


def test_hashes_chain_over_the_whole_prefix() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = computed(bm, seq_of("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    shifted = seq_of("b", [9, 9, 9, 9, 5, 6, 7, 8, 9])  # same second block, different first one
    assert bm.match_prefix(shifted) == 0
    check_invariants(bm, [a, shifted])


def test_freed_blocks_stay_cached_until_evicted_least_recent_first() -> None:
    bm = BlockManager(4, BS, enable_prefix_caching=True)
    a = computed(bm, seq_of("a", list(range(12))))  # 3 full blocks cached
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 3 and bm.usage == 0.0
    check_invariants(bm, [])
    b = seq_of("b", list(range(12)) + [77])
    assert bm.match_prefix(b) == 12  # all three come back from the evictable set
    check_invariants(bm, [b])
    bm.free(b)
    c = seq_of("c", [90 + i for i in range(9)])
    assert bm.allocate(c, 9)  # the one free block, then two evictions: the tail blocks of a/b's prefix go first
    check_invariants(bm, [c])
    d = seq_of("d", list(range(12)) + [77])
    assert bm.match_prefix(d) == 4  # only the first block survived
    check_invariants(bm, [c, d])


def test_reset_forgets_unreferenced_blocks_only() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = computed(bm, seq_of("a", list(range(8))))
    b = computed(bm, seq_of("b", [7] * 8))
    bm.free(b)
    bm.reset_prefix_cache()
    assert not bm.evictable and len(bm.free_block_ids) == 16 - 2
    check_invariants(bm, [a])
    assert bm.match_prefix(seq_of("c", [7] * 9)) == 0 and bm.match_prefix(seq_of("d", list(range(9)))) == 8


def test_the_first_writer_of_a_prefix_keeps_it() -> None:
    bm = BlockManager(16, BS, enable_prefix_caching=True)
    a = computed(bm, seq_of("a", list(range(8))))
    twin = computed(bm, seq_of("b", list(range(8))))  # computed independently, same tokens
    assert bm.match_prefix(seq_of("c", list(range(9)))) == 8
    assert all(bm.block_hash[x] is None for x in twin.block_table)
    bm.free(twin)
    assert len(bm.evictable) == 0 and len(bm.free_block_ids) == 16 - len(a.block_table)  # twin: not cached


def test_disabled_cache_matches_nothing() -> None:
    bm = BlockManager(16, BS)
    a = computed(bm, seq_of("a", list(range(10))))
    assert bm.match_prefix(seq_of("b", list(range(10)))) == 0
    bm.free(a)
    assert not bm.evictable and len(bm.free_block_ids) == 16


def _run(sched: Scheduler, seqs: list[Sequence]) -> None:
    """Fake engine loop over `seqs` (all added), checking the cache invariants every step."""
    for _ in range(10_000):
        if not sched.has_unfinished():
            return
        batch = sched.schedule()
        for it in batch.scheduled:
            assert it.start == it.seq.num_computed_tokens and len(it.seq.block_table) * BS >= it.end
        sampled = [fake_token(it.seq, it.seq.num_output_tokens) if it.sample else None for it in batch.scheduled]
        sched.update(batch, sampled)
        for it in batch.scheduled:
            if it.sample and it.seq.num_output_tokens >= it.seq.max_new_tokens:
                sched.finish(it.seq, "length")
        check_invariants(sched.block_manager, list(sched.running) + list(sched.waiting))
    raise AssertionError("no progress")


def test_scheduler_starts_a_request_after_its_hits() -> None:
    sched = Scheduler(BlockManager(32, BS, enable_prefix_caching=True), 8, 64, watermark=0.0)
    first = seq_of("a", list(range(13)))
    sched.add(first)
    _run(sched, [first])
    second = seq_of("b", list(range(12)) + [40, 41])
    sched.add(second)
    batch = sched.schedule()
    assert [(it.seq.request_id, it.start, it.num_new_tokens) for it in batch.prefills] == [("b", 12, 2)]
    assert second.num_cached_tokens == 12 and sched.block_manager.hit_tokens == 12


def test_requests_admitted_in_one_step_share_the_blocks_it_fills() -> None:
    """The first request's prefill fills the shared blocks; the others in the same step start after them."""
    sched = Scheduler(BlockManager(32, BS, enable_prefix_caching=True), 8, 64, watermark=0.0)
    shared = list(range(9))  # two full blocks, then one token of a third
    seqs = [seq_of(f"r{i}", shared + [100 + i, 200 + i]) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [(it.start, it.num_new_tokens) for it in batch.prefills] == [(0, 11), (8, 3), (8, 3)]
    assert seqs[1].block_table[:2] == seqs[2].block_table[:2] == seqs[0].block_table[:2]
    assert sched.block_manager.hit_tokens == 16 and batch.registered == seqs[0].block_table[:2]
    check_invariants(sched.block_manager, seqs)
    _run(sched, seqs)
    assert all(s.output_token_ids == expected_output(s) for s in seqs)


def test_a_chunk_registers_only_the_blocks_it_completes() -> None:
    sched = Scheduler(BlockManager(32, BS, enable_prefix_caching=True), 8, 6, watermark=0.0)
    a, b = seq_of("a", list(range(10))), seq_of("b", list(range(10)))
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()  # budget 6: a's first chunk fills block 0 only; b gets nothing this step
    assert [(it.seq.request_id, it.start, it.num_new_tokens) for it in batch.prefills] == [("a", 0, 6)]
    assert batch.registered == a.block_table[:1] and a.num_registered_blocks == 1
    sched.update(batch, [None])
    batch = sched.schedule()  # a's second chunk completes block 1; b then starts after both of a's blocks
    assert [(it.seq.request_id, it.start) for it in batch.prefills] == [("a", 6), ("b", 8)]
    assert b.block_table[:2] == a.block_table[:2]


def test_a_failed_step_uncaches_what_it_was_to_fill() -> None:
    bm = BlockManager(32, BS, enable_prefix_caching=True)
    sched = Scheduler(bm, 8, 64, watermark=0.0)
    old = seq_of("old", list(range(5)))
    sched.add(old)
    _run(sched, [old])  # block 0 of range(5) is computed and cached
    seqs = [seq_of(f"r{i}", list(range(9)) + [50 + i]) for i in range(2)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert [it.start for it in batch.prefills] == [4, 8] and len(batch.registered) == 1
    hits = bm.hit_tokens
    sched.abandon(batch)  # the model never ran: block 1 holds no KV
    assert list(sched.waiting) == seqs and not sched.running
    assert bm.hit_tokens == hits - 4 - 8 and sched.num_preemptions == 0  # a failure, not a preemption
    assert all(not s.block_table and s.num_computed_tokens == 0 for s in seqs)
    check_invariants(bm, seqs)
    retry = sched.schedule()
    assert [it.start for it in retry.prefills] == [4, 8]  # block 0 (truly computed) still serves
    _run(sched, seqs)
    assert all(s.output_token_ids == expected_output(s) for s in seqs)


def test_random_workload_with_shared_prefixes_preemption_and_eviction() -> None:
    """Many requests over few blocks: every output is right and no block is lost or double-owned."""
    rng = random.Random(7)
    bm = BlockManager(24, BS, enable_prefix_caching=True)
    sched = Scheduler(bm, 6, 16, watermark=0.0)
    prefixes = [[rng.randrange(1000) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    seqs = []
    for i in range(40):
        tokens = rng.choice(prefixes) + [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        seqs.append(seq_of(f"r{i}", tokens, max_new=rng.randrange(1, 12)))
    for s in seqs[:10]:
        sched.add(s)
    _run(sched, seqs)
    for s in seqs[10:]:
        sched.add(s)
    _run(sched, seqs)
    for s in seqs:
        assert s.output_token_ids == expected_output(s), s.request_id
    assert bm.hit_tokens > 0 and sched.num_preemptions > 0
    assert bm.num_free_blocks == bm.num_blocks
