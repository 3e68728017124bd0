"""`make bench`: single-process engine throughput and its roofline, measured side by side in one run (not a test).

For the tiny config and a larger CPU config (random weights in the released format, written on first use), in
a 32-slot engine: decode step time and tokens/s with 1, 8 and 32 active sequences, prefill tokens/s, and for 1
and 32 active the bytes and FLOPs the step must read and compute (benchmarks/roofline.py) against this
machine's read bandwidth and matmul throughput, measured in the same run. Two references, same run:
- "full width": the same engine's step over every slot and all max_len positions (what the step did before it
  followed the live rows and lengths), through Engine.decode_buckets;
- "1-slot engine": an engine of max_slots 1 with its one sequence (the goal: 1 of 32 active costs <= 1.25x).

    python -m benchmarks.bench_engine            # Markdown tables (docs/benchmarks.md records them)
    python -m benchmarks.bench_engine --json     # one JSON object with every figure
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.roofline import decode_step_cost, measure_machine
from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.loading import ensure_random_checkpoint, load_params

CONFIGS = ["configs/grok-1-tiny.yaml", "configs/grok-1-cpu.yaml"]
CONCURRENCY = [1, 8, 32]
ROOFLINE_AT = [1, 32]
SLOTS = 32
PROMPT_LEN = 16


def cpu_model() -> str:
    """The processor's model name: the sessions' machines differ (the same tree measured 87 and 2020 GFLOP/s of
    matmul on two of them), so a figure is only comparable with figures of the same processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fill(engine: Engine, count: int, rng) -> None:
    for slot in range(engine.max_slots):
        engine.release(slot)
    prompts = [[int(t) for t in rng.integers(3, 1000, PROMPT_LEN)] for _ in range(count)]
    engine.prefill_many(list(range(count)), prompts, [Sampling()] * count)


def step_seconds(engine: Engine, count: int, steps: int, rounds: int, rng, full_width: bool = False):
    """Median seconds per decode step with `count` active slots, and the expert counts [L, E] of a step."""
    times, counts = [], None
    for _ in range(rounds):
        _fill(engine, count, rng)
        decode = engine.decode_start
        if full_width:
            decode = functools.partial(engine.decode_buckets, np.arange(engine.max_slots, dtype=np.int32),
                                       engine.max_len)
        engine.decode_finish(decode())  # the first step after refilling is not timed
        started = time.perf_counter()
        for _ in range(steps):
            handle = decode()
        out = engine.decode_finish(handle)
        times.append((time.perf_counter() - started) / steps)
        assert (out.tokens >= 0).sum() == count
        counts = out.expert_counts
    return statistics.median(times), counts


def prefill_tokens_per_s(engine: Engine, prompt_len: int, repeats: int, rng) -> float:
    prompt = [int(t) for t in rng.integers(3, 1000, prompt_len)]
    engine.release(0)
    engine.prefill(0, prompt, Sampling())
    started = time.perf_counter()
    for _ in range(repeats):
        engine.prefill(0, prompt, Sampling())
    jax.block_until_ready(engine.state.lengths)
    return prompt_len * repeats / (time.perf_counter() - started)


