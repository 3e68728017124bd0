"""The router's logic (cluster/router.py) in this process, on the fake arithmetic engine of test_scheduler.py.

The router runs its real step thread, scheduler, driver (pipelined or not) and streams; only the shard group
is replaced by `LocalShardGroup` over the fake engine, so every token can be worked out by hand:
first token = sum(prompt) % 100, then +1 per step. Faults are injected by the engine raising GroupFailure.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cluster.replica_config import ReplicaConfig
from cluster.router import Router, Unavailable
from cluster.scheduler import InvalidRequest, QueueFull, Request
from grok1.config import Grok1Config, ModelConfig
from grok1.engine import Sampling, StepOutput
from tests.serving.fakes import VOCAB, FakeEngine
from workers.group import GroupFailure, LocalShardGroup

MAX_SLOTS = 4
CONFIG = Grok1Config(name="fake", model=ModelConfig(vocab_size=128, emb_size=64, key_size=16, num_q_heads=4,
                                                    num_kv_heads=2, num_layers=1, eos_token=2),
                     ).replace(engine={"max_slots": MAX_SLOTS, "max_len": 64, "prefill_buckets": [16],
                                       "moe_block_size": 8})


class SlowFakeEngine(FakeEngine):
    """The fake engine with a step time, the pipelined verbs, and a fault to inject."""

    def __init__(self, step_s: float = 0.0, fail_at_decode: int | None = None):
        super().__init__(MAX_SLOTS)
        self.step_s = step_s
        self.fail_at_decode = fail_at_decode

    def decode(self):
        time.sleep(self.step_s)
        if self.fail_at_decode is not None and self.decodes + 1 >= self.fail_at_decode:
            raise GroupFailure("worker 1 died (injected)")
        return super().decode()

    def decode_start(self):
        return self.decode()

    def prefill_many(self, slots, prompts, samplings, generated=None):
        """A resumed request (prompt + its n generated tokens) continues its +1 sequence from its last token."""
        outs = [self.prefill(slot, prompt, sampling) for slot, prompt, sampling in zip(slots, prompts, samplings)]
        for k, n in enumerate(generated or []):
            if n:
                outs[k].tokens[0] = self.last[slots[k]] = (prompts[k][-1] + 1) % VOCAB
        return StepOutput(np.concatenate([o.tokens for o in outs]), np.concatenate([o.logprobs for o in outs]),
                          sum(o.expert_counts for o in outs))

    def shutdown(self):
        self.shut_down = True

    def decode_finish(self, handle):
        return handle


def expected(prompt, n):
    first = sum(prompt) % VOCAB
    return [(first + i) % VOCAB for i in range(n)]


def make_router(engines, rebuild_s: float = 0.0, **kwargs) -> Router:
    """A router whose k-th shard group (first start, then each rebuild, which takes rebuild_s) runs engines[k]."""
    made = []

    def factory(spec):
        if made:
            time.sleep(rebuild_s)
        if not engines:
            raise RuntimeError("no more engines")
        made.append(engines.pop(0))
        return LocalShardGroup(made[-1])

    settings = ReplicaConfig(ep=1, **kwargs)
    router = Router(settings.group_spec(CONFIG, "unused"), settings, group_factory=factory)
    router.made = made
    return router


async def batches(router, request, timeout_s=None):
    """The lists of events the router's stream yields, as they come."""
    return [batch async for batch in router.generate(request, timeout_s=timeout_s)]


async def collect(router, request, timeout_s=None):
    return [event for batch in await batches(router, request, timeout_s) for event in batch]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize("pipelined", [True, False])
def test_concurrent_streams_get_their_own_tokens(pipelined):
    router = make_router([SlowFakeEngine()], pipelined=pipelined)

    async def main():
        await router.wait_ready(10)
        requests = [Request(f"r{k}", [10 + k, 3], max_tokens=3 + k % 5, ignore_eos=True) for k in range(12)]
        results = await asyncio.gather(*(collect(router, r) for r in requests))
        for request, events in zip(requests, results):
            assert [e.token for e in events] == expected(request.prompt, request.max_tokens)
            assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
        stats = await router.stats()
        assert stats["requests_total"] == {"length": 12} and stats["running"] == 0
        assert stats["tokens_generated_total"] == sum(r.max_tokens for r in requests)
        assert len(stats["ttft_seconds"]) == 12 and len(stats["tpot_seconds"]) == 12
        await router.shutdown()

    run(main())


