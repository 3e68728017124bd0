"""Run by bench_multiprocess.py (through workers.local_processes.run_local_group): decode step time on one mesh layout.

Every process of the group loads its slices onto an `ep x tp` mesh (workers.shard.Shard), fills every decode
slot with the same prompts (same seed everywhere: multi-controller JAX needs identical calls), runs two
untimed decode steps (compile, first-step effects), then times `repeats` runs of `steps` decode steps with all
slots active. Each step reads its tokens back to the host, as the driver does. Process 0 prints one line
`RESULT {json}` with the seconds of each run. With `--plain` (one process, one device) it also times the
single-process engine without a mesh (grok1.engine.Engine as bench_engine runs it) on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sharding.distributed import ProcessGroup
from sharding.mesh import MeshShape
from workers.local_processes import group_args

UNTIMED_STEPS = 2


def time_decode(engine, prompt_len: int, steps: int, repeats: int, seed: int = 0) -> list[float]:
    """Seconds of each of `repeats` runs of `steps` decode steps with every slot active."""
    import jax
    import numpy as np

    from grok1.engine import Sampling

    needed = prompt_len + UNTIMED_STEPS + steps * repeats
    if needed > engine.max_len:
        raise SystemExit(f"prompt {prompt_len} + {UNTIMED_STEPS + steps * repeats} steps exceeds max_len "
                         f"{engine.max_len}: use fewer --steps or --repeats")
    engine.warmup()  # every kv_len bucket compiled now: the timed runs cross buckets as the sequences grow
    rng = np.random.default_rng(seed)
    for slot in range(engine.max_slots):
        engine.prefill(slot, [int(t) for t in rng.integers(3, 1000, prompt_len)], Sampling())
    for _ in range(UNTIMED_STEPS):
        engine.decode()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            out = engine.decode()
        jax.block_until_ready(engine.state.lengths)
        seconds.append(time.perf_counter() - started)
        assert (out.tokens >= 0).sum() == engine.max_slots, "a slot stopped decoding"
    for slot in range(engine.max_slots):
        engine.release(slot)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="also time the engine without a mesh")
    group_args(parser)
    args = parser.parse_args()

    from grok1.config import load_config
    from workers.shard import Shard

    config = load_config(args.config).replace(engine={"max_slots": args.slots})
    group = ProcessGroup(args.coordinator, args.num_processes, args.process_id,
                         local_device_count=args.local_devices, timeout_s=120)
    shard = Shard(config, args.checkpoint, MeshShape(args.ep, args.tp), group)
    result = {"process_id": args.process_id, "seconds": time_decode(shard.engine, args.prompt_len, args.steps,
                                                                     args.repeats)}
    if args.plain:
        from grok1.engine import Engine
        from grok1.loading import load_params

        shard.shutdown()
        engine = Engine(config, load_params(config, Path(args.checkpoint)))
        result["plain_seconds"] = time_decode(engine, args.prompt_len, args.steps, args.repeats)
    if args.process_id == 0:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
