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


def smallest_bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest of buckets that holds n."""
    return next(size for size in buckets if size >= n)
