"""The router (cluster/router.py) with a paged engine config: the scheduler it builds is paged, the fake
paged engine of test_paged_scheduler.py runs the steps, and stats() reports the KV cache and preemptions."""

from __future__ import annotations

import asyncio

from cluster.replica_config import ReplicaConfig
from cluster.router import Router
from cluster.scheduler import Request
from grok1.engine_api import Sampling
from ingress.metrics import ReplicaMetrics
from tests.serving.fakes import FakePagedEngine, reference
from tests.serving.test_metrics import scrape, value
from tests.serving.test_router import CONFIG, MAX_SLOTS, collect, run
from workers.group import LocalShardGroup

BLOCKS, BLOCK_SIZE = 10, 4
PAGED = CONFIG.replace(engine={"kv_blocks": BLOCKS, "kv_block_size": BLOCK_SIZE, "token_budget": MAX_SLOTS + 4})


def test_a_paged_router_streams_exact_tokens_under_preemption_and_reports_its_cache():
    settings = ReplicaConfig(ep=1)
    engine = FakePagedEngine(BLOCKS, BLOCK_SIZE, MAX_SLOTS)
    router = Router(settings.group_spec(PAGED, "unused"), settings, group_factory=lambda spec: LocalShardGroup(engine))

    async def main():
        await router.wait_ready(10)
        requests = [Request(f"r{k}", [k + 1] * 6, max_tokens=20, sampling=Sampling(seed=k), ignore_eos=True)
                    for k in range(4)]  # 4 x 26 tokens = 28 blocks' worth for a pool of 10
        results = await asyncio.gather(*(collect(router, r) for r in requests))
        for request, events in zip(requests, results):
            assert [e.token for e in events] == reference(request)
        stats = await router.stats()
        assert stats["preemptions_total"] > 0 and stats["kv_blocks_total"] == BLOCKS
        assert stats["kv_blocks_used"] == 0 and stats["running_sequences"] == stats["waiting_sequences"] == 0
        assert stats["prefix_cache_queries"] >= stats["prefix_cache_hits"] > 0  # replays hit their own blocks
        # What /metrics makes of it: the scheduler's figures, in tokens as vLLM counts them.
        replica = ReplicaMetrics("fake", "r1", 64)
        replica.update(stats)
        page = scrape(replica)
        assert value(page, "grok1_num_preemptions_total") == stats["preemptions_total"]
        assert value(page, "grok1_prefix_cache_hits_total") == stats["prefill_tokens_cached_total"] > 0
        # every admission looked up its whole context: 4 prompts of 6, and each preempted one again with its tokens
        assert value(page, "grok1_prefix_cache_queries_total") == stats["prefix_cache_queried_tokens_total"] > 24
        assert value(page, "grok1_kv_cache_usage_perc") == 0
        assert value(page, "grok1_request_queue_time_seconds_count") == len(requests)  # preempted: no new wait
        phases = {"decode": sum(bool(p.decode and not p.chunks) for p in engine.plans),
                  "prefill": sum(bool(p.chunks and not p.decode) for p in engine.plans),
                  "mixed": sum(bool(p.decode and p.chunks) for p in engine.plans)}
        assert phases["mixed"] > 0
        for phase, steps in phases.items():
            assert value(page, "grok1_step_seconds_count", phase=phase) == steps
        await router.shutdown()

    run(main())
