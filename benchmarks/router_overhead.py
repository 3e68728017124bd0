"""The router's own cost per step, without a model: the router actor over an engine that only sleeps.

    python -m benchmarks.router_overhead [--step-ms 20] [--streams 1 32] [--tokens 48] [--rounds 3]

The engine (`SleepEngine`) is the engine interface with arithmetic for a model and `step_ms` of sleep per
decode or prefill call (a sleep holds no CPU, as a router waiting on its shard workers does not), so the step
time is known exactly. Two loops run the same load side by side, once per round:
- the Driver called in this process on the engine (no actor, no streaming): the loop's own cost;
- a Router actor (cluster/router.py, `group_factory` = this engine) streamed to this process over Ray, the
  way the ingress reads it.
Per-step overhead = wall time per decode step minus `step_ms`, per path; and, since on a shared machine CPU
is what the router takes from the shard workers, the CPU time per step of the router actor's process and of
this process (the caller, reading the streams), and the streaming items per step. No JAX is loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

import numpy as np

from grok1.engine_api import StepOutput

_ids = itertools.count()


class SleepEngine:
    """Tokens by arithmetic (prefill: sum(prompt) % vocab, then +1 per step), `step_s` of sleep per call."""

    def __init__(self, max_slots: int, step_s: float, vocab: int = 100):
        self.max_slots, self.step_s, self.vocab = max_slots, step_s, vocab
        self.last = np.zeros(max_slots, np.int64)
        self.active = np.zeros(max_slots, bool)
        self.decodes = 0

    def prefill_many(self, slots, prompts, samplings) -> StepOutput:
        time.sleep(self.step_s)
        tokens = np.array([sum(p) % self.vocab for p in prompts], np.int32)
        self.last[slots], self.active[slots] = tokens, True
        return StepOutput(tokens, np.full(len(slots), -0.5, np.float32), np.zeros((1, 8), np.int64))

    def prefill(self, slot, prompt, sampling) -> StepOutput:
        return self.prefill_many([slot], [prompt], [sampling])

    def decode(self) -> StepOutput:
        time.sleep(self.step_s)
        self.decodes += 1
        tokens = np.where(self.active, (self.last + 1) % self.vocab, -1).astype(np.int32)
        self.last = np.where(self.active, tokens, self.last)
        return StepOutput(tokens, np.where(self.active, -0.25, 0.0).astype(np.float32), np.zeros((1, 8), np.int64))

    def decode_start(self):
        return self.decode()

    def decode_finish(self, handle) -> StepOutput:
        return handle

    def release(self, slot: int) -> None:
        self.active[slot] = False

    def shutdown(self) -> None:
        pass


class SleepGroupFactory:
    """`Router(group_factory=...)`: picklable, so that the router actor builds its engine on its side."""

    def __init__(self, max_slots: int, step_s: float):
        self.max_slots, self.step_s = max_slots, step_s

    def __call__(self, spec):
        from workers.group import LocalShardGroup

        return LocalShardGroup(SleepEngine(self.max_slots, self.step_s))


def fake_config(max_slots: int = 32):
    from grok1.config import Grok1Config, ModelConfig

    model = ModelConfig(vocab_size=128, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=1,
                        eos_token=2)
    return Grok1Config(name="sleep", model=model).replace(
        engine={"max_slots": max_slots, "max_len": 512, "prefill_buckets": [16], "moe_block_size": 8})


def requests(streams: int, tokens: int, prompt_len: int = 16):
    from grok1.engine_api import Request

    return [Request(f"overhead-{next(_ids)}", [3 + k] * prompt_len, tokens, ignore_eos=True) for k in range(streams)]


def driver_seconds(max_slots: int, step_s: float, streams: int, tokens: int) -> float:
    """Wall seconds of the load on the Driver in this process."""
    from cluster.driver import Driver
    from cluster.scheduler import Scheduler

    config = fake_config(max_slots)
    scheduler = Scheduler(max_slots, config.engine.max_len, config.model.vocab_size, config.model.eos_token)
    started = time.perf_counter()
    Driver(SleepEngine(max_slots, step_s), scheduler, pipelined=True).generate(requests(streams, tokens))
    return time.perf_counter() - started


async def stream_tokens(router, request) -> int:
    """Tokens of one request streamed from a router actor; batches (lists) or single TokenEvents."""
    count = 0
    async for ref in router.generate.options(num_returns="streaming").remote(request):
        item = await ref
        for event in item if isinstance(item, list) else [item]:
            if event.error:
                raise RuntimeError(f"{request.request_id}: {event.error}")
            count += event.token is not None
    return count


def _router_cpu_s(router) -> float:
    import ray

    return ray.get(router.__ray_call__.remote(lambda self: time.process_time()))


def router_seconds(router, streams: int, tokens: int) -> tuple[float, float, float, int]:
    """Wall seconds of the load through the router actor; its process's CPU seconds, this process's, and the
    streaming items the router yielded (0 where the router does not count them)."""
    import ray

    batch = requests(streams, tokens)

    async def run():
        return await asyncio.gather(*[stream_tokens(router, r) for r in batch])

    items = ray.get(router.stats.remote()).get("stream_items_total", 0)
    router_cpu, own_cpu, started = _router_cpu_s(router), time.process_time(), time.perf_counter()
    counts = asyncio.run(run())
    elapsed, own_cpu = time.perf_counter() - started, time.process_time() - own_cpu
    router_cpu = _router_cpu_s(router) - router_cpu
    assert counts == [tokens] * streams, counts
    return elapsed, router_cpu, own_cpu, ray.get(router.stats.remote()).get("stream_items_total", 0) - items


def start_sleep_router(max_slots: int, step_s: float):
    import ray

    from cluster.replica_config import ReplicaConfig
    from cluster.router import Router

    settings = ReplicaConfig(ep=1, backend="local")
    spec = settings.group_spec(fake_config(max_slots), "unused")
    actor = ray.remote(Router).options(num_cpus=0, max_concurrency=1000)
    router = actor.remote(spec, settings, group_factory=SleepGroupFactory(max_slots, step_s))
    assert ray.get(router.wait_ready.remote(60))
    return router


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-ms", type=float, default=20.0, help="the engine's sleep per call")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)  # never a running one
    step_s = args.step_ms / 1000
    samples: dict[tuple[str, int], list[float]] = {}
    try:
        router = start_sleep_router(32, step_s)
        router_seconds(router, 32, 4)  # warm the streaming path
        for _ in range(args.rounds):
            for n in args.streams:
                samples.setdefault(("driver", n), []).append(driver_seconds(32, step_s, n, args.tokens))
                wall, router_cpu, own_cpu, items = router_seconds(router, n, args.tokens)
                for what, value in (("router", wall), ("router cpu", router_cpu), ("caller cpu", own_cpu),
                                    ("items", items)):
                    samples.setdefault((what, n), []).append(value)
    finally:
        ray.shutdown()
    steps = args.tokens  # one prefill (one call: all streams are admitted at once) + tokens - 1 decode steps
    print(f"\nsleep engine, {args.step_ms:g} ms per call, {args.tokens} tokens per stream, medians of {args.rounds}\n")
    print("| streams | driver ms/step | router ms/step | driver overhead ms | router overhead ms | router / driver "
          "| router CPU ms/step | caller CPU ms/step | items/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.streams:
        driver, router, router_cpu, own_cpu = (statistics.median(samples[what, n]) / steps * 1000
                                               for what in ("driver", "router", "router cpu", "caller cpu"))
        items = statistics.median(samples["items", n]) / steps
        print(f"| {n} | {driver:.2f} | {router:.2f} | {driver - args.step_ms:.2f} | {router - args.step_ms:.2f} | "
              f"{driver / router:.0%} | {router_cpu:.2f} | {own_cpu:.2f} | {items:.1f} |")


if __name__ == "__main__":
    main()
