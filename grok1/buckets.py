"""The shapes the engines compile for: every jitted step runs at one of a few padded sizes (one compile each),
chosen here from what is live."""

from __future__ import annotations

KV_BUCKET_MIN = 16  # the shortest cache length a decode step attends over
PREFILL_BATCH_GROWTH = 4  # prefill calls take 1, 4, 16, ... prompts of a bucket (each size is one compile)


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... while below largest, then largest."""
    sizes = [smallest]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes) if sizes[-1] == largest else (*sizes, largest)


def decode_row_buckets(max_slots: int, row_shares: int = 1) -> tuple[int, ...]:
    """Row counts a decode step's unembedding and sampling compile for: powers of two, then max_slots.

    Where the rows are split over `row_shares` ranks (a mesh's ep: each rank samples its share), a bucket that
    gives a rank a single row is skipped: one row on a rank is XLA:CPU's matrix-vector slow path, which
    model.at_least_two_rows avoids only for a single row of the whole batch. So 1 (not split), then 2 rows per
    rank and up. Measured (grok-1-tiny, ep=2 over gloo, 2 of 32 slots active, jax.profiler): with one row a rank,
    that product and a float32 copy of the [V, D] embedding for it took 11 of the step's 21-23 ms; the bucket of
    4 runs the step in 13 ms."""
    if row_shares == 1:
        return power_of_two_buckets(1, max_slots)
    smallest = 2 * row_shares
    return (1, *power_of_two_buckets(smallest, max(max_slots, smallest)))


def smallest_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest of buckets that holds n."""
    return next(size for size in buckets if size >= n)
