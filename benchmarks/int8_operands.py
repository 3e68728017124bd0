"""Decode step with the int8 experts' products in float32 operands (model.int8_product_dtype on XLA:CPU) against
bfloat16 operands, side by side in one run, two engines on the same random weights (not a test).

    PYTHONPATH=. python -m benchmarks.int8_operands [--config configs/grok-1-cpu.yaml] [--active 1 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

from grok1 import model
from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.random_weights import random_params


def step_ms(engine: Engine, steps: int = 5) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        engine.decode_finish(engine.decode_start())
    return (time.perf_counter() - start) / steps * 1e3


def compare(config, params, active: int, rounds: int) -> dict[str, float]:
    chosen = model.int8_product_dtype
    engines = {}
    try:
        for name, dtype_of in (("float32", chosen), ("bfloat16", lambda activations: activations)):
            model.int8_product_dtype = dtype_of  # read when the step is traced, at its first call below
            engine = Engine(config, params)
            engine.prefill_many(list(range(active)), [[5 + i] * 20 for i in range(active)], [Sampling()] * active)
            step_ms(engine, 2)
            engines[name] = engine
    finally:
        model.int8_product_dtype = chosen
    times = {name: [] for name in engines}
    for _ in range(rounds):  # alternate, so both see the same machine
        for name, engine in engines.items():
            times[name].append(step_ms(engine))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-cpu.yaml")
    parser.add_argument("--active", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    config = load_config(args.config)
    params = random_params(config.model, 0)
    print("| config | active | float32 operands ms | bfloat16 operands ms | bfloat16 / float32 |")
    print("|---|---|---|---|---|")
    for active in args.active:
        ms = compare(config, params, active, args.rounds)
        print(f"| {config.name} | {active} | {ms['float32']:.1f} | {ms['bfloat16']:.1f} | "
              f"{ms['bfloat16'] / ms['float32']:.2f}x |")


if __name__ == "__main__":
    main()
