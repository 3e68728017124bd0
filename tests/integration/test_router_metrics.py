"""What a router on real Ray tells /metrics about its shard group (docs/observability.md): one shard worker
(no collectives) on the golden checkpoint. The worker reported every tensor it loaded; after a known set of
requests the router's queue-time histogram counts each request once, and the worker's own count of engine
calls equals the router's count of steps, phase by phase, as the rendered page shows them."""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")

from cluster.router import start_router  # noqa: E402
from cluster.scheduler import Request  # noqa: E402
from ingress.metrics import ReplicaMetrics  # noqa: E402
from tests.serving.test_metrics import scrape, value  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = {"max_slots": 4, "max_len": 64, "prefill_buckets": [16], "moe_block_size": 8}



async def stream(router, request: Request) -> list:
    refs = router.generate.options(num_returns="streaming").remote(request, None)
    return [event async for ref in refs for event in await ref]


def test_loading_queue_and_step_figures_of_a_ray_shard_group(local_ray, golden, golden_dir):
    router = start_router(golden.config.replace(engine=ENGINE), checkpoint=str(golden_dir), ep=1, backend="ray",
                          name="metrics", start_timeout_s=600)
    assert ray.get(router.wait_ready.remote(600), timeout=630)
    loading = ray.get(router.stats.remote(), timeout=30)["loading"]
    assert loading["processes"] == 1 and list(loading["tensors"]) == [0]
    done, total = loading["tensors"][0]
    assert done == total > 0

    requests = [Request(f"m{k}", [5, 6, 7 + k], max_tokens=3 + k, ignore_eos=True) for k in range(6)]

    async def run_all():
        return await asyncio.gather(*(stream(router, r) for r in requests))

    asyncio.run(asyncio.wait_for(run_all(), 300))

    def settled():  # the workers' timings are read without waiting: the next scrape has them
        stats = ray.get(router.stats.remote(), timeout=30)
        timings = stats["worker_timings"]
        decodes = [h["cumulative"][-1] for labels, h in stats["histograms"]["step_seconds"]
                   if labels["phase"] == "decode"][0]
        return stats if timings and timings[0].get("decode", (0,))[0] == decodes else None

    deadline, stats = time.monotonic() + 60, None
    while stats is None and time.monotonic() < deadline:
        stats = settled()
        time.sleep(0.2)
    assert stats is not None, "the worker's timings never caught up with the router's steps"
    replica = ReplicaMetrics(golden.config.name, "r1", 64)
    replica.update(stats)
    page = scrape(replica)
    assert value(page, "grok1_request_queue_time_seconds_count") == len(requests)
    for verb in ("prefill", "decode"):
        steps = value(page, "grok1_step_seconds_count", phase=verb)
        assert steps > 0 and value(page, "grok1_worker_steps_total", worker="0", verb=verb) == steps
        # the worker's time is part of the router's step time
        assert value(page, "grok1_worker_step_seconds_total", worker="0", verb=verb) <= \
            value(page, "grok1_step_seconds_sum", phase=verb)
    ray.get(router.shutdown.remote(), timeout=60)
