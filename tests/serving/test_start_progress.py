"""`grok1 serve`'s start-up progress (ingress/start_progress.py) without Ray: the phases shown, and a replica
that cannot start ending the wait at once with its reason."""

from __future__ import annotations

import io

import pytest

from ingress import start_progress
from ingress.start_progress import StartFailed, phase


def test_phases():
    assert phase(None, []) == "starting the ingress replica and its router"
    pending = [{"bundles": {0: {"CPU": 1.0}, 1: {"CPU": 1.0}}, "state": "PENDING"}]
    assert phase({"state": "loading"}, pending).startswith("placing the shard workers (waiting for room: 2 x")
    assert phase({"state": "loading"}, []) == "loading the weights and compiling the steps"
    assert phase({"state": "ready"}, []) == "ready"
    with pytest.raises(StartFailed, match="needs 2 devices, found 1"):
        phase({"state": "failed", "error": "ConfigError: mesh ep=2 x tp=1 needs 2 devices, found 1"}, [])


def test_loading_shows_the_tensors_the_workers_reported_then_compiling():
    def stats(tensors, processes=2, state="loading"):
        return {"state": state, "loading": {"processes": processes, "tensors": tensors}}

    assert phase(stats({}), []) == "loading the weights and compiling the steps"  # no worker has reported yet
    assert phase(stats({0: (3, 10)}), []) == "loading the weights: 3/10 tensors (1 of 2 workers)"
    assert phase(stats({0: (10, 10), 1: (4, 10)}), []) == "loading the weights: 14/20 tensors (2 of 2 workers)"
    assert phase(stats({0: (10, 10)}), []) == "loading the weights: 10/10 tensors (1 of 2 workers)"
    assert phase(stats({0: (10, 10), 1: (10, 10)}), []) == "compiling the steps (20 tensors loaded)"
    assert phase(stats({0: (7, 9)}, processes=1), []) == "loading the weights: 7/9 tensors (1 worker)"
    rebuilding = {**stats({0: (1, 10)}), "state": "recovering", "error": "worker 1 died"}
    assert phase(rebuilding, []) == "rebuilding the shard group (worker 1 died): loading the weights: 1/10 tensors " \
                                    "(1 of 2 workers)"


def test_the_progress_bar_reports_its_count_at_the_start_at_most_every_half_second_and_at_the_end():
    from grok1.progress import REPORT_EVERY_S, Progress

    heard, now = [], [0.0]
    with Progress(5, "loading", False, lambda done, total: heard.append((done, total)), clock=lambda: now[0]) as bar:
        for step in (0.1, 0.1, REPORT_EVERY_S, 0.1, 0.1):
            now[0] += step
            bar.update(1)
    assert heard == [(0, 5), (3, 5), (5, 5)]


class _Response:
    def __init__(self, router):
        self.router = router

    def result(self, timeout_s=None):
        return self.router


class _Handle:
    def __init__(self, router):
        self.router_handle = self
        self.router = router

    def remote(self):
        return _Response(self.router)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0
        return self.now


def _watch(monkeypatch, states, failure=None, timeout_s=100):
    it = iter(states)
    monkeypatch.setattr(start_progress, "router_stats", lambda router: next(it))
    monkeypatch.setattr(start_progress, "deployment_failure", lambda app: failure)
    monkeypatch.setattr(start_progress, "pending_placement_groups", lambda: [])
    monkeypatch.setattr(start_progress, "POLL_S", 0.0)
    out = io.StringIO()
    router = start_progress.watch(_Handle("router"), "grok1", timeout_s, out=out, clock=_Clock())
    return router, out.getvalue()


def test_watch_prints_each_phase_once_then_returns_the_router(monkeypatch):
    router, text = _watch(monkeypatch, [{"state": "loading"}] * 3 + [{"state": "ready"}])
    assert router == "router"
    lines = text.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == ["loading the weights and compiling the steps", "ready"]


def test_watch_raises_at_once_on_a_failed_router_or_deployment(monkeypatch):
    with pytest.raises(StartFailed, match="found 1"):
        _watch(monkeypatch, [{"state": "loading"}, {"state": "failed", "error": "mesh needs 2 devices, found 1"}])
    with pytest.raises(StartFailed, match="constructor raised"):
        _watch(monkeypatch, [{"state": "loading"}], failure="the replica's constructor raised")
    with pytest.raises(StartFailed, match="not ready after 3s"):
        _watch(monkeypatch, [{"state": "loading"}] * 10, timeout_s=3)
