"""Unit tests for engine.scheduler driven by a fake model loop (no model, no torch).

The loop calls schedule(), feeds made-up token ids to update() for items that sample, and
finishes sequences once they have max_new_tokens outputs, checking invariants at every step.
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

REPO_ROOT = Path(__file__).resolve().parents[2]


# ---- fake engine loop -------------------------------------------------------------------------


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=64, watermark=0.0) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, watermark=watermark)


def make_seq(rid: str, prompt_len: int, max_new: int) -> Sequence:
    return Sequence(rid, [100 + (i % 50) for i in range(prompt_len)], max_new, sampling_params=None)


def fake_token(seq: Sequence, index: int) -> int:
    """The token a deterministic 'model' produces as output number `index` of `seq`."""
    return 1000 + (sum(map(ord, seq.request_id)) * 31 + index) % 997


def expected_output(seq: Sequence) -> list[int]:
    return [fake_token(seq, i) for i in range(seq.max_new_tokens)]


def prefill_tokens(batch: ScheduledBatch) -> int:
    """Tokens charged to the prefill budget: everything but single-token items that sample (decodes)."""
    return sum(it.num_new_tokens for it in batch.scheduled if not (it.num_new_tokens == 1 and it.sample))


def check_blocks(sched: Scheduler) -> None:
    bm = sched.block_manager
    owned = [b for s in list(sched.running) + list(sched.waiting) for b in s.block_table]
    assert len(owned) == len(set(owned)), "a block is owned by two sequences"
    assert not set(owned) & set(bm.free_block_ids), "a free block is still owned"
    assert len(owned) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"
    assert len(set(bm.free_block_ids)) == bm.num_free_blocks
    for b in range(bm.num_blocks):
        assert bm.ref_counts[b] == (1 if b in set(owned) else 0)


def check_batch(sched: Scheduler, batch: ScheduledBatch) -> None:
    bs = sched.block_manager.block_size
    seqs = [it.seq for it in batch.scheduled]
    assert len(seqs) == len(set(map(id, seqs))), "a sequence is scheduled twice"
    assert len(seqs) <= sched.max_num_seqs
    assert len(sched.running) <= sched.max_num_seqs
    assert prefill_tokens(batch) <= sched.max_batch_prefill_tokens
    assert batch.scheduled == batch.decodes + batch.prefills
    for it in batch.scheduled:
        seq = it.seq
        assert seq in sched.running and seq.status is SequenceStatus.RUNNING
        assert it.num_new_tokens >= 1
        assert it.start == seq.num_computed_tokens
        assert it.end <= seq.num_tokens
        assert it.sample == (it.end == seq.num_tokens)
        assert len(seq.block_table) * bs >= it.end, "scheduled positions without KV slots"
    for it in batch.decodes:
        assert it.num_new_tokens == 1
    for seq in batch.preempted:
        assert seq not in seqs
        assert seq.num_computed_tokens == 0 and seq.block_table == []
        assert seq.status is SequenceStatus.WAITING and seq in sched.waiting
    check_blocks(sched)


def step(sched: Scheduler, admitted: list[Sequence] | None = None) -> ScheduledBatch:
    batch = sched.schedule()
    check_batch(sched, batch)
    if admitted is not None:  # `running` keeps admission order; batch.scheduled puts decodes first
        admitted += [s for s in sched.running if s not in admitted]
    sampled = [fake_token(it.seq, it.seq.num_output_tokens) if it.sample else None for it in batch.scheduled]
    sched.update(batch, sampled)
    for it in batch.scheduled:
        if it.sample and it.seq.num_output_tokens >= it.seq.max_new_tokens:
            sched.finish(it.seq, "length")
    check_blocks(sched)
    return batch


def run_to_completion(sched: Scheduler, max_steps: int = 10_000) -> list[ScheduledBatch]:
    batches = []
    while sched.has_unfinished():
        assert len(batches) < max_steps, "scheduler made no progress"
        batches.append(step(sched))
    return batches


def assert_all_done(sched: Scheduler, seqs: list[Sequence]) -> None:
    for seq in seqs:
        assert seq.is_finished and seq.finish_reason == "length", seq.request_id
        assert seq.output_token_ids == expected_output(seq), seq.request_id
        assert seq.block_table == []
    assert not sched.waiting and not sched.running
    bm = sched.block_manager
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    assert bm.ref_counts == [0] * bm.num_blocks


def items(batch: ScheduledBatch) -> list[tuple[str, int, int, bool]]:
    return [(it.seq.request_id, it.start, it.num_new_tokens, it.sample) for it in batch.scheduled]


# ---- basics -----------------------------------------------------------------------------------


def test_constructor_validates():
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), 0, 16)
    with pytest.raises(ValueError):
        Scheduler(BlockManager(4, 4), 4, 0)


def test_single_request_prefill_then_decodes():
    sched = make_scheduler()
    seq = make_seq("a", 5, 3)
    sched.add(seq)
    assert sched.num_waiting == 1 and sched.has_unfinished()
    b1 = step(sched)
    assert items(b1) == [("a", 0, 5, True)]
    assert b1.prefills and not b1.decodes and b1.num_tokens == 5
    assert seq.first_scheduled_time is not None
    b2 = step(sched)
    assert items(b2) == [("a", 5, 1, True)] and b2.decodes
    b3 = step(sched)
    assert items(b3) == [("a", 6, 1, True)]
    assert not sched.has_unfinished()
    assert_all_done(sched, [seq])


def test_empty_schedule_when_idle():
    sched = make_scheduler()
    batch = sched.schedule()
    assert batch.is_empty and batch.num_tokens == 0 and batch.preempted == []


def test_update_without_a_token_leaves_a_failed_row_to_be_finished():
    """A sampling row whose sampling failed gets None: its tokens count as computed, no output is appended, and the
    engine's finish() then frees its blocks."""
    sched = make_scheduler()
    seq = make_seq("a", 3, 2)
    sched.add(seq)
    batch = sched.schedule()
    sched.update(batch, [None])
    assert seq.num_computed_tokens == 3 and seq.output_token_ids == []
    sched.finish(seq, "error")
    assert seq.is_finished and seq.block_table == []
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_decodes_and_prefills_mixed_in_one_step():
    sched = make_scheduler()
    a, b = make_seq("a", 4, 5), make_seq("b", 6, 2)
    sched.add(a)
    step(sched)
    sched.add(b)
    batch = step(sched)
    assert [it.seq for it in batch.decodes] == [a]
    assert [it.seq for it in batch.prefills] == [b]
    assert items(batch) == [("a", 4, 1, True), ("b", 0, 6, True)]  # decodes first
    assert batch.num_tokens == 7
    run_to_completion(sched)
    assert_all_done(sched, [a, b])


