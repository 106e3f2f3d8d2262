"""Property-based tests of the scheduler and block manager (hypothesis state machines, no torch): random sequences
of add / step / failed step / abort / prefix-cache reset, over small pools, odd block sizes and budgets, with and
without the prefix cache.

A shadow KV cache records what each step writes into each slot: (position, every token up to it), what a real layer's
K/V depends on. After every step, every position a running sequence counts as computed (its own prefill, a preempted
request's recompute, a prefix-cache hit, also one filled by another request in the same step) must hold that
sequence's own entry. Between rules: reference counts equal the block tables, every block is exactly one of in use /
free / cached-evictable, the cache maps agree, cached blocks were fully written, waiting sequences own nothing. At the
end every request finishes with the tokens a solo run gives and every block is free.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

# A few shared leading token runs, so prompts often share (and partly share) cached blocks.
PREFIXES = [[], [7] * 3, [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 60, 61], list(range(100, 117))]
MAX_DRAIN_STEPS = 5000
KV = tuple[int, tuple[int, ...]]


def kv_entry(seq: Sequence, position: int) -> KV:
    """What a layer writes at `position`: it depends on the position and on every token up to it."""
    return position, tuple(seq.token_slice(0, position + 1))


def fake_token(seq: Sequence, index: int) -> int:
    """Output `index` of `seq` as a deterministic 'model' gives it, whatever was batched with it."""
    return 1000 + (sum(map(ord, seq.request_id)) * 31 + index) % 997


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.live: dict[str, Sequence] = {}
        self.finished: list[Sequence] = []

    @initialize(
        num_blocks=st.integers(2, 24),
        block_size=st.sampled_from([1, 2, 3, 4, 8]),
        max_num_seqs=st.integers(1, 6),
        budget=st.integers(1, 40),
        caching=st.booleans(),
        watermark=st.sampled_from([0.0, 0.1]),
    )
    def setup(
        self, num_blocks: int, block_size: int, max_num_seqs: int, budget: int, caching: bool, watermark: float
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.sched = Scheduler(self.bm, max_num_seqs, budget, watermark=watermark)
        self.kv: list[list[KV | None]] = [[None] * block_size for _ in range(num_blocks)]

    # ---- rules ------------------------------------------------------------------------------

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 40), max_size=12), max_new=st.integers(1, 12))
    def add(self, prefix: list[int], tail: list[int], max_new: int) -> None:
        tokens = prefix + tail or [5]
        seq = Sequence(f"r{self.count}", tokens, max_new)
        self.count += 1
        if len(tokens) + max_new > self.sched.capacity_tokens:
            with pytest.raises(ValueError, match="exceeds the KV cache capacity"):
                self.sched.add(seq)
            return
        self.sched.add(seq)
        self.live[seq.request_id] = seq

    @rule()
    def step(self) -> None:
        batch = self.sched.schedule()
        self._check_batch(batch)
        for item in batch.scheduled:  # the model writes the K/V of every scheduled position
            seq, bs = item.seq, self.bm.block_size
            for p in range(item.start, item.end):
                self.kv[seq.block_table[p // bs]][p % bs] = kv_entry(seq, p)
        for item in batch.scheduled:  # ... before any row attends: every earlier position must be its own
            self._check_kv(item.seq, item.end)
        sampled = [fake_token(it.seq, it.seq.num_output_tokens) if it.sample else None for it in batch.scheduled]
        self.sched.update(batch, sampled)
        for item in batch.scheduled:
            seq = item.seq
            if item.sample and seq.num_output_tokens >= seq.max_new_tokens and not seq.is_finished:
                self.sched.finish(seq, "length")
                self.finished.append(self.live.pop(seq.request_id))

    @rule()
    def failed_step(self) -> None:
        """The model raised: nothing was written; the step's sequences go back to wait, its blocks are uncached."""
        batch = self.sched.schedule()
        self._check_batch(batch)
        hits = self.bm.hit_tokens
        self.sched.abandon(batch)
        assert self.bm.hit_tokens == hits - batch.hit_tokens
        for item in batch.scheduled:
            assert item.seq.status is SequenceStatus.WAITING and not item.seq.block_table

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        seq = self.sched.abort(rid)
        assert seq is self.live.pop(rid) and seq.finish_reason == "abort" and not seq.block_table

    @rule()
    def reset_prefix_cache(self) -> None:
        self.bm.reset_prefix_cache()
        assert not self.bm.evictable

    # ---- invariants -------------------------------------------------------------------------

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        bm, sched = self.bm, self.sched
        refs = [0] * bm.num_blocks
        for seq in sched.running:
            assert seq.status is SequenceStatus.RUNNING
            assert len(seq.block_table) * bm.block_size >= seq.num_computed_tokens
            for b in seq.block_table:
                refs[b] += 1
        for seq in sched.waiting:  # preempted, refused for now, or sent back by a failed step: owns nothing
            assert seq.status is SequenceStatus.WAITING and seq.block_table == [] and seq.num_computed_tokens == 0
        assert refs == bm.ref_counts, "reference counts differ from the block tables"
        free, evictable = list(bm.free_block_ids), list(bm.evictable)
        assert len(free) == len(set(free)) and not set(free) & set(evictable)
        for b in range(bm.num_blocks):
            states = (refs[b] > 0) + (b in free) + (b in evictable)
            assert states == 1, f"block {b} is in {states} states"
            assert (b in evictable) <= (bm.block_hash[b] is not None)
        assert {b: d for d, b in bm.cached.items()} == {
            b: bm.block_hash[b] for b in range(bm.num_blocks) if bm.block_hash[b] is not None
        }
        if not bm.enable_prefix_caching:
            assert not bm.cached and bm.hit_tokens == 0
        assert len(sched.running) <= sched.max_num_seqs
        assert bm.num_free_blocks == len(free) + len(evictable) and 0.0 <= bm.usage <= 1.0

    @invariant()
    def cached_blocks_hold_their_tokens(self) -> None:
        """Every block in the prefix cache was completely written by a step that ran."""
        for block_id in self.bm.cached.values():
            assert None not in self.kv[block_id], f"cached block {block_id} was never fully written"

    def teardown(self) -> None:
        if not hasattr(self, "sched"):
            return
        steps = 0
        while self.sched.has_unfinished():
            self.step()
            steps += 1
            assert steps < MAX_DRAIN_STEPS, "the scheduler stopped making progress"
        assert not self.live
        for seq in self.finished:
            assert seq.output_token_ids == [fake_token(seq, i) for i in range(seq.max_new_tokens)], seq.request_id
            assert seq.block_table == []
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.usage == 0.0
        assert self.bm.ref_counts == [0] * self.bm.num_blocks

    # ---- helpers ----------------------------------------------------------------------------

    def _check_batch(self, batch: ScheduledBatch) -> None:
        sched, bs = self.sched, self.bm.block_size
        seqs = [it.seq for it in batch.scheduled]
        assert len(seqs) == len({id(s) for s in seqs}) <= sched.max_num_seqs
        prefill = sum(it.num_new_tokens for it in batch.prefills)
        assert prefill <= sched.max_batch_prefill_tokens, "the prefill budget was exceeded"
        for it in batch.scheduled:
            assert it.seq in sched.running and it.num_new_tokens >= 1
            assert it.start == it.seq.num_computed_tokens and it.end <= it.seq.num_tokens
            assert it.sample == (it.end == it.seq.num_tokens)
            assert len(it.seq.block_table) * bs >= it.end, "positions scheduled without a KV slot"
        for it in batch.decodes:
            assert it.num_new_tokens == 1 and it.sample
        for seq in batch.preempted:
            assert seq not in seqs and seq.block_table == [] and seq in sched.waiting

    def _check_kv(self, seq: Sequence, end: int) -> None:
        bs = self.bm.block_size
        for p in range(end):
            got = self.kv[seq.block_table[p // bs]][p % bs]
            assert got == kv_entry(seq, p), f"{seq.request_id} position {p} reads K/V written for {got}"


SchedulerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,  # the same cases on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase
