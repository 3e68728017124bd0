"""The replica's metrics, also recorded through `ray.util.metrics`: every node's Ray metrics agent serves them
(with Ray's own) on its metrics export port (`ray start --metrics-export-port`, 8080 in our manifests), so one
scrape per node reaches every replica on it, whichever proxy a request came through.

Ray prefixes the names with `ray_` (`ray_grok1_time_to_first_token_seconds_bucket`); the scrape configs in
ray_up/ and k8s/ drop that prefix again with a metric relabelling, so the dashboard's queries read the same
names as `GET /metrics` does. Values are the ones ingress/metrics.py records: histograms observe the same
values, counters are increased by the difference between two router snapshots, gauges are set.
"""

from __future__ import annotations

from ingress.metrics import (
    E2E_BUCKETS,
    INGRESS_FAMILIES,
    ITL_BUCKETS,
    LABELS,
    PREFIX,
    ROUTER_FAMILIES,
    TTFT_BUCKETS,
    length_buckets,
)

EXTRA_TAGS = {"replica_state": ("state",), "router_requests": ("finished_reason",),
              "expert_tokens": ("layer", "expert"), "request_success": ("finished_reason",),
              "ingress_requests": ("protocol", "status")}
HELP = "see docs/observability.md"


class RayExport:
    """ray.util.metrics twins of the replica's families, tagged with model_name and replica."""

    def __init__(self, model: str, replica: str, max_len: int):
        from ray.util import metrics

        default = dict(zip(LABELS, (model, replica)))
        buckets = {"time_to_first_token_seconds": TTFT_BUCKETS, "inter_token_latency_seconds": ITL_BUCKETS,
                   "e2e_request_latency_seconds": E2E_BUCKETS}
        lengths = [float(b) for b in length_buckets(max_len)]
        kinds = {**{k: kind for k, (kind, _) in ROUTER_FAMILIES.items()}, **INGRESS_FAMILIES}
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

    def observe(self, name: str, value: float) -> None:
        self.metrics[name].observe(value)

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


def ray_export(enabled: bool, model: str, replica: str, max_len: int) -> RayExport | None:
    """A RayExport inside a Ray worker (the ingress replica) when enabled, else None."""
    import ray

    return RayExport(model, replica, max_len) if enabled and ray.is_initialized() else None