# ---- prefill budget and chunking --------------------------------------------------------------


def test_prefill_budget_respected_per_step():
    sched = make_scheduler(budget=10)
    seqs = [make_seq(f"r{i}", 6, 3) for i in range(3)]
    for s in seqs:
        sched.add(s)
    b1 = step(sched)
    assert items(b1) == [("r0", 0, 6, True), ("r1", 0, 4, False)]  # r1 chunked to fit the budget
    assert prefill_tokens(b1) == 10
    assert sched.num_waiting == 1  # r2 waits: budget spent
    b2 = step(sched)
    assert items(b2) == [("r0", 6, 1, True), ("r1", 4, 2, True), ("r2", 0, 6, True)]
    batches = [b1, b2] + run_to_completion(sched)
    assert all(prefill_tokens(b) <= 10 for b in batches)
    assert_all_done(sched, seqs)


def test_long_prompt_chunked_only_last_chunk_samples():
    sched = make_scheduler(budget=8)
    seq = make_seq("long", 24, 2)
    sched.add(seq)
    chunks = [items(step(sched)) for _ in range(3)]
    assert chunks == [[("long", 0, 8, False)], [("long", 8, 8, False)], [("long", 16, 8, True)]]
    assert seq.num_output_tokens == 1
    run_to_completion(sched)
    assert_all_done(sched, [seq])


def test_long_prompt_chunked_alongside_decodes():
    sched = make_scheduler(budget=8)
    a, long = make_seq("a", 3, 6), make_seq("long", 20, 1)
    sched.add(a)
    step(sched)
    sched.add(long)
    seen = []
    for _ in range(3):
        batch = step(sched)
        assert [it.seq for it in batch.decodes] == [a]  # a keeps decoding during the long prefill
        seen += [(it.start, it.num_new_tokens, it.sample) for it in batch.prefills]
    assert seen == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert long.is_finished
    run_to_completion(sched)
    assert_all_done(sched, [a, long])


