"""The router's own timings, as cumulative histograms that travel in `Router.stats()` (no JAX, no Ray).

Two figures only the router can see, exported on /metrics by ingress/metrics.py:
- queue time: from a request's arrival at the router (its submission reaching the step thread) to its first
  admission into a decode slot (vLLM's `request_queue_time_seconds`). A request re-admitted after a preemption
  or a rebuilt group is not counted again: one observation per request that got a slot.
- step time, by `phase` (prefill, decode, or mixed: a paged step that runs decode tokens and prefill chunks in
  one call): the wall time of one engine step as the driver sees it, so over Ray it includes the fan-out to
  the shard workers, their compute and collectives, and the results' way back. A pipelined decode step counts
  from when its predecessor's tokens were read (or from its start, if later): the time it added.

The expert all-to-all's share of a step is not here: it runs inside the one jitted XLA program of the step,
overlapped by XLA's scheduler with the expert matmuls, so the host cannot time it apart (only a profiler trace
of the device can). Buckets are cumulative counts per upper edge (+Inf last), as Prometheus keeps them, so
a reader gets exact counts and sums whenever it reads.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import dataclass, field

# vLLM's request-latency buckets (vllm/v1/metrics/loggers.py), which its queue-time histogram uses too.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
# One step: a millisecond on a GPU's decode to a minute of a long prefill on a CPU.
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0)
PHASES = ("prefill", "decode", "mixed")


@dataclass
class Histogram:
    """Counts per bucket and a sum, as plain data. Not prometheus_client's Histogram: that one lives in one
    process's registry, and these are kept in the router actor (which serves no page) and carried by
    Router.stats() to every ingress replica, which exposes them (ingress/metrics.py, HistogramMetricFamily)."""

    edges: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket (not cumulative), the last one past every edge
    sum: float = 0.0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.edges) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.edges, value)] += 1  # a value equal to an edge is in that bucket
        self.sum += value

    def snapshot(self) -> dict:
        """{"edges", "cumulative" (one per edge, then +Inf = the count), "sum"}: plain data for Ray."""
        return {"edges": list(self.edges), "cumulative": list(itertools.accumulate(self.counts)), "sum": self.sum}


class RouterTimings:
    """Queue and step time of one router; `clock` is the monotonic clock both are read from."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.queue = Histogram(REQUEST_LATENCY_BUCKETS)
        self.steps = {phase: Histogram(STEP_BUCKETS) for phase in PHASES}
        self._arrived: dict[str, float] = {}  # request id -> arrival, until its first admission

    def arrived(self, request_id: str) -> None:
        self._arrived[request_id] = self.clock()

    def admitted(self, request) -> None:
        """The scheduler's admission hook (Scheduler.on_admit): the first admission of a request ends its wait."""
        arrived = self._arrived.pop(request.request_id, None)
        if arrived is not None:
            self.queue.observe(self.clock() - arrived)

    def forget(self, request_id: str) -> None:
        """The request ended (maybe while queued): it no longer waits."""
        self._arrived.pop(request_id, None)

    def step(self, phase: str, seconds: float) -> None:
        """The driver's step hook (Driver on_step)."""
        self.steps[phase].observe(seconds)

    def snapshot(self) -> dict[str, list[tuple[dict, dict]]]:
        """The histograms as Router.stats() carries them: name -> [(labels, Histogram.snapshot())]."""
        return {"request_queue_time_seconds": [({}, self.queue.snapshot())],
                "step_seconds": [({"phase": phase}, h.snapshot()) for phase, h in self.steps.items()]}
