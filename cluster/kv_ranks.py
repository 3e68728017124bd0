"""The paged KV pool split over the expert axis: one cluster.kv_blocks.BlockPool per rank, no JAX, no Ray.

When attention runs data parallel over `ep` (decode slots split over the ranks), each rank's share of the
device pool holds only its own sequences' blocks, so a rank's attention reads its own memory and the pool costs
each device 1/ep of its size. Block ids stay global, rank-major: rank r owns ids [r * per_rank, (r + 1) *
per_rank); the engine turns them into ids within the rank's shard. A sequence lives on one rank for its whole
life (its slot's); a fork shares its parent's blocks, so it goes to the parent's rank; a prefix is reused only
from the rank the sequence is placed on. One rank (no split) is a single BlockPool with the same ids.
"""

from __future__ import annotations

from cluster.kv_blocks import Allocation, BlockPool


class RankedPools:
    """`ranks` block pools of `per_rank` blocks each, with global block ids; the BlockPool verbs take the rank."""

    def __init__(self, pools: list[BlockPool]):
        if not pools or len({(p.num_blocks, p.block_size) for p in pools}) != 1:
            raise ValueError("the ranks' pools must be equal in size and block size")
        self.pools = pools
        self.per_rank = pools[0].num_blocks
        self.block_size = pools[0].block_size
        self._rank: dict[str, int] = {}  # sequence -> its rank

    @classmethod
    def split(cls, num_blocks: int, block_size: int, ranks: int = 1, *, prefix_caching: bool = True):
        if ranks < 1 or num_blocks % ranks:
            raise ValueError(f"{num_blocks} KV blocks do not split evenly over {ranks} ranks")
        return cls([BlockPool(num_blocks // ranks, block_size, prefix_caching=prefix_caching)
                    for _ in range(ranks)])

    # ------------------------------------------------------------------------------------------ sizes
    @property
    def ranks(self) -> int:
        return len(self.pools)

    @property
    def num_blocks(self) -> int:
        return self.per_rank * self.ranks

    @property
    def free_blocks(self) -> int:
        return sum(p.free_blocks for p in self.pools)

    @property
    def used_blocks(self) -> int:
        return sum(p.used_blocks for p in self.pools)

    @property
    def prefix_queries(self) -> int:
        return sum(p.prefix_queries for p in self.pools)

    @property
    def prefix_hits(self) -> int:
        return sum(p.prefix_hits for p in self.pools)

    @property
    def cached(self) -> dict:
        return {digest: (r, b) for r, p in enumerate(self.pools) for digest, b in p.cached.items()}

    @property
    def sequences(self) -> dict[str, int]:
        """Every sequence holding blocks, with its rank (read only)."""
        return self._rank

    def blocks_for(self, num_tokens: int) -> int:
        return self.pools[0].blocks_for(num_tokens)

    def rank_of(self, seq_id: str) -> int:
        return self._rank[seq_id]

    def free_on(self, rank: int) -> int:
        return self.pools[rank].free_blocks

    def block_table(self, seq_id: str) -> list[int]:
        rank = self._rank[seq_id]
        return [rank * self.per_rank + block for block in self.pools[rank].block_table(seq_id)]

    def cached_prefix(self, prompt: list[int], salt: bytes = b"") -> list[int]:
        """Per rank, how many of the prompt's leading blocks it has cached (a look, not counted as a query)."""
        return [p.cached_prefix_blocks(prompt, salt) for p in self.pools]

    # ------------------------------------------------------------------------------------------ verbs
    def allocate(self, seq_id: str, prompt: list[int], salt: bytes = b"", new_tokens: int | None = None,
                 *, rank: int = 0) -> Allocation:
        if seq_id in self._rank:
            raise ValueError(f"sequence {seq_id!r} already has blocks")
        allocation = self.pools[rank].allocate(seq_id, prompt, salt, new_tokens)
        self._rank[seq_id] = rank
        return Allocation(tuple(self._global(rank, allocation.blocks)), allocation.cached_tokens)

    def extend(self, seq_id: str, tokens: list[int]) -> list[tuple[int, int]]:
        rank = self._rank[seq_id]
        return [tuple(self._global(rank, copy)) for copy in self.pools[rank].extend(seq_id, tokens)]

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares the parent's blocks, on the parent's rank."""
        if child_id in self._rank:
            raise ValueError(f"sequence {child_id!r} already has blocks")
        rank = self._rank[parent_id]
        self.pools[rank].fork(parent_id, child_id)
        self._rank[child_id] = rank

    def release(self, seq_id: str) -> None:
        self.pools[self._rank.pop(seq_id)].release(seq_id)

    def clear(self) -> None:
        for pool in self.pools:
            pool.clear()
        self._rank.clear()

    def _global(self, rank: int, blocks) -> list[int]:
        return [rank * self.per_rank + block for block in blocks]

    # ------------------------------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        for rank, pool in enumerate(self.pools):
            pool.check_invariants()
            assert {s for s, r in self._rank.items() if r == rank} == set(pool.sequences), f"rank {rank}: owners"
