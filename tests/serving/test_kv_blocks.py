"""The KV block pool: reference counts, prefix caching and copy-on-write, against a simulated device pool.

The simulation writes each sequence's tokens into the blocks its table names (as the engine would write KV)
and carries out the copies `extend` returns; after every operation each sequence's blocks must read back
exactly its own tokens, whatever was shared, forked, evicted or reused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.kv_blocks import BlockPool, OutOfBlocks


class Simulated:
    """A BlockPool plus what its blocks would hold on the device, and each sequence's true tokens."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        self.device: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tokens: dict[str, list[int]] = {}
        self.block_contents: dict[bytes, list[int]] = {}  # a full block's key -> the tokens it stands for

    def _write(self, seq_id: str, start: int) -> None:
        size = self.pool.block_size
        table = self.pool.block_table(seq_id)
        for position in range(start, len(self.tokens[seq_id])):
            self.device[table[position // size]][position % size] = self.tokens[seq_id][position]

    def allocate(self, seq_id: str, prompt: list[int], salt: bytes = b"") -> int:
        allocation = self.pool.allocate(seq_id, prompt, salt)
        self.tokens[seq_id] = list(prompt)
        self._write(seq_id, allocation.cached_tokens)  # the prefill computes only the uncached suffix
        return allocation.cached_tokens

    def extend(self, seq_id: str, new: list[int]) -> None:
        copies = self.pool.extend(seq_id, new)
        for source, destination in copies:
            self.device[destination] = list(self.device[source])
        start = len(self.tokens[seq_id])
        self.tokens[seq_id] += new
        self._write(seq_id, start)

    def fork(self, parent: str, child: str) -> None:
        self.pool.fork(parent, child)
        self.tokens[child] = list(self.tokens[parent])

    def release(self, seq_id: str) -> None:
        self.pool.release(seq_id)
        del self.tokens[seq_id]

    def check(self) -> None:
        self.pool.check_invariants()
        size = self.pool.block_size
        for seq_id, tokens in self.tokens.items():
            table = self.pool.block_table(seq_id)
            read = [self.device[table[p // size]][p % size] for p in range(len(tokens))]
            assert read == tokens, f"{seq_id} reads back other tokens"
            for i, digest in enumerate(self.pool.sequences[seq_id].digests):
                expected = self.block_contents.setdefault(digest, tokens[i * size:(i + 1) * size])
                assert expected == tokens[i * size:(i + 1) * size], "one key for two contents"
        for digest, block in self.pool.cached.items():  # what a later prefix hit would read
            if digest in self.block_contents:
                assert self.device[block] == self.block_contents[digest], f"cached block {block} was overwritten"


def test_prefix_hit_reuses_full_blocks_and_leaves_the_last_token_to_prefill():
    sim = Simulated(16, 4)
    assert sim.allocate("a", list(range(10))) == 0
    sim.check()
    assert sim.allocate("b", list(range(10)) + [99]) == 8  # two full blocks shared, the rest prefilled
    assert sim.pool.block_table("a")[:2] == sim.pool.block_table("b")[:2]
    assert sim.allocate("c", list(range(8))) == 4  # 8 tokens = 2 full blocks, but the last token is prefilled
    assert (sim.pool.prefix_hits, sim.pool.prefix_queries) == (3, 4)
    sim.check()


def test_released_blocks_stay_cached_until_evicted():
    sim = Simulated(4, 2)
    sim.allocate("a", [1, 2, 3, 4, 5])
    sim.release("a")
    assert sim.pool.free_blocks == 4
    assert sim.allocate("b", [1, 2, 3, 4, 6]) == 4
    sim.release("b")
    sim.allocate("c", [7, 8, 9, 10, 11, 12, 13])  # needs all four blocks: every cached one is evicted
    sim.release("c")
    assert sim.allocate("d", [1, 2, 3, 4, 6]) == 0
    sim.check()


def test_salt_separates_tenants():
    sim = Simulated(8, 2)
    sim.allocate("a", [1, 2, 3, 4, 5], salt=b"tenant-1")
    assert sim.allocate("b", [1, 2, 3, 4, 5], salt=b"tenant-2") == 0
    assert sim.allocate("c", [1, 2, 3, 4, 5], salt=b"tenant-1") == 4


def test_out_of_blocks_changes_nothing():
    sim = Simulated(3, 2)
    sim.allocate("a", [1, 2, 3])
    before = (list(sim.pool.refcount), list(sim.pool.free))
    with pytest.raises(OutOfBlocks):
        sim.allocate("b", [4, 5, 6])
    with pytest.raises(OutOfBlocks):
        sim.extend("a", [4, 5, 6, 7, 8])
    assert (list(sim.pool.refcount), list(sim.pool.free)) == before
    assert "b" not in sim.pool.sequences
    sim.check()


def test_fork_copies_the_shared_partial_block_on_first_write():
    sim = Simulated(8, 4)
    sim.allocate("p", [1, 2, 3, 4, 5, 6])
    sim.fork("p", "q")
    copies = sim.pool.extend("q", [7])
    assert copies == [(sim.pool.block_table("p")[1], sim.pool.block_table("q")[1])]
    sim.device[copies[0][1]] = list(sim.device[copies[0][0]])
    sim.tokens["q"] += [7]
    sim._write("q", 6)
    sim.extend("p", [8])  # the parent now owns its block alone: written in place
    assert sim.pool.block_table("p")[1] != sim.pool.block_table("q")[1]
    sim.check()


operations = st.lists(st.tuples(st.sampled_from(["allocate", "extend", "fork", "release"]),
                                st.integers(0, 7), st.lists(st.integers(0, 1), min_size=1, max_size=9)),
                      max_size=60)


@settings(max_examples=300, deadline=None)
@given(operations, st.integers(1, 4), st.integers(1, 16), st.booleans())
def test_random_operations_keep_the_books_and_the_contents_right(ops, block_size, num_blocks, caching):
    """Tokens drawn from {0, 1} so prefixes repeat often: hits, forks, evictions and reuse interleave."""
    sim = Simulated(num_blocks, block_size, caching)
    for verb, k, tokens in ops:
        seq_id, live = f"s{k}", sorted(sim.tokens)
        try:
            if verb == "allocate" and seq_id not in sim.tokens:
                cached = sim.allocate(seq_id, tokens)
                assert cached % block_size == 0 and cached < len(tokens)
            elif verb == "extend" and live:
                sim.extend(live[k % len(live)], tokens)
            elif verb == "fork" and live and seq_id not in sim.tokens:
                sim.fork(live[k % len(live)], seq_id)
            elif verb == "release" and live:
                sim.release(live[k % len(live)])
        except OutOfBlocks:
            pass
        sim.check()
    for seq_id in sorted(sim.tokens):
        sim.release(seq_id)
    sim.check()
    assert sim.pool.free_blocks == num_blocks  # no leak


def test_allocate_new_tokens_covers_a_first_chunk_and_extend_the_rest():
    """A chunked prefill covers its prompt chunk by chunk: a block is keyed (can be hit) only once covered."""
    pool = BlockPool(16, 4)
    pool.allocate("a", list(range(10)))
    prompt = list(range(8)) + [50, 51, 52, 53, 54]
    allocation = pool.allocate("b", prompt, new_tokens=3)
    assert allocation.cached_tokens == 8 and pool.sequences["b"].num_tokens == 11 and len(allocation.blocks) == 3
    before = pool.prefix_hits
    pool.allocate("c", prompt + [60])  # b's third block is not full yet: only the two shared ones hit
    assert pool.prefix_hits - before == 2
    pool.extend("b", [53, 54])
    assert pool.sequences["b"].num_tokens == 13
    before = pool.prefix_hits
    pool.allocate("d", prompt + [61])
    assert pool.prefix_hits - before == 3  # now it is
    pool.check_invariants()


def test_clear_forgets_blocks_and_keeps_counters():
    pool = BlockPool(4, 2)
    pool.allocate("a", [1, 2, 3])
    pool.allocate("b", [1, 2, 3])
    counters = (pool.prefix_queries, pool.prefix_hits)
    pool.clear()
    assert pool.free_blocks == 4 and not pool.sequences and not pool.cached
    assert (pool.prefix_queries, pool.prefix_hits) == counters
    pool.check_invariants()