def measure_config(path: str, args, rng) -> dict:
    """The config's figures; each roofline entry keeps its StepCost under "cost" until `add_fractions`."""
    config = load_config(path).replace(engine={"max_slots": SLOTS})
    params = load_params(config, ensure_random_checkpoint(config, Path(config.checkpoint.path)))
    engine = Engine(config, params)
    engine.warmup()
    result = {"params_M": config.model.param_count() / 1e6, "max_len": engine.max_len, "decode": {}}
    for n in CONCURRENCY:
        seconds, expert_counts = step_seconds(engine, n, args.steps, args.rounds, rng)
        entry = {"step_ms": 1e3 * seconds, "tok_per_s": n / seconds}
        if n in ROOFLINE_AT:
            # The live lengths during the timed steps: prompt + first token + warm-up step, then ~steps/2.
            live = np.full(n, PROMPT_LEN + 2 + args.steps // 2)
            cost = decode_step_cost(params, config.model, live, (expert_counts > 0).sum(axis=1))
            full_s, _ = step_seconds(engine, n, args.steps, args.rounds, rng, full_width=True)
            entry.update(cost.as_dict(), cost=cost, full_width_step_ms=1e3 * full_s,
                         full_width_over_step=full_s / seconds)
        result["decode"][str(n)] = entry
    result["prefill_tok_per_s"] = prefill_tokens_per_s(engine, args.prefill_len, 5, rng)
    engine.shutdown()
    one = Engine(config.replace(engine={"max_slots": 1}), params)
    one.warmup()
    one_s, _ = step_seconds(one, 1, args.steps, args.rounds, rng)
    result["one_slot_engine_step_ms"] = 1e3 * one_s
    result["one_of_32_over_one_slot"] = result["decode"]["1"]["step_ms"] / result["one_slot_engine_step_ms"]
    return result


def add_fractions(report: dict, machine) -> None:
    """Each roofline entry's floors and fractions against `machine` (replacing its StepCost)."""
    for result in report["configs"].values():
        for entry in result["decode"].values():
            if "cost" in entry:
                entry.update(entry.pop("cost").fractions(entry["step_ms"] / 1e3, machine))


def print_tables(report: dict, prefill_len: int) -> None:
    machine = report["machine"]
    print(f"\nengine on {report['platform']} ({report.get('cpu', '?')}, {os.cpu_count()} cores; "
          f"{report['devices']} JAX device), {SLOTS} decode slots; machine "
          f"under XLA: read {machine['read_GB_per_s']:.1f} GB/s, matmul {machine['matmul_GFLOP_per_s']:.1f} "
          "GFLOP/s\n")
    print("| config | params | " + " | ".join(f"step ms @{n}" for n in CONCURRENCY) + " | "
          + " | ".join(f"decode tok/s @{n}" for n in CONCURRENCY)
          + f" | 1-slot engine step ms | @1 / 1-slot | prefill tok/s ({prefill_len}) |")
    print("|---" * (2 * len(CONCURRENCY) + 5) + "|")
    for name, r in report["configs"].items():
        d = r["decode"]
        print(f"| {name} | {r['params_M']:.0f}M | " + " | ".join(f"{d[str(n)]['step_ms']:.1f}" for n in CONCURRENCY)
              + " | " + " | ".join(f"{d[str(n)]['tok_per_s']:.1f}" for n in CONCURRENCY)
              + f" | {r['one_slot_engine_step_ms']:.1f} | {r['one_of_32_over_one_slot']:.2f}x"
              f" | {r['prefill_tok_per_s']:.0f} |")
    print("\n| config | active | MB read | MFLOP | byte floor ms | FLOP floor ms | step ms | byte floor fraction "
          "| FLOP floor fraction | full-width step ms | full width / step |")
    print("|---" * 11 + "|")
    for name, r in report["configs"].items():
        for n in ROOFLINE_AT:
            e = r["decode"][str(n)]
            print(f"| {name} | {n} | {e['bytes'] / 1e6:.1f} | {e['flops'] / 1e6:.1f} | {e['byte_floor_ms']:.2f} "
                  f"| {e['flop_floor_ms']:.2f} | {e['step_ms']:.1f} | {e['byte_fraction']:.1%} "
                  f"| {e['flop_fraction']:.1%} | {e['full_width_step_ms']:.1f} | {e['full_width_over_step']:.2f}x |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-len", type=int, default=128)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    # The machine is measured before each config and after the last, and the floors use the best of each figure:
    # this VM's bandwidth moves by ~2x within minutes, and the step a floor is compared with may have run in
    # either phase.
    machine = measure_machine()
    report = {"platform": f"{platform.machine()} {jax.default_backend()}", "cpu": cpu_model(),
              "devices": jax.device_count(), "configs": {}}
    for path in args.configs:
        report["configs"][load_config(path).name] = measure_config(path, args, rng)
        machine = machine.best(measure_machine())
    report["machine"] = machine.as_dict()
    add_fractions(report, machine)
    if args.json:
        print(json.dumps(report))
    else:
        print_tables(report, args.prefill_len)


if __name__ == "__main__":
    main()
