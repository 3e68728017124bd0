"""A caller's one subscription to a router actor (cluster/channel.py), over real Ray: the router runs its real
step thread on the fake arithmetic engine of tests/serving (first token = sum(prompt) % 100, then +1 per step).
"""

from __future__ import annotations

import asyncio

import pytest

from cluster.channel import RouterChannel
from cluster.replica_config import ReplicaConfig
from cluster.router import Router
from cluster.scheduler import InvalidRequest, Request
from tests.serving.test_router import CONFIG, SlowFakeEngine, expected
from workers.group import LocalShardGroup

pytestmark = pytest.mark.slow


def fake_group(spec):
    """The router's shard group: the fake engine in the router's process (picklable: a module function)."""
    return LocalShardGroup(SlowFakeEngine(step_s=0.01))


@pytest.fixture
def router(local_ray):
    import ray

    settings = ReplicaConfig(ep=1)
    actor = ray.remote(Router).options(num_cpus=0, max_concurrency=1000).remote(
        settings.group_spec(CONFIG, "unused"), settings, group_factory=fake_group)
    assert ray.get(actor.wait_ready.remote(30), timeout=60)
    yield actor
    ray.kill(actor)


async def read_all(stream) -> list:
    events = []
    while not events or events[-1].finish_reason is None:
        events += await stream.next_batch()
    return events


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_requests_through_one_subscription_get_their_own_tokens_and_refusals_raise_at_submit(router):
    import ray

    async def main():
        channel = RouterChannel(router)
        requests = [Request(f"c{k}", [10 + k, 3], 3 + k % 4, ignore_eos=True) for k in range(10)]  # > 4 slots

        async def one(request):
            return await read_all(await channel.submit(request))

        results = await asyncio.gather(*(one(r) for r in requests))
        for request, events in zip(requests, results):
            assert [e.token for e in events] == expected(request.prompt, request.max_tokens)
            assert events[-1].finish_reason == "length"
        with pytest.raises(InvalidRequest, match="exceeds the context of 64"):
            await channel.submit(Request("too-long", [1] * 60, 10))
        assert [e.token for e in await read_all(await channel.submit(Request("after", [4], 2, ignore_eos=True)))] \
            == [4, 5]
        subscriber = channel.subscriber
        stats = await router.stats.remote()
        # One opening item, then at most one per step for all ten requests: fewer than the requests' tokens.
        assert stats["stream_items_total"] < stats["tokens_generated_total"]
        channel.close()
        return subscriber

    first = run(main())
    assert first.startswith("sub-")
    assert ray.get(router.stats.remote(), timeout=30)["running"] == 0


def test_cancel_frees_the_slot_and_a_dead_router_fails_every_open_stream(router):
    import ray

    async def main():
        channel = RouterChannel(router)
        cancelled = await channel.submit(Request("cancel-me", [5], 50, ignore_eos=True))
        await cancelled.next_batch()
        channel.cancel("cancel-me")
        for _ in range(100):
            if (await router.stats.remote())["requests_total"] == {"cancelled": 1}:
                break
            await asyncio.sleep(0.02)
        assert (await router.stats.remote())["running"] == 0
        running = await channel.submit(Request("long", [6], 60, ignore_eos=True))
        await running.next_batch()
        ray.kill(router)
        with pytest.raises(Exception) as failure:  # noqa: PT011 - Ray's error for a dead actor
            while True:
                await asyncio.wait_for(running.next_batch(), 30)
        assert not isinstance(failure.value, asyncio.TimeoutError)
        with pytest.raises(Exception):  # noqa: PT011, B017 - a new subscription on a dead router fails too
            await channel.submit(Request("after-death", [1], 1))

    run(main())
