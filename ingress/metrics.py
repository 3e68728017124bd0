"""The router's figures (`Router.stats()`) in Prometheus' text exposition format, for `GET /metrics`.

Each ingress replica has its own router, so each replica's page describes its model replica; a scrape
through the Serve proxy lands on one replica (its id is the `replica` label). TTFT and TPOT are summaries
over the router's recent samples (quantiles 0.5, 0.9, 0.99, with _sum and _count of those samples).
"""

from __future__ import annotations

import math

QUANTILES = (0.5, 0.9, 0.99)
STATES = ("loading", "ready", "recovering", "failed")


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (NaN when there are no samples)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    escaped = {k: str(v).replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n") for k, v in labels.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in escaped.items()) + "}"


def _value(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return repr(float(v)) if isinstance(v, float) else str(int(v))


class _Page:
    def __init__(self, common: dict):
        self.common = common
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels({**self.common, **labels})} {_value(value)}")

    def summary(self, name: str, help_: str, values: list[float]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} summary")
        for q in QUANTILES:
            self.lines.append(f"{name}{_labels({**self.common, 'quantile': q})} {_value(quantile(values, q))}")
        self.lines.append(f"{name}_sum{_labels(self.common)} {_value(float(sum(values)))}")
        self.lines.append(f"{name}_count{_labels(self.common)} {len(values)}")


def render(stats: dict, model: str, replica: str = "", ingress: dict | None = None) -> str:
    """Prometheus text for one replica: router stats plus the ingress's own counters (requests by status)."""
    page = _Page({"model": model, **({"replica": replica} if replica else {})})
    state = stats.get("state", "unknown")
    page.metric("grok1_up", "gauge", "1 when the replica is serving", [({}, int(state == "ready"))])
    page.metric("grok1_state", "gauge", "the replica's state (1 for the current one)",
                [({"state": s}, int(s == state)) for s in STATES])
    page.metric("grok1_queue_length", "gauge", "requests waiting for a decode slot",
                [({}, stats.get("queue_length", 0))])
    page.metric("grok1_running", "gauge", "requests in decode slots", [({}, stats.get("running", 0))])
    page.metric("grok1_slots_total", "gauge", "decode slots of the replica", [({}, stats.get("slots_total", 0))])
    page.metric("grok1_slots_used", "gauge", "decode slots in use", [({}, stats.get("slots_used", 0))])
    page.metric("grok1_requests_total", "counter", "finished router requests by finish reason",
                [({"finish_reason": k}, v) for k, v in sorted(stats.get("requests_total", {}).items())])
    page.metric("grok1_tokens_generated_total", "counter", "tokens generated",
                [({}, stats.get("tokens_generated_total", 0))])
    page.metric("grok1_prompt_tokens_total", "counter", "prompt tokens prefilled",
                [({}, stats.get("prompt_tokens_total", 0))])
    page.metric("grok1_tokens_per_second", "gauge", "tokens generated per second over the last 10 s",
                [({}, float(stats.get("tokens_per_second", 0.0)))])
    page.metric("grok1_restarts_total", "counter", "shard group rebuilds after a failure",
                [({}, stats.get("restarts", 0))])
    page.summary("grok1_ttft_seconds", "time to first token (recent requests)", stats.get("ttft_seconds", []))
    page.summary("grok1_tpot_seconds", "time per output token after the first (recent requests)",
                 stats.get("tpot_seconds", []))
    counts = stats.get("expert_token_counts") or []
    page.metric("grok1_expert_tokens_total", "counter", "tokens routed to each expert, by layer",
                [({"layer": layer, "expert": expert}, v)
                 for layer, row in enumerate(counts) for expert, v in enumerate(row)])
    if ingress:
        page.metric("grok1_ingress_requests_total", "counter", "ingress requests by protocol and status",
                    [({"protocol": p, "status": s}, v) for (p, s), v in sorted(ingress.items())])
    return "\n".join(page.lines) + "\n"
