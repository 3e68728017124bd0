"""Dashboards and scraping (docs/observability.md): the Grafana dashboard queries only metrics the replica
exports; the `ray up` Prometheus config and the KubeRay PodMonitor scrape the port Ray's nodes export on and
strip Ray's `ray_` prefix from our names; the PodMonitor validates (against a transcription of the operator's
CRD, for the fields used: the CRD itself is not in ../shared and PyPI has no copy of it) and selects the pods.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from ingress import metrics
from tests.serving.test_metrics import STATS, run

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "grok1-serve.json"
METRICS_PORT = 8080
RAY_PREFIXED = "ray_grok1_time_to_first_token_seconds_bucket"

_RELABEL = {"type": "object", "additionalProperties": False, "properties": {
    "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}},
    "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
    "modulus": {"type": "integer"}, "replacement": {"type": "string"},
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap",
                        "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase",
                        "uppercase", "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]}}}
# monitoring.coreos.com/v1 PodMonitor, the fields our manifest uses, as the operator's CRD declares them
# (example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml); unknown fields are refused.
PODMONITOR_SCHEMA = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
                     "additionalProperties": False, "properties": {
    "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "PodMonitor"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": {"type": "object", "required": ["selector"], "additionalProperties": False, "properties": {
        "selector": {"type": "object", "additionalProperties": False, "properties": {
            "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
            "matchExpressions": {"type": "array"}}},
        "namespaceSelector": {"type": "object"}, "jobLabel": {"type": "string"},
        "podMetricsEndpoints": {"type": "array", "items": {"type": "object", "additionalProperties": False,
                                                           "properties": {
            "port": {"type": "string"}, "path": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                      "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
            "scrapeTimeout": {"type": "string"}, "honorLabels": {"type": "boolean"},
            "relabelings": {"type": "array", "items": _RELABEL},
            "metricRelabelings": {"type": "array", "items": _RELABEL}}}}}}}}


def podmonitor_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def page_families() -> set[str]:
    """The sample names a replica's /metrics has once it has a router snapshot and a finished request."""
    replica = metrics.ReplicaMetrics("grok-1-tiny", "r1", 64, ingress_counts={("http", 200): 1})
    replica.update(STATS)
    run(replica, {"prompt": "abc", "max_tokens": 3})
    return set(re.findall(r"^(grok1_[a-z0-9_]+)[{ ]", replica.render().decode(), re.M))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_dashboard_queries_only_metrics_on_the_page():
    exprs = dashboard_exprs()
    queried = {name for e in exprs for name in re.findall(r"\bgrok1_[a-z0-9_]+", e)}
    assert queried - page_families() == set()
    assert {"grok1_time_to_first_token_seconds_bucket", "grok1_inter_token_latency_seconds_bucket",
            "grok1_expert_tokens_total", "grok1_replica_restarts_total", "grok1_kv_cache_usage_perc",
            "grok1_num_requests_waiting", "grok1_request_queue_time_seconds_bucket", "grok1_step_seconds_bucket",
            "grok1_prefix_cache_hits_total", "grok1_prefix_cache_queries_total",
            "grok1_num_preemptions_total"} <= queried
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert quantiles and all(re.search(r"sum by \((\w+, )*le(, \w+)*\)", e) for e in quantiles)  # over replicas


def test_dashboard_panels_are_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert {"heatmap", "timeseries"} <= {p["type"] for p in dashboard["panels"]}
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]


def _relabel(rule: dict, name: str) -> str:
    """One Prometheus `replace` relabelling of __name__ (regexes are anchored)."""
    match = re.fullmatch(rule["regex"], name)
    return re.sub(r"\$(\d+)", lambda m: match.group(int(m.group(1))), rule["replacement"]) if match else name


def test_ray_up_prometheus_config_reads_rays_service_discovery_and_strips_the_prefix():
    import ray

    config = yaml.safe_load((ROOT / "ray_up" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    rays = yaml.safe_load((Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "export" /
                           "prometheus" / "prometheus.yml").read_text())
    assert job["file_sd_configs"][0]["files"] == rays["scrape_configs"][0]["file_sd_configs"][0]["files"]
    (rule,) = job["metric_relabel_configs"]
    assert rule["source_labels"] == ["__name__"] and rule["target_label"] == "__name__"
    assert _relabel(rule, RAY_PREFIXED) == RAY_PREFIXED[4:]
    assert _relabel(rule, "ray_serve_num_http_requests_total") == "ray_serve_num_http_requests_total"


@pytest.mark.parametrize("path", sorted((ROOT / "ray_up").glob("*.yaml")), ids=lambda p: p.name)
def test_ray_up_nodes_export_metrics_on_the_scraped_port(path):
    config = yaml.safe_load(path.read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in config[key]
              if "ray start" in c]
    assert len(starts) == 2, path
    assert all(f"--metrics-export-port={METRICS_PORT}" in c for c in starts), starts


def test_podmonitor_validates_selects_the_ray_pods_and_strips_the_prefix():
    from tests.deploy.test_deploy import render, the

    (monitor,) = render(ROOT / "k8s" / "monitoring")
    assert podmonitor_errors(monitor) == []
    bad = {**monitor, "spec": {**monitor["spec"], "podMetricEndpoints": []}}  # a typo is refused
    assert podmonitor_errors(bad)
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    cluster = the("RayService", "base")["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        template = group["template"]
        assert selector.items() <= template["metadata"]["labels"].items()
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert ports.get(endpoint["port"]) == METRICS_PORT
    (rule,) = endpoint["metricRelabelings"]
    assert _relabel(rule, RAY_PREFIXED) == RAY_PREFIXED[4:]


def test_ray_export_names_are_valid_for_ray():
    from ray.util.metrics import _is_invalid_metric_name

    for name in metrics.exposed_names():
        assert ":" not in name and not _is_invalid_metric_name(name), name
