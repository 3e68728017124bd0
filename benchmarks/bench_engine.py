"""`make bench`: single-process engine throughput, measured side by side in one run (not a test).

For the tiny config and a larger CPU config (random weights in the released format, written on first use):
decode tokens/s with 1, 8 and 32 sequences decoding together in a 32-slot engine, and prefill tokens/s.
Prints a Markdown table; docs/benchmarks.md records one with the command that made it.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np

from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.loading import ensure_random_checkpoint, load_params

CONFIGS = ["configs/grok-1-tiny.yaml", "configs/grok-1-cpu.yaml"]
CONCURRENCY = [1, 8, 32]


def _fill(engine: Engine, count: int, prompt_len: int, rng) -> None:
    for slot in range(engine.max_slots):
        engine.release(slot)
    for slot in range(count):
        engine.prefill(slot, list(rng.integers(3, 1000, prompt_len)), Sampling())


def decode_tokens_per_s(engine: Engine, count: int, steps: int, rng) -> float:
    _fill(engine, count, 16, rng)
    engine.decode()  # the first step after refilling is not timed
    started = time.perf_counter()
    for _ in range(steps):
        out = engine.decode()
    jax.block_until_ready(engine.state.lengths)
    assert (out.tokens >= 0).sum() == count
    return count * steps / (time.perf_counter() - started)


def prefill_tokens_per_s(engine: Engine, prompt_len: int, repeats: int, rng) -> float:
    prompt = list(rng.integers(3, 1000, prompt_len))
    engine.prefill(0, prompt, Sampling())
    started = time.perf_counter()
    for _ in range(repeats):
        engine.prefill(0, prompt, Sampling())
    jax.block_until_ready(engine.state.lengths)
    return prompt_len * repeats / (time.perf_counter() - started)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefill-len", type=int, default=128)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for path in CONFIGS:
        config = load_config(path).replace(engine={"max_slots": 32})
        params = load_params(config, ensure_random_checkpoint(config, Path(config.checkpoint.path)))
        engine = Engine(config, params)
        engine.warmup()
        decode = {n: decode_tokens_per_s(engine, n, args.steps, rng) for n in CONCURRENCY}
        prefill = prefill_tokens_per_s(engine, args.prefill_len, 5, rng)
        rows.append((config, decode, prefill))
    print(f"\nengine throughput on {platform.machine()} CPU ({jax.device_count()} JAX device), 32 decode slots\n")
    print("| config | params | " + " | ".join(f"decode tok/s @{n}" for n in CONCURRENCY)
          + f" | x32 vs x1 | prefill tok/s ({args.prefill_len}) |")
    print("|---" * (len(CONCURRENCY) + 4) + "|")
    for config, decode, prefill in rows:
        print(f"| {config.name} | {config.model.param_count() / 1e6:.0f}M | "
              + " | ".join(f"{decode[n]:.1f}" for n in CONCURRENCY)
              + f" | {decode[32] / decode[1]:.1f}x | {prefill:.0f} |")


if __name__ == "__main__":
    main()
