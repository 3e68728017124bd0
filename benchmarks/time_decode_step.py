"""Time one decode step of the tiny config with every slot decoding, and its pieces against the way they were
computed before, side by side in one run (not a test).

    PYTHONPATH=. python benchmarks/time_decode_step.py [--penalised] [--config configs/grok-1-cpu.yaml]

Median wall time of a decode step over several rounds, all slots greedy; `--penalised` gives one slot a
frequency penalty and a logit bias, so the sampler's penalty branch runs (the plain figure must not move).
Then, on the config's shapes, two references kept here: `jnp.argmax` against the sampler's `first_argmax` over
[slots, V], and one expert's matmuls with the int8 weight dequantised first (the reference's way, as the model
did) against `model.weight_matmul` (the scale applied to the int8 product).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import model
from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.params import QuantizedWeight, dequantize
from grok1.random_weights import random_params
from grok1.sampling import first_argmax


def best_ms(fn, *args, repeats: int = 7) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - started)
    return 1e3 * min(times)


def dequantised_first(x, w):
    """The previous expert matmul: a bfloat16 copy of int8 x scales, then the product (reference kept here)."""
    return jnp.einsum("mk,kn->mn", x, dequantize(w, jnp.bfloat16), preferred_element_type=jnp.float32)


def compare_pieces(config, params, slots: int, block: int) -> None:
    logits = jax.random.normal(jax.random.PRNGKey(0), (slots, config.model.vocab_size), jnp.float32)
    old, new = best_ms(jax.jit(lambda x: jnp.argmax(x, -1)), logits), best_ms(jax.jit(first_argmax), logits)
    print(f"argmax over [{slots}, {config.model.vocab_size}]: jnp.argmax {old:.2f} ms, first_argmax {new:.2f} ms "
          f"({old / new:.1f}x)")
    layer = jax.tree.map(lambda leaf: leaf[0, 0], {k: params["layers"][k] for k in ("ffn_gelu_in", "ffn_out")})
    for name, w in layer.items():
        if not isinstance(w, QuantizedWeight):
            continue
        x = jnp.ones((block, w.shape[0]), jnp.bfloat16)
        old, new = best_ms(jax.jit(dequantised_first), x, w), best_ms(jax.jit(model.weight_matmul), x, w)
        print(f"one expert's {name} {tuple(w.shape)} x {block} rows: dequantised first {old:.3f} ms, scale after "
              f"the int8 product {new:.3f} ms ({old / new:.2f}x)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--penalised", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    params = jax.tree.map(jnp.asarray, random_params(config.model))
    engine = Engine(config, params)
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
    compare_pieces(config, params, engine.max_slots, config.engine.moe_block_size)


if __name__ == "__main__":
    main()