# ---- admission --------------------------------------------------------------------------------


def test_max_num_seqs_respected():
    sched = make_scheduler(max_num_seqs=2)
    seqs = [make_seq(f"r{i}", 2, 3) for i in range(5)]
    for s in seqs:
        sched.add(s)
    b1 = step(sched)
    assert [it.seq.request_id for it in b1.scheduled] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    batches = [b1] + run_to_completion(sched)
    assert max(len(b.scheduled) for b in batches) == 2
    first_step = {}
    for i, b in enumerate(batches):
        for it in b.scheduled:
            first_step.setdefault(it.seq.request_id, i)
    assert first_step == {"r0": 0, "r1": 0, "r2": 3, "r3": 3, "r4": 6}
    assert_all_done(sched, seqs)


def test_first_come_first_served_head_not_overtaken():
    # 10 blocks of 4. `big` holds 6 (then 7); `head` needs 5 and must wait, and the small request
    # behind it, which would fit, must not jump the queue.
    sched = make_scheduler(num_blocks=10, block_size=4)
    big, head, small = make_seq("big", 24, 4), make_seq("head", 20, 2), make_seq("small", 3, 2)
    sched.add(big)
    step(sched)
    sched.add(head)
    sched.add(small)
    while not big.is_finished:
        batch = step(sched)
        assert [it.seq for it in batch.scheduled] == [big]
        assert list(sched.waiting) == [head, small]
        assert small.first_scheduled_time is None
    batch = step(sched)
    assert items(batch) == [("head", 0, 20, True), ("small", 0, 3, True)]
    run_to_completion(sched)
    assert_all_done(sched, [big, head, small])


def test_watermark_keeps_blocks_free_for_running_requests():
    sched = make_scheduler(num_blocks=10, block_size=4, watermark=0.2)  # keeps 2 blocks in reserve
    a, b = make_seq("a", 8, 2), make_seq("b", 28, 1)  # a: 2 blocks; b: 7 blocks
    sched.add(a)
    sched.add(b)
    batch = step(sched)
    assert [it.seq for it in batch.scheduled] == [a]  # 8 free, b needs 7 + 2 in reserve
    assert list(sched.waiting) == [b]
    run_to_completion(sched)
    assert_all_done(sched, [a, b])


def test_add_rejects_request_that_can_never_fit():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens
    with pytest.raises(ValueError, match="capacity"):
        sched.add(make_seq("too-big", 10, 7))
    with pytest.raises(ValueError):
        sched.add(make_seq("prompt-too-big", 17, 1))
    assert not sched.has_unfinished()
    fits = make_seq("exact", 10, 6)  # 16 tokens exactly
    sched.add(fits)
    run_to_completion(sched)
    assert_all_done(sched, [fits])


# ---- preemption -------------------------------------------------------------------------------


def test_newest_running_sequence_is_preempted_and_recomputed():
    sched = make_scheduler(num_blocks=4, block_size=4)  # 16 token slots
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sched.add(a)
    sched.add(b)
    for _ in range(5):  # both reach position 8: 2 blocks each, pool full
        batch = step(sched)
        assert not batch.preempted
    assert sched.block_manager.num_free_blocks == 0
    batch = step(sched)  # a needs a 3rd block: b (the newest) gives up its blocks
    assert batch.preempted == [b]
    assert items(batch) == [("a", 8, 1, True)]
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.status is SequenceStatus.WAITING
    assert sched.waiting[0] is b and b.num_preemptions == 1 and sched.num_preemptions == 1
    assert b.num_output_tokens == 5  # outputs are kept; they get recomputed
    assert a.num_preemptions == 0
    batches = run_to_completion(sched)
    assert_all_done(sched, [a, b])
    # b came back with one prefill over its prompt and the outputs it already had.
    recompute = next(it for bt in batches for it in bt.scheduled if it.seq is b)
    assert (recompute.start, recompute.num_new_tokens, recompute.sample) == (0, 9, True)


def test_sequence_preempts_itself_when_it_is_the_newest():
    sched = make_scheduler(num_blocks=3, block_size=4)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sched.add(a)
    sched.add(b)
    step(sched)
    batch = step(sched)  # a takes the last free block; b cannot grow and is the newest
    assert items(batch) == [("a", 4, 1, True)]
    assert batch.preempted == [b]
    assert list(sched.waiting) == [b] and sched.running == [a]
    run_to_completion(sched)
    assert_all_done(sched, [a, b])


