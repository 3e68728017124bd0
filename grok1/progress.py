"""The one progress bar of the long checkpoint jobs (loading, converting, loading shards)."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    """A bar counting tensors on stderr (stdout stays clean for results); when not `enabled`, one that shows
    nothing. Use it as a context manager and call `update(1)` per tensor."""
    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled)
