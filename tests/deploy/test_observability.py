"""Dashboards and scraping (docs/observability.md): the Grafana dashboard queries only metrics the replica
exports; the `ray up` Prometheus config and the KubeRay PodMonitor scrape the port Ray's nodes export on and
strip Ray's `ray_` prefix from our names; the PodMonitor validates against the prometheus-operator's API schema
as the maintained npm package @kubernetes-models/prometheus-operator ships it (PyPI has only client models) and
selects the pods.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ingress import metrics
from tests.serving.test_metrics import STATS, run

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana" / "grok1-serve.json"
METRICS_PORT = 8080
RAY_PREFIXED = "ray_grok1_time_to_first_token_seconds_bucket"

OPERATOR_DIR = ROOT / "tests" / "deploy" / "prometheus_operator"  # package.json, its lock, validate.mjs


@functools.cache
def _node() -> str:
    """Node.js, with @kubernetes-models/prometheus-operator (npm, pinned with its integrity hashes in
    package-lock.json) installed in OPERATOR_DIR on first use, like any other test dependency."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        pytest.fail("validating k8s/monitoring needs Node.js (20 or newer) and npm on PATH")
    lock = hashlib.sha256((OPERATOR_DIR / "package-lock.json").read_bytes()).hexdigest()
    marker = OPERATOR_DIR / "node_modules" / ".grok1-installed"
    if not marker.is_file() or marker.read_text() != lock:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=OPERATOR_DIR, check=True,
                       timeout=600)
        marker.write_text(lock)
    return node


def operator_errors(docs: list[dict]) -> list[list[str]]:
    """Each prometheus-operator object's errors: the operator's API schema (generated from its Go types, as
    the package ships it) and TypeScript's check against the package's interfaces, which refuses unknown
    fields as kubectl's strict field validation does (validate.mjs)."""
    done = subprocess.run([_node(), "validate.mjs"], cwd=OPERATOR_DIR, input=json.dumps(docs), text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


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
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    typo = {**monitor, "spec": {**monitor["spec"], "podMetricEndpoints": []}}
    bad_interval = {**monitor, "spec": {**monitor["spec"], "podMetricsEndpoints": [{**endpoint, "interval": "15 s"}]}}
    ok, *refused = operator_errors([monitor, typo, bad_interval])
    assert ok == []
    assert any("podMetricEndpoints" in e for e in refused[0]), refused[0]  # an unknown field
    assert any("interval" in e for e in refused[1]), refused[1]  # a value the schema's pattern refuses
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
