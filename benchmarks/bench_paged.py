"""`make bench`: the paged KV cache's goals (issue 13), each a ratio measured side by side in one run.

1. concurrency at equal KV memory: requests with prompts of 16-512 and outputs of 16-256 tokens, a contiguous
   engine of max_len-position slots vs a paged pool of the same tokens; the scheduler's decisions only (the
   model does not change who is admitted), mean sequences running while requests wait.
2. decode step time, 32 sequences of ~100 tokens, max_len 8192 vs 512 (paged engine, grok-1-cpu shape).
3. inter-token latency p99 of 31 decoding streams while a long prompt arrives: chunked prefill (token budget:
   the 31 decode tokens and a chunk of --chunk prompt tokens per step) vs whole-prompt prefill, each against
   the same streams' p99 without the long prompt. max_len is the long prompt + 64 (4,160 for 4,096: longer
   than grok-1-cpu's 512, so this case runs with max_len and sequence_len raised to it).
4. time to first token of a request sharing a 1,024-token prefix with an earlier one vs cold (median of
   --rounds).
Random weights of grok-1-cpu (sequence_len raised so the long contexts exist; compiles untimed).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from cluster.driver import Driver
from cluster.kv_blocks import BlockPool
from cluster.scheduler import Request, Scheduler
from grok1.config import load_config
from grok1.engine_api import StepOutput
from grok1.paged_engine import PagedEngine
from grok1.random_weights import random_params

CONFIG = "configs/grok-1-cpu.yaml"
BLOCK = 16


class CountingEngine:
    """Carries out plans without a model (fixed tokens): for the admission-only measurement."""

    def __init__(self, slots: int):
        self.active = np.zeros(slots, bool)

    def paged_step(self, plan):
        finals = [c.slot for c in plan.chunks if c.final]
        self.active[finals] = True
        zeros = np.zeros((1, 1), int)
        decoded = StepOutput(np.full(len(self.active), 5, np.int32), np.zeros(len(self.active), np.float32), zeros)
        return (decoded if plan.decode else None,
                StepOutput(np.full(len(finals), 5, np.int32), np.zeros(len(finals), np.float32), zeros) if finals
                else None)

    def release(self, slot):
        self.active[slot] = False


def workload(count: int, rng) -> list[Request]:
    return [Request(f"w{k}", [int(t) for t in rng.integers(3, 1000, int(rng.integers(16, 513)))],
                    max_tokens=int(rng.integers(16, 257)), ignore_eos=True) for k in range(count)]


def concurrency_at_equal_memory(max_len: int, contiguous_slots: int, requests: int, rng) -> tuple[int, float]:
    tokens = contiguous_slots * max_len
    slots = 512
    scheduler = Scheduler(slots, max_len, 131072, 2, kv=BlockPool(tokens // BLOCK, BLOCK), token_budget=2048)
    driver = Driver(CountingEngine(slots), scheduler)
    for request in workload(requests, rng):
        driver.submit(request)
    running = []
    while scheduler.queue:
        driver.step()
        running.append(len(scheduler.running_slots()))
    driver.run_until_idle()
    return contiguous_slots, statistics.mean(running)


def paged_engine(config, params, *, max_len: int, slots: int, blocks: int, budget: int = 0) -> PagedEngine:
    config = config.replace(model={"sequence_len": max(max_len, config.model.sequence_len)},
                            engine={"max_len": max_len, "max_slots": slots, "kv_blocks": blocks,
                                    "kv_block_size": BLOCK, "token_budget": budget})
    return PagedEngine(config, params)


def driver_for(engine: PagedEngine, budget: int | None = None, prefix_caching: bool = True):
    c = engine.config
    pool = BlockPool(c.engine.kv_blocks, BLOCK, prefix_caching=prefix_caching)
    scheduler = Scheduler(c.engine.max_slots, c.engine.max_len, c.model.vocab_size, c.model.eos_token, kv=pool,
                          token_budget=budget)
    return Driver(engine, scheduler), scheduler


def prompt(n: int, rng) -> list[int]:
    return [int(t) for t in rng.integers(3, 1000, n)]


def decode_step_ms(config, params, max_len: int, steps: int, rng) -> float:
    engine = paged_engine(config, params, max_len=max_len, slots=32, blocks=32 * 8 + 8)
    driver, scheduler = driver_for(engine)
    for k in range(32):
        driver.submit(Request(f"d{k}", prompt(100, rng), max_tokens=steps + 4, ignore_eos=True))
    driver.step()  # the prefill
    driver.step()
    driver.step()  # compiled; not timed
    started = time.perf_counter()
    for _ in range(steps):
        driver.step()
    jax.block_until_ready(engine.state.lengths)
    return 1e3 * (time.perf_counter() - started) / steps


def itl_p99_ms(config, params, long_len: int, budget: int | None, steps: int, rng) -> tuple[float, ...]:
    """(p99 gap between tokens of 31 streams without the long prompt, with it arriving, then the same two
    medians) in ms: `steps` gaps without it, then every gap from its arrival until it is done (at least
    `steps`). With ~30-100 gaps the p99 is the worst one: the median says whether one stall decided it."""
    max_len = long_len + 64
    engine = paged_engine(config, params, max_len=max_len, slots=32, blocks=(long_len + 64) // BLOCK + 31 * 8 + 8)
    gaps: dict[bool, list[float]] = {False: [], True: []}
    for timed in (False, True):  # the first pass compiles every shape the second one meets
        driver, scheduler = driver_for(engine, budget, prefix_caching=False)
        for k in range(31):
            driver.submit(Request(f"s{k}", prompt(32, rng), max_tokens=3 * steps + 200, ignore_eos=True))
        for _ in range(100):  # until every stream decodes: a budget admits a few prompts per step
            if all(driver.completions[f"s{k}"].tokens for k in range(31)):
                break
            driver.step()
        long = Request("long", prompt(long_len, rng), max_tokens=2, ignore_eos=True)
        for with_long in (False, True):
            if with_long:
                driver.submit(long)
            last = time.perf_counter()
            for _ in range(steps):
                driver.step()
                now = time.perf_counter()
                if timed:
                    gaps[with_long].append(now - last)
                last = now
            if with_long:
                while any(r.request_id == "long" for r in scheduler.queue) or any(
                        scheduler.request_in(s).request_id == "long" for s in scheduler.running_slots()):
                    driver.step()
                    now = time.perf_counter()
                    if timed:
                        gaps[True].append(now - last)
                    last = now
        for slot in scheduler.running_slots():
            driver.cancel(scheduler.request_in(slot).request_id)
    return tuple(1e3 * float(np.percentile(gaps[k], q)) for q in (99, 50) for k in (False, True))


def ttft_ms(config, params, prefix_len: int, rounds: int, rng) -> tuple[float, float]:
    """(cold, prefix hit) median time to first token of prefix_len shared + 16 own tokens, in ms; cold and hit
    alternate, so both see the same machine."""
    engine = paged_engine(config, params, max_len=prefix_len + 64, slots=4, blocks=4 * (prefix_len + 64) // BLOCK)
    shared = prompt(prefix_len, rng)
    times: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(rounds + 1):  # the first round compiles
        for caching in (False, True):
            driver, _ = driver_for(engine, prefix_caching=caching)
            driver.generate([Request("first", shared + prompt(16, rng), max_tokens=1)])
            started = time.perf_counter()
            driver.generate([Request("second", shared + prompt(16, rng), max_tokens=1)])
            if round_:
                times[caching].append(1e3 * (time.perf_counter() - started))
    return statistics.median(times[False]), statistics.median(times[True])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--long-prompt", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=64, help="prompt tokens per step beside the 31 decode tokens")
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", choices=["concurrency", "decode", "itl", "prefix"])
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    config = load_config(CONFIG)
    rows = []
    if args.only in (None, "concurrency"):
        for max_len in (1024, 2048, 4096, 8192):
            slots, paged = concurrency_at_equal_memory(max_len, 8, 300, rng)
            rows.append((f"sequences running at {8 * max_len:,} KV tokens (contiguous: {slots} x {max_len})",
                         f"{slots}", f"{paged:.1f}", f"{paged / slots:.1f}x", ">= 4x"))
    params = jax.device_put(random_params(config.model))  # once: not a copy per step
    if args.only in (None, "decode"):
        short, long = (decode_step_ms(config, params, n, args.steps, rng) for n in (512, 8192))
        rows.append(("decode step ms, 32 x ~100 tokens: max_len 512 vs 8192", f"{short:.1f}", f"{long:.1f}",
                     f"{long / short:.2f}x", "<= 1.3x"))
    if args.only in (None, "itl"):
        for budget in (None, 31 + args.chunk):  # a power-of-two chunk: no padding
            base, hit, base_median, hit_median = itl_p99_ms(config, params, args.long_prompt, budget, args.steps, rng)
            label = f"budget {budget} tokens/step" if budget else "whole prompt"
            rows.append((f"ITL p99 ms of 31 streams, {args.long_prompt}-token prompt arrives ({label}, "
                         f"max_len {args.long_prompt + 64})",
                         f"{base:.1f}", f"{hit:.1f}", f"{hit / base:.2f}x", "<= 2x" if budget else "(today)"))
            rows.append((f"ITL median ms, the same ({label})", f"{base_median:.1f}", f"{hit_median:.1f}",
                         f"{hit_median / base_median:.2f}x", ""))
    if args.only in (None, "prefix"):
        cold, hit = ttft_ms(config, params, args.prefix, args.rounds, rng)
        rows.append((f"TTFT ms, {args.prefix}-token shared prefix: cold vs hit", f"{cold:.1f}", f"{hit:.1f}",
                     f"{cold / hit:.1f}x sooner", ">= 5x"))
    print(f"\npaged KV cache on {platform.machine()} CPU ({jax.device_count()} JAX device), {config.name}, "
          f"blocks of {BLOCK}\n")
    print("| measure | baseline | paged | ratio | goal |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
