"""This tree's decode step against the same step with another checkout's sampler, interleaved in one process (not
a test).

    python -m benchmarks.ab_sampler --against ../old-checkout [--config configs/grok-1-tiny.yaml] [--active 1 8 32]
                                    [--no-logprobs]

Why in one process, interleaved: on the shared 2-core machines these benchmarks run on, the same step measured
minutes apart moves by 20-30% (two `bench_engine` runs of one tree differ that much), more than the changes
being measured. Here two engines share the weights, the compiled programs and the machine's state, and their
rounds alternate (old, new, new, old, ...), so drift hits both alike.

"before" is the engine with `--against`'s `grok1/sampling.py` (loaded as a module of its own) and the
bfloat16 logits that sampler was written for; "after" is this tree's sampler and float32 logits. Everything
else (the layers, the unembedding product) is this tree's in both. `--no-logprobs` runs "after" with requests
that ask for no logprobs (grok1.engine_api.Sampling.logprobs), as the HTTP and gRPC paths send them when the
client asks for none.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

import grok1.steps as steps
from grok1 import model
from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.loading import ensure_random_checkpoint, load_params

SLOTS, PROMPT_LEN = 32, 16


def load_sampler(checkout: Path):
    spec = importlib.util.spec_from_file_location("sampling_under_test", checkout / "grok1" / "sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sample_scored


def engine_with(config, params, sample_scored=None) -> Engine:
    """An engine compiled (warmup) with `sample_scored` and bfloat16 logits in its decode step, or this tree's
    sampler and logits (None). The steps read both names when they are traced, which warmup does for every
    bucket, so the substitution lasts only while this builds the engine."""
    own_sampler, own_unembed = steps.sample_scored, model.unembed
    if sample_scored is not None:
        steps.sample_scored = sample_scored
        model.unembed = lambda params, h, config, dtype=None: own_unembed(params, h, config)
    try:
        engine = Engine(config, params)
        engine.warmup()
    finally:
        steps.sample_scored, model.unembed = own_sampler, own_unembed
    return engine


def step_seconds(engine: Engine, active: int, sampling: Sampling, steps_timed: int, rng) -> float:
    for slot in range(engine.max_slots):
        engine.release(slot)
    prompts = [[int(t) for t in rng.integers(3, 1000, PROMPT_LEN)] for _ in range(active)]
    engine.prefill_many(list(range(active)), prompts, [sampling] * active)
    engine.decode_finish(engine.decode_start())  # the first step after refilling is not timed
    started = time.perf_counter()
    for _ in range(steps_timed):
        handle = engine.decode_start()
    engine.decode_finish(handle)
    return (time.perf_counter() - started) / steps_timed


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--against", type=Path, required=True, help="another checkout of this repository")
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--active", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-logprobs", action="store_true")
    args = parser.parse_args(argv)
    config = load_config(args.config).replace(engine={"max_slots": SLOTS})
    params = load_params(config, ensure_random_checkpoint(config, Path(config.checkpoint.path)))
    engines = {"before": engine_with(config, params, load_sampler(args.against)),
               "after": engine_with(config, params)}
    samplings = {"before": Sampling(), "after": Sampling(logprobs=not args.no_logprobs)}
    rng = np.random.default_rng(0)
    print("| config | active | before ms (median / min) | after ms (median / min) | before / after |\n"
          "|---|---|---|---|---|")
    for active in args.active:
        times = {name: [] for name in engines}
        for round_ in range(args.rounds):
            for name in (("before", "after") if round_ % 2 == 0 else ("after", "before")):
                times[name].append(step_seconds(engines[name], active, samplings[name], args.steps, rng))
        before, after = (1e3 * statistics.median(times[name]) for name in ("before", "after"))
        print(f"| {config.name} | {active} | {before:.1f} / {1e3 * min(times['before']):.1f} | {after:.1f} / "
              f"{1e3 * min(times['after']):.1f} | {before / after:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