def test_full_queue_refuses_at_once_with_a_retriable_error():
    router = make_router([SlowFakeEngine(step_s=0.02)], max_queue=2)

    async def main():
        await router.wait_ready(10)
        long = [asyncio.create_task(collect(router, Request(f"long{k}", [5], 40, ignore_eos=True)))
                for k in range(MAX_SLOTS)]
        while (await router.stats())["running"] < MAX_SLOTS:
            await asyncio.sleep(0.01)
        long += [asyncio.create_task(collect(router, Request(f"wait{k}", [5], 4))) for k in range(2)]
        while (await router.stats())["queue_length"] < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="queue is full") as err:
            await collect(router, Request("extra", [5], 4))
        assert err.value.retriable
        for task in long:
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        events = await collect(router, Request("after", [5], 2, ignore_eos=True))  # the router still serves
        assert [e.token for e in events] == expected([5], 2)
        await router.shutdown()

    run(main())


def test_invalid_request_fails_at_first_read_and_router_keeps_serving():
    router = make_router([SlowFakeEngine()])

    async def main():
        await router.wait_ready(10)
        with pytest.raises(InvalidRequest, match="exceeds the context of 64"):
            await collect(router, Request("too-long", [1] * 60, 10))
        with pytest.raises(InvalidRequest, match="timeout must be in"):
            await collect(router, Request("t", [1], 1), timeout_s=0)
        assert [e.token for e in await collect(router, Request("ok", [4], 2, ignore_eos=True))] == [4, 5]
        await router.shutdown()

    run(main())


def test_cancel_frees_the_slot_within_a_step():
    engine = SlowFakeEngine(step_s=0.02)
    router = make_router([engine])

    async def main():
        await router.wait_ready(10)
        stream = router.generate(Request("c", [5], 50, ignore_eos=True))
        first = (await stream.__anext__())[0]
        assert first.token == 5
        await router.cancel("c")
        rest = [event async for batch in stream for event in batch]
        assert rest[-1].finish_reason == "cancelled" and rest[-1].token is None
        assert len(rest) <= 3  # at most the step in flight and the one started before the cancel arrived
        assert (await router.stats())["running"] == 0 and engine.releases == [0]
        await router.shutdown()

    run(main())


