"""A model replica's faults on real Ray Serve over loopback: a deadline during a rebuild, a killed router, a drain.

One Serve instance for the module (3 CPUs): the golden model behind one ingress replica whose router runs a
2-shard group of Ray workers (PACK), so a SIGKILLed worker makes the router rebuild its group, and a killed
router leaves a placement group that reserves 2 of the 3 CPUs (the replacement fits only if it is removed).
The tests run in order and share the app; the last one deletes it.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import dataclass

import pytest
import requests

ray = pytest.importorskip("ray")

from tests.integration.test_ingress_serve import _free_port, golden_config_file  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = {"max_slots": 8, "max_len": 96, "prefill_buckets": [16, 32, 64], "moe_block_size": 8}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
APP = "faults"
DRAIN_GRACE_S = 60  # far longer than 8 streams of 40 tokens need


@dataclass
class App:
    http: str
    handle: object

    def router(self):
        return self.handle.router_handle.remote().result(timeout_s=60)


@pytest.fixture(scope="module")
def app(golden_dir, tmp_path_factory):
    from ray import serve

    from ingress.app import build_app, serve_options

    config_path = golden_config_file(golden_dir, tmp_path_factory.mktemp("faults"), ENGINE)
    http_port = _free_port()
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        serve.start(**serve_options("127.0.0.1", http_port, _free_port()))
        handle = serve.run(build_app({"config": str(config_path), "ep": 2, "backend": "ray",
                                      "placement_strategy": "PACK", "start_timeout_s": 300,
                                      "step_timeout_s": 60, "drain_grace_s": DRAIN_GRACE_S}),
                           name=APP, route_prefix="/")
        yield App(f"http://127.0.0.1:{http_port}", handle)
    finally:
        serve.shutdown()
        ray.shutdown()


def stats(router) -> dict:
    return ray.get(router.stats.remote(), timeout=30)


def live_groups() -> list[str]:
    return [g["name"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (ray.exceptions.RayError, TimeoutError):  # a router or replica being replaced
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def completion(app: App, **body) -> requests.Response:
    return requests.post(f"{app.http}/v1/completions", json={"prompt": "Hello", **body}, timeout=300)


def sse_stream(app: App, max_tokens: int) -> tuple[int, list[dict]]:
    """A streamed completion's status and data events (without [DONE]); an error is an {"error": ...} body,
    the whole response's when it failed before its first token, else the last event."""
    with requests.post(f"{app.http}/v1/completions", stream=True, timeout=300,
                       json={"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
                             "ignore_eos": True}) as response:
        if response.status_code != 200:
            return response.status_code, [response.json()]
        lines = [line[6:] for line in response.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == b"[DONE]"
    return 200, [json.loads(line) for line in lines[:-1]]


def streams_while(app: App, count: int, max_tokens: int, router, action) -> list:
    """`count` streams; `action()` once all of them are running on `router`; each stream's events (or error)."""
    results: list = [None] * count

    def run(k: int) -> None:
        try:
            results[k] = sse_stream(app, max_tokens)
        except Exception as err:  # noqa: BLE001 - reported through the assertions
            results[k] = (None, [{"exception": repr(err)}])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(count)]
    for thread in threads:
        thread.start()
    wait_until(lambda: stats(router)["running"] == count, 120, f"{count} running streams")
    action()
    for thread in threads:
        thread.join(timeout=400)
    assert not any(thread.is_alive() for thread in threads), "a stream hung"
    return results


def test_timeout_during_a_rebuild_is_504_without_waiting_for_the_rebuild(app):
    router = app.router()
    before = stats(router)
    os.kill(before["workers"][1]["pid"], signal.SIGKILL)  # an idle router notices at its next ping
    wait_until(lambda: stats(router)["state"] == "recovering", 60, "the router to start rebuilding")
    started = time.monotonic()
    response = completion(app, max_tokens=8, timeout_s=2)
    elapsed = time.monotonic() - started
    state = stats(router)["state"]
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "deadline"
    assert state == "recovering" and elapsed < 15  # ended by its deadline, not after the rebuild
    wait_until(lambda: stats(router)["state"] == "ready", 300, "the group to be rebuilt")
    assert completion(app, max_tokens=2).status_code == 200


def test_killed_router_under_load_is_replaced_and_leaves_no_placement_group(app):
    old = app.router()
    [old_group] = live_groups()
    pid = stats(old)["router_pid"]
    results = streams_while(app, 4, 80, old, lambda: os.kill(pid, signal.SIGKILL))
    for status, events in results:  # the router held their state: each ends with the retriable error, none hangs
        assert status in (200, 503) and events[-1].get("error", {}).get("code") == "unavailable", events[-1]
    # Serve's health check finds the router dead, removes its group and fails; Serve replaces the replica.
    new = wait_until(lambda: (r := app.router())._actor_id != old._actor_id and stats(r)["state"] == "ready" and r,
                     400, "Serve to replace the replica")
    assert completion(app, max_tokens=2).status_code == 200
    groups = live_groups()
    assert len(groups) == 1 and groups != [old_group], groups  # the replacement's own, nothing left over
    assert stats(new)["restarts"] == 0


def test_delete_drains_eight_streams_and_refuses_new_requests(app):
    from ray import serve

    router = app.router()
    refused: list[int] = []
    deleting = threading.Thread(target=serve.delete, args=(APP,))

    def delete_and_send_more() -> None:
        deleting.start()
        time.sleep(1.0)  # Serve has stopped routing to the replica and waits for its ongoing requests
        refused.extend(completion(app, max_tokens=2).status_code for _ in range(3))

    results = streams_while(app, 8, 40, router, delete_and_send_more)
    deleting.join(timeout=DRAIN_GRACE_S + 60)
    assert not deleting.is_alive()
    for status, events in results:  # every stream finished, with all its tokens
        assert status == 200, events
        assert events[-1]["choices"][0]["finish_reason"] == "length", events[-1]
        assert events[-1]["usage"]["completion_tokens"] == 40
    # Refused at once, never served by the draining replica: Serve's proxy drops a deleted app's route (404);
    # a caller that still reaches the router gets its drain's 503.
    assert refused and all(status in (404, 503) for status in refused), refused
    assert live_groups() == []  # the router shut down its group in the replica's __del__
