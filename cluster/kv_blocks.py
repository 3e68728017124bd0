"""Which KV-cache blocks each sequence owns: a reference-counted block pool with prefix caching, no JAX, no Ray.

The paged KV cache holds `num_blocks` blocks of `block_size` token positions per layer; a sequence's KV lives
in the blocks of its block table, in order. This module only decides block ids (vLLM's `BlockPool` /
`KVCacheManager` split, in one small class); the engine reads and writes the device pool through the tables.

Prefix caching: a full block is keyed by a digest of every token up to and including it (a chain of SHA-256
digests, seeded by an optional per-tenant salt), so two sequences that share a prefix share its blocks. A
digest, not Python's `hash`: a crafted prompt that collides with another tenant's prefix would read that
tenant's KV (vLLM moved to SHA-256 for the same reason). Blocks whose last reference goes are kept, still
keyed, in least-recently-freed order and evicted only when a new block is needed; blocks that hold nothing
reusable are handed out first.

Sharing a block that is still filling (after `fork`, for `n > 1` choices) is copy-on-write: the first
sequence that writes into a shared partial block gets a fresh one, and `extend` returns the (source,
destination) copy for the engine to carry out before that step.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from dataclasses import dataclass, field


class OutOfBlocks(Exception):
    """Not enough free blocks for this allocation; nothing was changed."""


@dataclass
class _Sequence:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # token positions covered (KV written or about to be)
    tokens: list[int] = field(default_factory=list)  # the tokens of the last, partial block
    digests: list[bytes] = field(default_factory=list)  # one per full block, chained
    seed: bytes = b""  # the chain's start: digest of the salt


@dataclass(frozen=True)
class Allocation:
    blocks: tuple[int, ...]
    cached_tokens: int  # prompt tokens whose KV is already in the cache (a multiple of block_size)


def _chain(previous: bytes, tokens) -> bytes:
    return hashlib.sha256(previous + struct.pack(f"<{len(tokens)}q", *tokens)).digest()


def _seed(salt: bytes) -> bytes:
    return hashlib.sha256(b"grok1-kv-salt:" + salt).digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.refcount = [0] * num_blocks
        self.digest: list[bytes | None] = [None] * num_blocks  # a full, reusable block's key
        self.cached: dict[bytes, int] = {}  # digest -> block
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self.sequences: dict[str, _Sequence] = {}
        self.prefix_queries = 0  # prompt blocks looked up
        self.prefix_hits = 0  # of those, found

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def free_blocks(self) -> int:
        return len(self.free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: str) -> list[int]:
        return list(self.sequences[seq_id].blocks)

    # ------------------------------------------------------------------------------------------ verbs
    def allocate(self, seq_id: str, prompt: list[int], salt: bytes = b"",
                 new_tokens: int | None = None) -> Allocation:
        """Blocks for a new sequence's prompt, reusing cached full blocks of its longest cached prefix.

        At least the prompt's last token is left uncached: its logits are what a prefill is for. `new_tokens`:
        cover only that many tokens past the cached prefix for now (`extend` adds the rest), so that a prompt
        prefilled in chunks keys each block when the chunk that computes it is scheduled, never before."""
        if seq_id in self.sequences:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        size = self.block_size
        seed = _seed(salt)
        hits, digests, queries = self._lookup(prompt, seed)
        self.prefix_queries += queries
        self.prefix_hits += len(hits)
        cover = len(prompt) if new_tokens is None else min(len(hits) * size + new_tokens, len(prompt))
        needed = self.blocks_for(cover) - len(hits)
        if needed > self.free_blocks - sum(self.refcount[b] == 0 for b in hits):
            raise OutOfBlocks(f"{needed} free blocks needed, {self.free_blocks} free of {self.num_blocks}")
        for block in hits:
            self._take(block)
        sequence = _Sequence(blocks=list(hits), num_tokens=len(hits) * size, digests=digests, seed=seed)
        self.sequences[seq_id] = sequence
        self._grow(sequence, prompt[len(hits) * size:cover])
        return Allocation(tuple(sequence.blocks), len(hits) * size)

    def cached_prefix_blocks(self, prompt: list[int], salt: bytes = b"") -> int:
        """How many of the prompt's leading blocks `allocate` would find cached now (a look: not counted)."""
        return len(self._lookup(prompt, _seed(salt))[0])

    def extend(self, seq_id: str, tokens: list[int]) -> list[tuple[int, int]]:
        """Room for `tokens` after the sequence's current end; returns the block copies (copy-on-write) the
        engine must make first. Raises OutOfBlocks, changing nothing, when the pool cannot hold them."""
        sequence = self.sequences[seq_id]
        fill = sequence.num_tokens % self.block_size
        shared_tail = fill and self.refcount[sequence.blocks[-1]] > 1
        needed = self.blocks_for(fill + len(tokens)) - (1 if fill else 0) + (1 if shared_tail and tokens else 0)
        if needed > self.free_blocks:
            raise OutOfBlocks(f"{needed} free blocks needed, {self.free_blocks} free of {self.num_blocks}")
        copies = []
        if shared_tail and tokens:
            source = sequence.blocks[-1]
            destination = self._pop_free()
            self.refcount[source] -= 1
            sequence.blocks[-1] = destination
            copies.append((source, destination))
        self._grow(sequence, tokens)
        return copies

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every block of the parent (n > 1 choices of one prompt)."""
        if child_id in self.sequences:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        parent = self.sequences[parent_id]
        for block in parent.blocks:
            self.refcount[block] += 1
        self.sequences[child_id] = _Sequence(list(parent.blocks), parent.num_tokens, list(parent.tokens),
                                             list(parent.digests), parent.seed)

    def release(self, seq_id: str) -> None:
        """Drop a finished or preempted sequence's references; its full blocks stay cached until evicted.

        The tail is released first, so under pressure a prefix's later blocks go before its first ones."""
        sequence = self.sequences.pop(seq_id)
        for block in reversed(sequence.blocks):
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                self.free[block] = None
                if self.digest[block] is None:
                    self.free.move_to_end(block, last=False)  # nothing to reuse in it: hand it out first

    def clear(self) -> None:
        """Forget every sequence and cached block (the device pool they described is gone); keep the counters."""
        queries, hits = self.prefix_queries, self.prefix_hits
        self.__init__(self.num_blocks, self.block_size, prefix_caching=self.prefix_caching)
        self.prefix_queries, self.prefix_hits = queries, hits

    # ------------------------------------------------------------------------------------------ internals
    def _lookup(self, prompt: list[int], seed: bytes) -> tuple[list[int], list[bytes], int]:
        """(cached blocks of the prompt's longest cached prefix, their digests, blocks looked up); the prompt's
        last token is never in it (see allocate)."""
        hits: list[int] = []
        digests: list[bytes] = []
        if not self.prefix_caching:
            return hits, digests, 0
        size, previous, queries = self.block_size, seed, 0
        for start in range(0, len(prompt) - 1 - size + 1, size):
            previous = _chain(previous, prompt[start:start + size])
            queries += 1
            block = self.cached.get(previous)
            if block is None:
                break
            hits.append(block)
            digests.append(previous)
        return hits, digests, queries

    def _grow(self, sequence: _Sequence, tokens: list[int]) -> None:
        size = self.block_size
        for token in tokens:
            if sequence.num_tokens % size == 0:
                sequence.blocks.append(self._pop_free())
            sequence.tokens.append(token)
            sequence.num_tokens += 1
            if len(sequence.tokens) == size:
                self._seal(sequence)

    def _seal(self, sequence: _Sequence) -> None:
        """The last block is full: key it, unless an identical block is cached already."""
        previous = sequence.digests[-1] if sequence.digests else sequence.seed
        digest = _chain(previous, sequence.tokens)
        sequence.digests.append(digest)
        sequence.tokens = []
        block = sequence.blocks[-1]
        if self.prefix_caching and digest not in self.cached and self.digest[block] is None:
            self.cached[digest] = block
            self.digest[block] = digest

    def _take(self, block: int) -> None:
        if self.refcount[block] == 0:
            del self.free[block]
        self.refcount[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.digest[block] is not None:  # evict the least recently freed cached block
            del self.cached[self.digest[block]]
            self.digest[block] = None
        self.refcount[block] = 1
        return block

    # ------------------------------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raises AssertionError when the books disagree (for tests)."""
        counts = collections.Counter(b for s in self.sequences.values() for b in s.blocks)
        for block in range(self.num_blocks):
            assert self.refcount[block] == counts.get(block, 0), f"block {block}: refcount vs owners"
            assert (block in self.free) == (self.refcount[block] == 0), f"block {block}: free list vs refcount"
        for digest, block in self.cached.items():
            assert self.digest[block] == digest, f"block {block}: cache index vs block key"
        assert sum(d is not None for d in self.digest) == len(self.cached), "keyed blocks vs cache index"
        for seq_id, s in self.sequences.items():
            assert len(set(s.blocks)) == len(s.blocks), f"{seq_id}: a block twice in one table"
            assert len(s.blocks) == self.blocks_for(s.num_tokens), f"{seq_id}: blocks vs tokens"
            assert len(s.digests) == s.num_tokens // self.block_size, f"{seq_id}: digests vs full blocks"