def test_a_caller_that_goes_away_frees_its_slot():
    engine = SlowFakeEngine(step_s=0.02)
    router = make_router([engine])

    async def main():
        await router.wait_ready(10)
        stream = router.generate(Request("gone", [5], 50, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()  # what Ray does when the caller drops a streaming generator
        for _ in range(50):
            if engine.releases:
                break
            await asyncio.sleep(0.02)
        assert engine.releases == [0] and (await router.stats())["requests_total"] == {"cancelled": 1}
        await router.shutdown()

    run(main())


def test_deadline_ends_queued_and_running_requests():
    router = make_router([SlowFakeEngine(step_s=0.05)])

    async def main():
        await router.wait_ready(10)
        started = time.monotonic()
        events = await collect(router, Request("d", [5], 60, ignore_eos=True), timeout_s=0.3)
        assert events[-1].finish_reason == "deadline" and time.monotonic() - started < 2
        assert 1 <= len(events) - 1 < 60
        await router.shutdown()

    run(main())


def test_group_failure_resumes_running_requests_exactly_and_keeps_the_queue():
    first, second = SlowFakeEngine(step_s=0.01, fail_at_decode=5), SlowFakeEngine()
    router = make_router([first, second])

    async def main():
        await router.wait_ready(10)
        prompts = [[k + 10] for k in range(MAX_SLOTS)]
        running = [asyncio.create_task(collect(router, Request(f"run{k}", p, 20, ignore_eos=True)))
                   for k, p in enumerate(prompts)]
        await asyncio.sleep(0.005)
        queued = asyncio.create_task(collect(router, Request("queued", [3], 3, ignore_eos=True)))
        for task, prompt in zip(running, prompts):
            events = await task  # paused through the rebuild, then resumed: none lost, none repeated
            assert [e.token for e in events] == expected(prompt, 20) and events[-1].finish_reason == "length"
        events = await queued  # kept in the queue through the rebuild, then served by the new group
        assert [e.token for e in events] == expected([3], 3) and events[-1].finish_reason == "length"
        for prompt in prompts:  # the new group was given prompt + the tokens already sent
            [(_, context, _)] = [p for p in second.prefills if p[1][0] == prompt[0]]
            assert context[1:] == expected(prompt, len(context) - 1) and 1 < len(context) < 21
        stats = await router.stats()
        assert stats["restarts"] == 1 and stats["state"] == "ready" and len(router.made) == 2
        await router.shutdown()

    run(main())


def test_during_a_rebuild_deadlines_hold_and_the_queue_bound_refuses_at_once():
    first, second = SlowFakeEngine(step_s=0.01, fail_at_decode=3), SlowFakeEngine()
    router = make_router([first, second], rebuild_s=3.0, max_queue=1)

    async def main():
        await router.wait_ready(10)
        running = [asyncio.create_task(collect(router, Request(f"run{k}", [k + 10], 30, ignore_eos=True)))
                   for k in range(MAX_SLOTS)]
        while router.state != "recovering":
            await asyncio.sleep(0.01)
        started = time.monotonic()
        events = await collect(router, Request("late", [5], 3), timeout_s=0.3)  # queued during the rebuild
        assert events[-1].finish_reason == "deadline" and time.monotonic() - started < 2.0
        queued = asyncio.create_task(collect(router, Request("fits", [4], 2, ignore_eos=True)))
        await asyncio.sleep(0.2)
        with pytest.raises(QueueFull):  # 4 resuming + 1 queued for 4 slots: over the bound of 1
            await collect(router, Request("over", [6], 2))
        assert router.state == "recovering" and time.monotonic() - started < 2.5
        for k, task in enumerate(running):
            assert [e.token for e in await task] == expected([k + 10], 30)
        assert [e.token for e in await queued] == expected([4], 2)
        await router.shutdown()

    run(main())


def test_requests_that_cannot_resume_within_the_bound_end_with_the_retriable_error():
    first, second = SlowFakeEngine(step_s=0.01, fail_at_decode=3), SlowFakeEngine()
    router = make_router([first, second], rebuild_s=3.0, resume_timeout_s=0.5)

    async def main():
        await router.wait_ready(10)
        running = [asyncio.create_task(collect(router, Request(f"run{k}", [k + 10], 30, ignore_eos=True)))
                   for k in range(MAX_SLOTS)]
        for task in running:
            events = await task
            assert events[-1].finish_reason == "error" and "not rebuilt within 0.5s" in events[-1].error
            assert router.state == "recovering"  # ended within the bound, not when the rebuild was done
        await router.shutdown()

    run(main())


def test_start_failure_is_reported_within_a_bound():
    router = make_router([])  # the factory raises: e.g. a checkpoint that does not match the config

    async def main():
        with pytest.raises(Unavailable, match="failed to start: RuntimeError: no more engines"):
            await router.wait_ready(10)
        with pytest.raises(Unavailable, match="failed"):
            await collect(router, Request("x", [1], 1))
        assert not (await router.health())["ok"]

    run(main())


def test_health_probe_generates_one_token():
    router = make_router([SlowFakeEngine()])

    async def main():
        await router.wait_ready(10)
        health = await router.health()
        assert health == {"ok": True, "state": "ready", "detail": "probe generated 1 token"}
        await router.shutdown()
        assert router.made[0].shut_down and router.state == "stopped"  # the group goes with the router
        with pytest.raises(Unavailable, match="stopped"):
            await collect(router, Request("late", [1], 1))

    run(main())


def test_sampling_settings_reach_the_engine():
    engine = SlowFakeEngine()
    router = make_router([engine])

    async def main():
        await router.wait_ready(10)
        await collect(router, Request("s", [1, 2], 2, sampling=Sampling(0.7, 0.9, 5, 42)))
        assert engine.prefills[-1][2] == Sampling(0.7, 0.9, 5, 42)
        assert np.all(~engine.active)
        await router.shutdown()

    run(main())


def test_each_step_reaches_each_caller_in_at_most_one_message():
    """A step's tokens go out to the callers in one hand-off per step (not one per token), and each stream
    yields at most one list per step: in order, the finish reason on the last event only."""
    engine = SlowFakeEngine(step_s=0.01)
    router = make_router([engine])

    async def main():
        await router.wait_ready(10)
        requests = [Request(f"s{k}", [20 + k], 8, ignore_eos=True) for k in range(MAX_SLOTS)]
        results = await asyncio.gather(*(batches(router, r) for r in requests))
        steps = engine.decodes + len(engine.prefills)  # at most one prefill call per request
        for request, lists in zip(requests, results):
            events = [event for batch in lists for event in batch]
            assert [e.token for e in events] == expected(request.prompt, 8)
            assert all(lists) and len(lists) <= steps
            assert events[-1].finish_reason == "length" and all(e.finish_reason is None for e in events[:-1])
        stats = await router.stats()
        assert stats["stream_items_total"] == sum(len(lists) for lists in results)
        # 32 tokens for 4 callers: one hand-off per step that produced tokens, not one per token.
        assert stats["stream_flushes_total"] <= steps < stats["tokens_generated_total"]
        await router.shutdown()

    run(main())


def test_a_caller_that_reads_late_gets_everything_since_its_last_read_in_one_message():
    router = make_router([SlowFakeEngine(step_s=0.005)])

    async def main():
        await router.wait_ready(10)
        stream = router.generate(Request("late", [30], 8, ignore_eos=True))
        first = await stream.__anext__()  # the prefill's token (and any step's that came before this read)
        assert first[0].token == 30 and first[-1].finish_reason is None
        # The router finishes meanwhile, and its last flush reaches this loop (the stats count a finish when the
        # step thread takes the event, which is before that flush is handed to the caller's loop).
        late = router._streams["late"]
        while not (late.events and late.events[-1].finish_reason is not None):
            await asyncio.sleep(0.01)
        rest = await stream.__anext__()  # all the rest, in one message
        assert rest and [e.token for e in first + rest] == expected([30], 8)
        assert rest[-1].finish_reason == "length" and all(e.finish_reason is None for e in first + rest[:-1])
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        await router.shutdown()

    run(main())


def test_a_deadline_after_tokens_arrives_in_order_in_the_same_stream():
    router = make_router([SlowFakeEngine(step_s=0.02)])

    async def main():
        await router.wait_ready(10)
        stream = router.generate(Request("d2", [40], 60, ignore_eos=True), timeout_s=0.3)
        first = await stream.__anext__()
        await asyncio.sleep(0.6)  # past the deadline without reading
        rest = [batch async for batch in stream]
        assert len(rest) == 1  # everything since the first read, in one message
        rest = rest[0]
        tokens = [e.token for e in first + rest[:-1]]
        assert tokens == expected([40], len(tokens)) and len(tokens) > 1
        assert rest[-1].finish_reason == "deadline" and rest[-1].token is None
        await router.shutdown()

    run(main())


@pytest.mark.parametrize("pipelined", [True, False])
def test_the_driver_flushes_once_per_phase_with_at_most_one_event_per_request(pipelined):
    """What the router's one-message-per-step rests on: between two flushes each request has at most one event,
    and the prefill's first tokens are flushed before the decode step runs."""
    from tests.serving.test_scheduler import make

    log = []
    driver, _, _ = make(max_slots=3, on_event=log.append)
    driver.on_flush, driver.pipelined = lambda: log.append("flush"), pipelined
    driver.engine.decode_start, driver.engine.decode_finish = driver.engine.decode, lambda handle: handle
    driver.generate([Request(f"f{k}", [10 * k + 1], 4, ignore_eos=True) for k in range(3)])
    phases, current = [], []
    for item in log:
        if item == "flush":
            phases.append(current)
            current = []
        else:
            current.append(item.request_id)
    assert current == [] and phases[0] == ["f0", "f1", "f2"]  # the prefills, flushed before any decode
    assert all(len(ids) == len(set(ids)) for ids in phases) and sum(map(len, phases)) == 12


def test_drain_refuses_new_requests_lets_running_finish_then_ends_the_rest():
    router = make_router([SlowFakeEngine(step_s=0.01)])

    async def main():
        await router.wait_ready(10)
        short = [asyncio.create_task(collect(router, Request(f"short{k}", [k + 10], 8, ignore_eos=True)))
                 for k in range(2)]
        long = asyncio.create_task(collect(router, Request("long", [7], 60, ignore_eos=True)))
        await asyncio.sleep(0.03)
        draining = asyncio.create_task(router.drain(grace_s=0.3))
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="draining"):
            await collect(router, Request("new", [5], 2))
        assert not (await router.health(probe=False))["ok"]
        for k, task in enumerate(short):  # finished within the grace period
            assert [e.token for e in await task] == expected([k + 10], 8)
        assert await draining == {"ended_with_error": 1}
        events = await long
        assert events[-1].finish_reason == "error" and "grace period" in events[-1].error
        assert [e.token for e in events[:-1]] == expected([7], len(events) - 1)
        await router.shutdown()

    run(main())


def _counts(stats: dict, name: str) -> dict[str, int]:
    """{phase (or ""): observations} of one of the router's histograms in stats()."""
    return {labels.get("phase", ""): h["cumulative"][-1] for labels, h in stats["histograms"][name]}


@pytest.mark.parametrize("pipelined", [True, False])
def test_queue_and_step_times_count_each_wait_and_each_engine_step(pipelined):
    engine = SlowFakeEngine(step_s=0.002)
    router = make_router([engine], pipelined=pipelined)

    async def main():
        await router.wait_ready(10)
        lengths = [3, 1, 5]
        for k, n in enumerate(lengths):  # one at a time: each prefill call is one request's
            await collect(router, Request(f"t{k}", [4, k], max_tokens=n, ignore_eos=True))
        # A pipelined router may have started one more decode step when the last token arrives: it is counted
        # when it ends (within a step's time), so read until it has been, for a bounded while.
        deadline = time.monotonic() + 5
        while True:
            stats = await router.stats()
            steps = _counts(stats, "step_seconds")
            if steps.get("decode") == engine.decodes or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        assert _counts(stats, "request_queue_time_seconds") == {"": len(lengths)}
        assert steps == {"prefill": len(lengths), "decode": engine.decodes, "mixed": 0}
        assert engine.decodes >= sum(n - 1 for n in lengths)  # the pipeline may start one step more per request
        decode = dict((labels["phase"], h) for labels, h in stats["histograms"]["step_seconds"])["decode"]
        if not pipelined:  # (the fake computes in decode_start: a pipelined step's time is then all overlapped)
            assert decode["sum"] >= engine.decodes * engine.step_s  # each decode sleeps step_s at least
        assert stats["loading"]["processes"] == 1
        await router.shutdown()

    run(main())


# ------------------------------------------------------------------------------ one subscription per caller
async def subscribed(router, subscriber: str, requests, timeout_s=None):
    """Submit `requests` through one subscription and read it until all finish: (items read after the
    opening one, {request id: its events in order})."""
    stream = router.subscribe(subscriber)
    assert await stream.__anext__() == {}  # open
    for request in requests:
        await router.submit(request, subscriber, timeout_s)
    events: dict[str, list] = {r.request_id: [] for r in requests}
    items, finished = 0, set()
    while len(finished) < len(requests):
        batch = await stream.__anext__()
        items += 1
        for request_id, got in batch.items():
            assert request_id not in finished  # nothing of a request follows its finish
            events[request_id] += got
            if got[-1].finish_reason is not None:
                finished.add(request_id)
    await stream.aclose()
    return items, events


def test_a_subscription_carries_all_its_requests_in_one_message_per_step():
    engine = SlowFakeEngine(step_s=0.01)
    router = make_router([engine])

    async def main():
        await router.wait_ready(10)
        requests = [Request(f"m{k}", [40 + k], 8, ignore_eos=True) for k in range(MAX_SLOTS)]
        items, events = await subscribed(router, "ingress-1", requests)
        for request in requests:
            got = events[request.request_id]
            assert [e.token for e in got] == expected(request.prompt, 8)
            assert got[-1].finish_reason == "length" and all(e.finish_reason is None for e in got[:-1])
        steps = engine.decodes + len(engine.prefills)
        assert items <= steps < sum(len(got) for got in events.values())  # per step, not per request per step
        stats = await router.stats()
        assert stats["running"] == 0 and stats["requests_total"] == {"length": MAX_SLOTS}
        assert [e.token for e in await collect(router, Request("m0", [4], 2, ignore_eos=True))] == [4, 5]  # id free
        await router.shutdown()

    run(main())


def test_submit_refuses_before_any_token_and_the_subscription_keeps_serving():
    router = make_router([SlowFakeEngine()])

    async def main():
        await router.wait_ready(10)
        with pytest.raises(Unavailable, match="no open subscription"):
            await router.submit(Request("x", [1], 1), "never-opened")
        stream = router.subscribe("s")
        assert await stream.__anext__() == {}
        with pytest.raises(InvalidRequest, match="already in use"):
            await router.subscribe("s").__anext__()
        with pytest.raises(InvalidRequest, match="exceeds the context of 64"):
            await router.submit(Request("too-long", [1] * 60, 10), "s")
        with pytest.raises(InvalidRequest, match="timeout must be in"):
            await router.submit(Request("t", [1], 1), "s", timeout_s=0)
        await router.submit(Request("ok", [4], 2, ignore_eos=True), "s")
        got = []
        while not got or got[-1].finish_reason is None:
            batch = await stream.__anext__()
            assert set(batch) == {"ok"}  # the refused requests send nothing
            got += batch["ok"]
        assert [e.token for e in got] == [4, 5]
        await stream.aclose()
        await router.shutdown()

    run(main())


def test_a_subscriber_that_goes_away_frees_the_slots_of_its_requests():
    engine = SlowFakeEngine(step_s=0.02)
    router = make_router([engine])

    async def main():
        await router.wait_ready(10)
        stream = router.subscribe("gone")
        await stream.__anext__()
        await router.submit(Request("a", [5], 50, ignore_eos=True), "gone")
        await router.submit(Request("b", [6], 50, ignore_eos=True), "gone")
        flowing: set[str] = set()
        while flowing != {"a", "b"}:  # both decoding (a request still queued is cancelled without a slot)
            flowing |= set(await stream.__anext__())
        await stream.aclose()  # what Ray does when the caller drops a streaming generator
        for _ in range(100):
            if len(engine.releases) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted(engine.releases) == [0, 1]
        assert (await router.stats())["requests_total"] == {"cancelled": 2}
        await router.shutdown()

    run(main())


def test_the_in_process_group_dispatches_a_decode_step_and_reads_it_at_collect():
    """As a Ray group's call does, so the pipelined driver hands out step k while step k+1 computes."""
    calls = []

    class Engine:
        def decode(self, *args):
            calls.append("decode")
            return "tokens"

        def decode_start(self, *args):
            calls.append("start")
            return ("handle",)

        def decode_finish(self, handle):
            calls.append(("finish", handle))
            return "tokens"

    group = LocalShardGroup(Engine())
    handle = group.submit("decode")
    assert calls == ["start"]
    assert group.collect(handle) == ["tokens"] and calls == ["start", ("finish", ("handle",))]
