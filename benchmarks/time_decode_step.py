"""Time one decode step of the tiny config with every slot decoding (not a test).

    PYTHONPATH=. python benchmarks/time_decode_step.py [--penalised]

Median wall time of a decode step over several rounds, all 16 slots greedy; `--penalised` gives one slot a
frequency penalty and a logit bias, so the sampler's penalty branch runs (the plain figure must not move).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.random_weights import random_params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--penalised", action="store_true")
    args = parser.parse_args(argv)
    config = load_config("configs/grok-1-tiny.yaml")
    engine = Engine(config, random_params(config.model))
    rng = np.random.default_rng(0)
    rounds = []
    for _ in range(args.rounds):
        for slot in range(engine.max_slots):
            engine.release(slot)
            sampling = Sampling()
            if args.penalised and slot == 0:
                sampling = Sampling(frequency_penalty=0.5, logit_bias=((5, 3.0),))
            engine.prefill(slot, [int(t) for t in rng.integers(3, 1000, 16)], sampling)
        engine.decode()  # compiled on the first round; not timed
        started = time.perf_counter()
        for _ in range(args.steps):
            engine.decode_start()
        jax.block_until_ready(engine.state.lengths)
        rounds.append((time.perf_counter() - started) / args.steps)
    print(f"decode step, {engine.max_slots} slots, {'one penalised slot' if args.penalised else 'plain'}: "
          f"median {1e3 * statistics.median(rounds):.2f} ms, min {1e3 * min(rounds):.2f} ms "
          f"over {args.rounds} rounds of {args.steps} steps")


if __name__ == "__main__":
    main()
