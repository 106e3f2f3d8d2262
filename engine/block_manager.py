"""Fixed-size KV-cache blocks: a free list, reference counts and the prefix cache. Pure Python, no torch.

A sequence's block table maps its token positions to physical blocks: position p lives in
block `block_table[p // block_size]` at offset `p % block_size`. With prefix caching, every block that the
scheduled step fills is registered, when the step is scheduled, under a hash chained over all tokens up to
its end (sha256 of the parent's digest and the block's token ids); a sequence with the same leading tokens
takes those blocks instead of recomputing them, even in the same step (each layer writes the whole step's
K/V before any row attends). Unreferenced registered blocks stay cached, evicted least recently freed
first, only when no free block is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # Prefix cache. Invariant: a block is in `evictable` iff its ref count is 0 and it holds a hash.
        self.cached: dict[bytes, int] = {}
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hit_tokens = 0  # prompt tokens served from the cache, since start

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: free ones and cached ones nobody references."""
        return len(self.free_block_ids) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks `seq` needs so that its first `num_tokens` positions have a slot."""
        needed = -(-num_tokens // self.block_size)
        return max(0, needed - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq.block_table` to cover `num_tokens` positions; False (and no change) if short."""
        n = self.blocks_needed(seq, num_tokens)
        if n > self.num_free_blocks:
            return False
        for _ in range(n):
            block_id = self._take_block()
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)
        return True

    def _take_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:  # evict the least recently freed cached block
            block_id, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block_id]]
            self.block_hash[block_id] = None
        # Invariant: a block handed out has no owner.
        assert self.ref_counts[block_id] == 0
        return block_id

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody references become free (or stay cached, evictable)."""
        for block_id in reversed(seq.block_table):  # the tail first: it is evicted first
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                if self.block_hash[block_id] is not None:
                    self.evictable[block_id] = None
                else:
                    self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0

    # ---- prefix cache ----

    def reset_prefix_cache(self) -> None:
        """Forget every cached block nobody references (they become plain free blocks)."""
        for block_id in self.evictable:
            del self.cached[self.block_hash[block_id]]
            self.block_hash[block_id] = None
            self.free_block_ids.append(block_id)
        self.evictable.clear()

    def _hash(self, seq: Sequence, index: int) -> bytes:
        """Digest of the block `index` of `seq`'s tokens, chained over every earlier block (cached on seq)."""
        hashes = seq.block_hashes
        while len(hashes) <= index:
            i, bs = len(hashes), self.block_size
            parent = hashes[-1] if hashes else b""
            tokens = array("q", seq.token_slice(i * bs, (i + 1) * bs)).tobytes()
            hashes.append(hashlib.sha256(parent + tokens).digest())
        return hashes[index]

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence with no blocks the cached blocks of its leading tokens; -> tokens covered.

        At least one token is left to compute, so the step that follows produces the next token's logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        for index in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(self._hash(seq, index))
            if block_id is None:
                break
            if self.ref_counts[block_id] == 0:
                del self.evictable[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_registered_blocks = len(seq.block_table)
        return len(seq.block_table) * self.block_size

    def register(self, seq: Sequence, num_tokens: int | None = None) -> list[int]:
        """Cache `seq`'s full blocks among its first `num_tokens` positions (default: the computed ones), whose KV
        is computed or is written by the step being scheduled; -> the newly cached block ids. The first writer
        of a given prefix wins."""
        if not self.enable_prefix_caching:
            return []
        covered = seq.num_computed_tokens if num_tokens is None else num_tokens
        full = min(covered // self.block_size, len(seq.block_table))
        added = []
        for index in range(seq.num_registered_blocks, full):
            digest, block_id = self._hash(seq, index), seq.block_table[index]
            if self.block_hash[block_id] is None and digest not in self.cached:
                self.cached[digest] = block_id
                self.block_hash[block_id] = digest
                added.append(block_id)
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)
        return added

    def unregister(self, block_ids: list[int]) -> None:
        """Forget the cache entries of `block_ids` (a step that failed never wrote their KV)."""
        for block_id in block_ids:
            digest = self.block_hash[block_id]
            if digest is None:
                continue
            del self.cached[digest]
            self.block_hash[block_id] = None
            if block_id in self.evictable:
                del self.evictable[block_id]
                self.free_block_ids.append(block_id)
