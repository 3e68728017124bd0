"""The replica's metrics, also recorded through `ray.util.metrics`: every node's Ray metrics agent serves them
(with Ray's own) on its metrics export port (`ray start --metrics-export-port`, 8080 in our manifests), so one
scrape per node reaches every replica on it, whichever proxy a request came through.

Ray prefixes the names with `ray_` (`ray_grok1_time_to_first_token_seconds_bucket`); the scrape configs in
ray_up/ and k8s/ drop that prefix again with a metric relabelling, so the dashboard's queries read the same
names as `GET /metrics` does. Values are the ones ingress/metrics.py records: histograms observe the same
values, counters are increased by the difference between two router snapshots, gauges are set. The router's
histograms (queue and step time) arrive as cumulative buckets, and Ray's histograms take only single values:
each new observation is replayed into its own bucket (`replay`), so bucket counts are exact and the sum is
exact whenever the new observations of one snapshot fall in one bucket (else within their buckets' bounds).
"""

from __future__ import annotations

from cluster.step_timings import REQUEST_LATENCY_BUCKETS, STEP_BUCKETS
from ingress.metrics import (
    E2E_BUCKETS,
    INGRESS_FAMILIES,
    ITL_BUCKETS,
    LABELS,
    PREFIX,
    ROUTER_FAMILIES,
    ROUTER_HISTOGRAMS,
    TTFT_BUCKETS,
    length_buckets,
)

EXTRA_TAGS = {"replica_state": ("state",), "router_requests": ("finished_reason",),
              "expert_tokens": ("layer", "expert"), "request_success": ("finished_reason",),
              "ingress_requests": ("protocol", "status"), "step_seconds": ("phase",),
              "worker_step_seconds": ("worker", "verb"), "worker_steps": ("worker", "verb")}
HELP = "see docs/observability.md"


class RayExport:
    """ray.util.metrics twins of the replica's families, tagged with model_name and replica."""

    def __init__(self, model: str, replica: str, max_len: int):
        from ray.util import metrics

        default = dict(zip(LABELS, (model, replica)))
        buckets = {"time_to_first_token_seconds": TTFT_BUCKETS, "inter_token_latency_seconds": ITL_BUCKETS,
                   "e2e_request_latency_seconds": E2E_BUCKETS, "request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
                   "step_seconds": STEP_BUCKETS}
        lengths = [float(b) for b in length_buckets(max_len)]
        kinds = {**{k: kind for k, (kind, _) in ROUTER_FAMILIES.items()}, **INGRESS_FAMILIES,
                 **dict.fromkeys(ROUTER_HISTOGRAMS, "histogram")}
        self.metrics = {}
        for name, kind in kinds.items():
            tags = (*LABELS, *EXTRA_TAGS.get(name, ()))
            if kind == "histogram":
                metric = metrics.Histogram(PREFIX + name, HELP, boundaries=list(buckets.get(name, lengths)),
                                           tag_keys=tags)
            elif kind == "counter":
                metric = metrics.Counter(PREFIX + name + "_total", HELP, tag_keys=tags)
            else:
                metric = metrics.Gauge(PREFIX + name, HELP, tag_keys=tags)
            self.metrics[name] = metric.set_default_tags(default)

    def observe(self, name: str, value: float, tags: dict | None = None) -> None:
        self.metrics[name].observe(value, tags=tags)

    def inc(self, name: str, value: float, tags: dict | None = None) -> None:
        if value > 0:
            self.metrics[name].inc(value, tags=tags)

    def router(self, previous: dict, current: dict) -> None:
        """Gauges set to `current`; counters increased by current - previous (both already monotonic)."""
        for name, samples in current.items():
            before = {tuple(sorted(labels.items())): v for labels, v in previous.get(name, [])}
            for labels, value in samples:
                if ROUTER_FAMILIES[name][0] == "counter":
                    self.inc(name, value - before.get(tuple(sorted(labels.items())), 0), labels)
                else:
                    self.metrics[name].set(value, tags=labels)


    def router_histograms(self, previous: dict, current: dict) -> None:
        """The observations between two snapshots of the router's histograms (both already monotonic)."""
        for name, series in current.items():
            before = {tuple(sorted(labels.items())): h for labels, h in previous.get(name, [])}
            for labels, h in series:
                for value, n in replay(before.get(tuple(sorted(labels.items()))), h):
                    for _ in range(n):
                        self.observe(name, value, labels or None)


def replay(before: dict | None, after: dict) -> list[tuple[float, int]]:
    """(value, times) to observe so that a histogram at `before` reaches `after` (cumulative buckets and sum,
    as ingress/metrics.py's router_histograms gives them): each bucket's new count, at the new observations'
    mean where it lies in that bucket (lo, hi], else at hi (or twice the last edge, for the +Inf bucket)."""
    edges, now = after["edges"], after["cumulative"]
    then = before["cumulative"] if before else [0] * len(now)
    new = [(c - p) - (c0 - p0) for c, p, c0, p0 in zip(now, then, [0, *now[:-1]], [0, *then[:-1]])]
    count = sum(new)
    if count <= 0:
        return []
    mean = (after["sum"] - (before["sum"] if before else 0.0)) / count
    lows, highs = [0.0, *edges], [*edges, float("inf")]
    return [(mean if lo < mean <= hi else hi if hi < float("inf") else 2 * lo, n)
            for lo, hi, n in zip(lows, highs, new) if n > 0]


def ray_export(enabled: bool, model: str, replica: str, max_len: int) -> RayExport | None:
    """A RayExport inside a Ray worker (the ingress replica) when enabled, else None."""
    import ray

    return RayExport(model, replica, max_len) if enabled and ray.is_initialized() else None
