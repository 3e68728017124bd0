"""The one progress bar of the long checkpoint jobs (loading, converting, loading shards).

Besides the bar (for a person at this process's terminal), `report(done, total)` hears the count, for a
person elsewhere: a shard worker sends it to its router, which `grok1 serve` prints (ingress/start_progress.py).
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

REPORT_EVERY_S = 0.5  # a report at most this often (and the last one always)


class Progress:
    """A tqdm bar (shown only when enabled) that also tells `report(done, total)` as tensors are counted."""

    def __init__(self, total: int, desc: str, enabled: bool, report=None, clock=time.monotonic):
        self.bar = tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled)
        self.total, self.done = total, 0
        self.report, self.clock = report, clock
        self._reported_at: float | None = None

    def __enter__(self) -> "Progress":
        self.bar.__enter__()
        if self.report is not None:
            self.report(0, self.total)
            self._reported_at = self.clock()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        if self.report is not None and (self.done == self.total or self.clock() - self._reported_at >= REPORT_EVERY_S):
            self.report(self.done, self.total)
            self._reported_at = self.clock()


def progress_bar(total: int, desc: str, enabled: bool, report=None) -> Progress:
    """A bar counting tensors on stderr (stdout stays clean for results); when not `enabled`, one that shows
    nothing. Use it as a context manager and call `update(1)` per tensor; `report(done, total)`, if given,
    hears the count at the start, at most every REPORT_EVERY_S, and at the end."""
    return Progress(total, desc, enabled, report)