def test_preempted_requests_go_back_in_arrival_order():
    sched = make_scheduler(num_blocks=4, block_size=2, budget=64)
    seqs = [make_seq(f"r{i}", 2, 6) for i in range(4)]  # one block each to start, pool full
    for s in seqs:
        sched.add(s)
    step(sched)
    batch = step(sched)  # r0 needs a 2nd block: r3 goes; r1 needs one: r2 goes
    assert batch.preempted == [seqs[3], seqs[2]]
    assert list(sched.waiting) == [seqs[2], seqs[3]]
    run_to_completion(sched)
    assert_all_done(sched, seqs)


# ---- abort ------------------------------------------------------------------------------------


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(num_blocks=8, block_size=4, max_num_seqs=1)
    a, b = make_seq("a", 6, 5), make_seq("b", 6, 5)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert a in sched.running and b in sched.waiting
    assert sched.block_manager.num_free_blocks == 6
    assert sched.abort("b") is b
    assert b.is_finished and b.finish_reason == "abort" and b not in sched.waiting
    assert sched.abort("a") is a
    assert a.finish_reason == "abort" and a.block_table == [] and not sched.running
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished()
    assert sched.abort("a") is None
    assert sched.abort("nope") is None


def test_abort_preempted_sequence():
    sched = make_scheduler(num_blocks=3, block_size=4)
    a, b = make_seq("a", 4, 8), make_seq("b", 4, 8)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert step(sched).preempted == [b]
    assert sched.abort("b") is b
    run_to_completion(sched)
    assert a.output_token_ids == expected_output(a)
    check_blocks(sched)
    assert sched.block_manager.num_free_blocks == 3


# ---- invariants the model runner relies on ----------------------------------------------------


def test_every_decode_item_samples():
    # ModelRunner.prepare() makes every item in batch.decodes a sampling row. A 1-token prefill
    # chunk (budget left over = 1) must therefore not be filed as a decode.
    sched = make_scheduler(budget=8)
    a, b = make_seq("a", 7, 2), make_seq("b", 10, 2)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert all(it.sample for it in batch.decodes), items(batch)


def test_prefill_budget_of_one_token():
    # With max_batch_prefill_tokens=1 a prompt advances one token per step; those chunks must
    # still count against the budget.
    sched = make_scheduler(budget=1)
    a, b = make_seq("a", 3, 1), make_seq("b", 2, 1)
    sched.add(a)
    sched.add(b)
    batches = run_to_completion(sched)
    assert [prefill_tokens(bt) for bt in batches if prefill_tokens(bt) > 1] == []
    assert_all_done(sched, [a, b])


# ---- randomized -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(40))
def test_random_workloads_complete(seed):
    rng = random.Random(seed)
    block_size = rng.randint(1, 4)
    num_blocks = rng.randint(3, 12)
    capacity = num_blocks * block_size
    max_num_seqs = rng.randint(1, 5)
    budget = rng.randint(1, 20)
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, budget, watermark=rng.choice([0.0, 0.1, 0.3]))
    arrivals: list[tuple[int, Sequence]] = []
    t = 0
    for i in range(rng.randint(1, 12)):
        prompt = rng.randint(1, capacity - 1)
        seq = make_seq(f"s{seed}-{i}", prompt, rng.randint(1, capacity - prompt))
        t += rng.choice([0, 0, 1, 3])
        arrivals.append((t, seq))
    # Also offer requests that can never fit: rejected up front, never queued.
    with pytest.raises(ValueError):
        sched.add(make_seq("never", rng.randint(1, capacity), capacity))

    pending = list(arrivals)
    admitted: list[Sequence] = []
    n_steps = 0
    while pending or sched.has_unfinished():
        assert n_steps < 5_000, "no progress"
        while pending and pending[0][0] <= n_steps:
            sched.add(pending.pop(0)[1])
        step(sched, admitted)
        n_steps += 1

    seqs = [s for _, s in arrivals]
    assert_all_done(sched, seqs)
    assert admitted == seqs, "a request was admitted before an earlier one"


def test_scheduler_imports_no_torch():
    code = "import sys, engine.scheduler, engine.block_manager; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "importing engine.scheduler pulled in torch (via engine/__init__.py)" + result.stderr
