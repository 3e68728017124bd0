"""A router's own faults on real Ray: its process killed, its placement group left behind.

One local Ray instance of 3 CPUs and a 2-shard group (PACK): the group of a killed router still reserves 2
CPUs (Ray keeps a placement group until its creator's job ends), so a replacement could not be placed unless
it removes the stale group of its replica's name first.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

ray = pytest.importorskip("ray")

from cluster.router import placement_name, start_router  # noqa: E402
from cluster.scheduler import Request  # noqa: E402
from grok1.engine_api import Sampling  # noqa: E402
from workers.group import remove_placement_group_named  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = {"max_slots": 8, "max_len": 96, "prefill_buckets": [16, 32, 64], "moe_block_size": 8}


def live_groups() -> list[dict]:
    return [group for group in ray.util.placement_group_table().values() if group["state"] != "REMOVED"]


async def stream(router, request: Request) -> list:
    refs = router.generate.options(num_returns="streaming").remote(request, None)
    return [event async for ref in refs for event in await ref]


def generate(router, request: Request) -> list:
    return asyncio.run(asyncio.wait_for(stream(router, request), 120))


def run_all(router, requests: list[Request], during=None) -> list[list]:
    """Every request's events; `during()` runs in a thread once they are all streaming."""
    async def main():
        tasks = [asyncio.create_task(stream(router, r)) for r in requests]
        if during is not None:
            await asyncio.to_thread(during)
        return await asyncio.gather(*tasks)

    return asyncio.run(asyncio.wait_for(main(), 600))


def sixteen() -> list[Request]:
    """Greedy and seeded (one with penalties), prompts and lengths mixed."""
    requests = []
    for k in range(16):
        sampling = Sampling() if k % 2 == 0 else Sampling(temperature=1.0, top_p=0.9, seed=100 + k,
                                                          frequency_penalty=0.5 if k == 3 else 0.0)
        prompt = [(7 * k + 3 * j) % 500 + 3 for j in range(3 + k % 5)]
        requests.append(Request(f"s{k}", prompt, 12 + (k * 7) % 30, sampling, ignore_eos=True))
    return requests


def test_killed_router_leaves_no_placement_group(local_ray, golden, golden_dir):
    config = golden.config.replace(engine=ENGINE)

    def start(name):  # the replica's routers: each its own actor, one placement group name
        router = start_router(config, checkpoint=str(golden_dir), ep=2, placement_strategy="PACK", backend="ray",
                              name=name, group_name=placement_name("faults"), start_timeout_s=600,
                              step_timeout_s=60)
        assert ray.get(router.wait_ready.remote(600), timeout=630)
        return router

    first = start("faults-1")
    os.kill(ray.get(first.stats.remote(), timeout=30)["router_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:  # until Ray reports the router dead
        try:
            ray.get(first.stats.remote(), timeout=10)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            break
        assert time.monotonic() < deadline, "the killed router still answers"
        time.sleep(0.5)
    assert [g["name"] for g in live_groups()] == [placement_name("faults")]  # left behind by the dead router

    second = start("faults-2")  # would find no room for its 2 workers if the stale group still held its CPUs
    events = generate(second, Request("after", [1, 2, 3], 4, ignore_eos=True))
    assert events[-1].finish_reason == "length" and len([e for e in events if e.token is not None]) == 4
    assert [g["name"] for g in live_groups()] == [placement_name("faults")]  # the replacement's own, only

    # What the ingress replica's health check does when it finds its router dead.
    ray.kill(second)
    time.sleep(1.0)
    assert remove_placement_group_named(placement_name("faults"))
    assert live_groups() == []
    assert not remove_placement_group_named(placement_name("faults"))


def test_killed_worker_streams_resume_with_their_uninterrupted_tokens(local_ray, golden, golden_dir):
    """16 concurrent streams, SIGKILL a shard worker mid-generation: the group is rebuilt and every stream
    completes with exactly the tokens of the uninterrupted run (greedy and seeded), none lost or repeated."""
    config = golden.config.replace(engine=ENGINE)
    router = start_router(config, checkpoint=str(golden_dir), ep=2, placement_strategy="PACK", backend="ray",
                          name="resume", start_timeout_s=600, step_timeout_s=60)
    assert ray.get(router.wait_ready.remote(600), timeout=630)
    uninterrupted = {r.request_id: [e.token for e in events if e.token is not None]
                     for r, events in zip(sixteen(), run_all(router, sixteen()))}
    before = ray.get(router.stats.remote(), timeout=30)
    victim = before["workers"][1]["pid"]

    def kill_mid_generation():
        deadline = time.monotonic() + 120
        while ray.get(router.stats.remote(), timeout=30)["tokens_generated_total"] < \
                before["tokens_generated_total"] + 40:
            assert time.monotonic() < deadline, "no tokens generated"
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)

    results = run_all(router, sixteen(), during=kill_mid_generation)
    after = ray.get(router.stats.remote(), timeout=30)
    assert after["restarts"] == before["restarts"] + 1 and victim not in {w["pid"] for w in after["workers"]}
    for request, events in zip(sixteen(), results):
        assert events[-1].finish_reason == "length", (request.request_id, events[-1])
        assert [e.token for e in events if e.token is not None] == uninterrupted[request.request_id]
    ray.get(router.shutdown.remote(), timeout=60)
    assert live_groups() == []
