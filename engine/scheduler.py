"""Continuous-batching scheduler: decodes first, then prefill chunks, preempt-by-recompute. No torch.

Each step gets a prefill-token budget (`max_batch_prefill_tokens`); decodes (one token each) are
bounded only by `max_num_seqs`. Waiting requests are admitted first come first served, starting after
their prefix-cache hits (blocks another request fills in the same step count: the step writes every K/V
of a layer before any row attends); when KV blocks run out, the newest running request is preempted (its blocks
freed, recomputed later, mostly from the prefix cache).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    start: int  # seq.num_computed_tokens when scheduled: first position computed this step
    num_new_tokens: int
    sample: bool  # this step reaches the end of the sequence's tokens, so a token is sampled

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class ScheduledBatch:
    decodes: list[ScheduledSeq] = field(default_factory=list)  # one token each, each sampling
    prefills: list[ScheduledSeq] = field(default_factory=list)  # prompt (or recompute) chunks
    preempted: list[Sequence] = field(default_factory=list)
    registered: list[int] = field(default_factory=list)  # blocks this step fills, cached before it runs
    hit_tokens: int = 0  # prefix-cache hits of the requests admitted this step

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        """Decodes then prefills: the order of the model runner's flattened batch."""
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_new_tokens for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_batch_prefill_tokens: int,
        watermark: float = 0.01,
    ) -> None:
        if max_num_seqs < 1 or max_batch_prefill_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_prefill_tokens must be >= 1")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_batch_prefill_tokens = max_batch_prefill_tokens
        # Blocks kept free when admitting new requests, so running ones can grow a while.
        self.watermark_blocks = int(watermark * block_manager.num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add(self, seq: Sequence) -> None:
        # A sequence that could not fit alone in the whole pool would be preempted forever.
        if seq.num_prompt_tokens + seq.max_new_tokens > self.capacity_tokens:
            raise ValueError(
                f"prompt ({seq.num_prompt_tokens} tokens) + max_new_tokens ({seq.max_new_tokens}) "
                f"exceeds the KV cache capacity of {self.capacity_tokens} tokens"
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_batch_prefill_tokens
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            n = seq.num_uncomputed_tokens
            is_prefill = n > 1  # a prompt chunked over several steps, or a recompute
            if is_prefill:
                n = min(n, budget)
                if n == 0:
                    i += 1
                    continue
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()  # newest first; never one already scheduled
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self._add_to_batch(batch, seq, n)
                if is_prefill:
                    budget -= n
                i += 1
                continue
            break  # seq itself was preempted, and it was the last running one

        while self.waiting and not batch.preempted and budget > 0:
            if len(self.running) >= self.max_num_seqs:
                break
            seq = self.waiting[0]
            bm = self.block_manager
            hits = bm.match_prefix(seq)  # cached leading blocks (0 without the prefix cache)
            seq.num_computed_tokens = hits
            n = min(seq.num_uncomputed_tokens, budget)
            needed = bm.blocks_needed(seq, seq.num_computed_tokens + n)
            reserve = self.watermark_blocks if self.running else 0
            if needed + reserve > bm.num_free_blocks:
                bm.free(seq)  # give the matched blocks back (they stay cached) until it fits
                seq.num_computed_tokens = 0
                break  # first come first served: nobody overtakes the head of the queue
            bm.allocate(seq, seq.num_computed_tokens + n)
            seq.num_cached_tokens = hits
            bm.hit_tokens += hits
            batch.hit_tokens += hits
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            self._add_to_batch(batch, seq, n)
            budget -= n
        return batch

    def _add_to_batch(self, batch: ScheduledBatch, seq: Sequence, n: int) -> None:
        start = seq.num_computed_tokens
        item = ScheduledSeq(seq, start, n, sample=start + n == seq.num_tokens)
        batch.registered += self.block_manager.register(seq, start + n)
        # A decode is one token that samples; a 1-token chunk cut short by the budget is a prefill.
        (batch.decodes if n == 1 and item.sample else batch.prefills).append(item)

    def _preempt(self, seq: Sequence, counted: bool = True) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        if counted:  # not for a failed step's sequences: they lost no KV to pressure
            seq.num_preemptions += 1
            self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> None:
        """Advance each scheduled sequence; `sampled` is aligned with `batch.scheduled` (None: no token, either not a
        sampling row or a row whose sampling failed, whose request the engine then finishes)."""
        for item, token in zip(batch.scheduled, sampled, strict=True):
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.sample and token is not None:
                item.seq.output_token_ids.append(token)

    def abandon(self, batch: ScheduledBatch) -> None:
        """The step for `batch` failed: uncache the blocks it was to fill and send its sequences back to wait
        (recomputed from their truly computed cached blocks), so no later request reads KV never written."""
        self.block_manager.unregister(batch.registered)
        self.block_manager.hit_tokens -= batch.hit_tokens  # counted again when they are admitted again
        for item in reversed(batch.scheduled):
            if item.seq in self.running:
                self.running.remove(item.seq)
                self._preempt(item.seq, counted=False)

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._remove(seq)

    def abort(self, request_id: str) -> Sequence | None:
        for seq in list(self.running) + list(self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
