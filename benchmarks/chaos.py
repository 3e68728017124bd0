"""Chaos: streams under load while a shard worker is killed every few seconds; the pause each kill causes.

    python -m benchmarks.chaos [--streams 32] [--every 20] [--duration 120] [--tokens 48] [--max-slots N] [--max-len N]

A local Ray instance, a router with a 2-shard expert-parallel group (cluster.router.start_router), and
`streams` callers, each sending one request after another (greedy and seeded alternately, ignore_eos) for
`duration` seconds. Every `every` seconds one shard worker is SIGKILLed; the router rebuilds the group and
the running requests resume (cluster/router.py, step 6). Reported: for each kill, the pause it caused (the
longest gap between two tokens of any request across the kill's moment), then their median and max; and
whether every request got exactly its uninterrupted tokens (each request's tokens are computed first, on the
same router, without faults), and the router's restarts against the kills (more restarts than kills: the group
also failed on its own). Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def request_for(stream: int, round_: int, tokens: int, vocab: int):
    from grok1.engine_api import Request, Sampling

    sampling = Sampling() if stream % 2 == 0 else Sampling(temperature=1.0, seed=1000 * stream + round_ % 2)
    prompt = [(31 * stream + 7 * j + round_ % 2) % (vocab - 3) + 3 for j in range(4 + stream % 5)]
    return Request(f"c{stream}-{round_}", prompt, tokens, sampling, ignore_eos=True)


async def stream_tokens(router, request) -> tuple[list[int], list[float], str]:
    refs = router.generate.options(num_returns="streaming").remote(request, None)
    tokens, times, reason = [], [], None
    async for ref in refs:
        for event in await ref:
            if event.token is not None:
                tokens.append(event.token)
                times.append(time.monotonic())
            reason = event.finish_reason or reason
    return tokens, times, str(reason)


async def load(router, args, vocab: int, reference: dict, kills: list[float]) -> dict:
    arrivals: list[list[float]] = []  # per request: its tokens' arrival times
    result = {"requests": 0, "exact": 0, "not_exact": []}
    end = time.monotonic() + args.duration

    async def caller(k: int) -> None:
        round_ = 0
        while time.monotonic() < end:
            request = request_for(k, round_, args.tokens, vocab)
            tokens, times, reason = await stream_tokens(router, request)
            arrivals.append(times)
            result["requests"] += 1
            key = (k % 2, k, round_ % 2)
            if reason == "length" and tokens == reference[key]:
                result["exact"] += 1
            else:
                result["not_exact"].append((request.request_id, reason))
            round_ += 1

    async def killer() -> None:
        while time.monotonic() + args.every < end:
            await asyncio.sleep(args.every)
            workers = (await router.stats.remote())["workers"]
            if workers:
                kills.append(time.monotonic())
                os.kill(workers[-1]["pid"], signal.SIGKILL)

    await asyncio.gather(killer(), *(caller(k) for k in range(args.streams)))
    result["arrivals"] = arrivals
    return result


def pause_of(kill: float, arrivals: list[list[float]]) -> float:
    """The longest gap between consecutive tokens of one request that spans the kill (not counting the wait
    between a stream's requests, which with fewer slots than streams includes queueing)."""
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if a <= kill < b]
    return max(gaps, default=0.0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--checkpoint", help="default: the config's, a random one written on first use")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--every", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--max-slots", type=int, help="decode slots (default: one per stream, at least the "
                                                      "config's); fewer than streams: the rest queue")
    parser.add_argument("--max-len", type=int, help="the KV cache's positions per slot (default: the config's)")
    args = parser.parse_args(argv)

    import ray

    from cluster.router import start_router
    from grok1.config import load_config
    from grok1.loading import ensure_random_checkpoint

    config = load_config(args.config)
    engine = {"max_slots": args.max_slots or max(args.streams, config.engine.max_slots)}
    config = config.replace(engine=engine | ({"max_len": args.max_len} if args.max_len else {}))
    checkpoint = Path(args.checkpoint or config.checkpoint.path)
    if not args.checkpoint:
        ensure_random_checkpoint(config, checkpoint)
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    router = start_router(config, checkpoint=str(checkpoint), ep=2, placement_strategy="PACK", backend="ray",
                          name="chaos", start_timeout_s=600, step_timeout_s=120)
    assert ray.get(router.wait_ready.remote(600))
    vocab = config.model.vocab_size

    async def uninterrupted() -> dict:
        keys = [(k % 2, k, r) for k in range(args.streams) for r in range(2)]
        outs = await asyncio.gather(*(stream_tokens(router, request_for(k, r, args.tokens, vocab))
                                      for _, k, r in keys))
        return {key: tokens for key, (tokens, _, _) in zip(keys, outs)}

    reference = asyncio.run(uninterrupted())
    kills: list[float] = []
    result = asyncio.run(load(router, args, vocab, reference, kills))
    pauses = [pause_of(kill, result["arrivals"]) for kill in kills]
    restarts = ray.get(router.stats.remote(), timeout=60)["restarts"]
    print("| streams | slots | kills | restarts | requests | exact | pause median (s) | pause max (s) |")
    print("|---|---|---|---|---|---|---|---|")
    median = statistics.median(pauses) if pauses else float("nan")
    print(f"| {args.streams} | {config.engine.max_slots} | {len(kills)} | {restarts} | {result['requests']} | "
          f"{result['exact']} | {median:.1f} | {max(pauses, default=float('nan')):.1f} |")
    print("pauses per kill (s):", " ".join(f"{p:.1f}" for p in pauses))
    if result["not_exact"]:
        print("not exact:", result["not_exact"][:10])
    ray.get(router.shutdown.remote(), timeout=120)
    ray.shutdown()


if __name__ == "__main__":
    main()
