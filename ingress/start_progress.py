"""Where a starting replica is, for the person waiting on `grok1 serve`, and a failure reported at once.

Phases, from what the launcher can see: the Serve deployment (its replicas' constructors), the router's state
and error (`Router.stats()`), the shard group's placement group in Ray's GCS (pending while the cluster lacks
the CPUs/GPUs it asks for), and the tensors each shard worker has loaded, which the workers send their router
as they load (`stats()["loading"]`): "loading the weights: n/N tensors", then "compiling" once all are in.
`phase(...)` is pure; `watch(...)` polls, prints a line whenever the phase changes (and every `heartbeat_s`
while it does not), and raises `StartFailed` with the reason as soon as the deployment or the router has failed.
"""

from __future__ import annotations

import sys
import time

POLL_S = 1.0
HEARTBEAT_S = 15.0


class StartFailed(RuntimeError):
    """The replica cannot start; the message says why (exit status 1 from `grok1 serve`)."""


def phase(stats: dict | None, pending_groups: list[dict]) -> str:
    """One line for the replica's state: `stats` from Router.stats() (None before the router answers)."""
    if stats is None:
        return "starting the ingress replica and its router"
    state = stats.get("state")
    if state == "failed":
        raise StartFailed(stats.get("error") or "the router failed")
    if state == "ready":
        return "ready"
    if pending_groups:
        wanted = ", ".join(f"{len(g['bundles'])} x {next(iter(g['bundles'].values()))}" for g in pending_groups)
        return f"placing the shard workers (waiting for room: {wanted})"
    if state == "recovering":
        return f"rebuilding the shard group ({stats.get('error') or 'after a failure'}): {loading(stats)}"
    return loading(stats)


def loading(stats: dict) -> str:
    """Where the shard workers' loading is, from the counts they reported (none yet: the first words)."""
    report = stats.get("loading") or {}
    tensors = report.get("tensors") or {}
    if not tensors:
        return "loading the weights and compiling the steps"
    done, total = sum(d for d, _ in tensors.values()), sum(t for _, t in tensors.values())
    processes = report.get("processes", len(tensors))
    if len(tensors) >= processes and done == total:
        return f"compiling the steps ({total} tensors loaded)"
    workers = f"{len(tensors)} of {processes} workers" if processes > 1 else "1 worker"
    return f"loading the weights: {done}/{total} tensors ({workers})"


def pending_placement_groups() -> list[dict]:
    from ray.util.placement_group import placement_group_table

    return [g for g in placement_group_table().values() if g.get("state") in ("PENDING", "RESCHEDULING")]


def deployment_failure(app_name: str) -> str | None:
    """Serve's message when the application failed to deploy (a replica's constructor raised), else None."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or str(getattr(app.status, "value", app.status)) != "DEPLOY_FAILED":
        return None
    details = [d.message for d in app.deployments.values() if d.message]
    return last_error_line(app.message or "; ".join(details) or "the deployment failed")


def last_error_line(message: str) -> str:
    """A traceback's last line (`NameError: ...`), or the message itself when it is one line."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1] if lines else message


def router_stats(router) -> dict:
    import ray

    return ray.get(router.stats.remote(), timeout=60)


def watch(handle, app_name: str, timeout_s: float, *, out=sys.stderr, clock=time.monotonic):
    """Wait for the replica behind `handle` (a Serve handle on Grok1Ingress); return its router actor."""
    started = clock()
    router, shown, last_print = None, None, 0.0
    response = handle.router_handle.remote()  # answered once the replica's constructor has run
    while True:
        elapsed = clock() - started
        if elapsed > timeout_s:
            raise StartFailed(f"not ready after {timeout_s:.0f}s: {shown}")
        if (failure := deployment_failure(app_name)) is not None:
            raise StartFailed(failure)
        stats = None
        if router is None:
            try:
                router = response.result(timeout_s=POLL_S)
            except TimeoutError:  # Ray's GetTimeoutError is one too
                pass
        if router is not None:
            stats = router_stats(router)
        now = phase(stats, pending_placement_groups() if stats and stats.get("state") != "ready" else [])
        if now != shown or clock() - last_print >= HEARTBEAT_S:
            print(f"[{elapsed:6.1f}s] {now}", file=out, flush=True)
            shown, last_print = now, clock()
        if now == "ready":
            return router
        time.sleep(POLL_S)
