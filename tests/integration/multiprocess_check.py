"""Run by test_multiprocess.py as N processes of one JAX group (workers.local_processes.run_local_group).

`golden`: every process loads the golden checkpoint onto the group's ep x tp mesh and runs (1) the
teacher-forced forward of all golden cases with forced routing and with free routing, and (2) greedy
generation of the golden prompts through the sharded engine and the real driver loop, making the same calls
in the same order as every other process. Process 0 prints one JSON line with the logits' relative L2 to the
golden logits, the free-routing expert choices, and the greedy tokens.

`paged`: the same greedy generation through the paged engine (engine.kv_blocks > 0; prefill chunked by a
token budget, and the last prompt once more, which hits the prefix cache), driven by the paged scheduler.

`warmup`: every process compiles and runs every step of a 32-slot, 256-position engine (`Engine.warmup`: a
16-prompt prefill among them), the shape whose collectives two processes once ran in different orders.

`load`: every process loads a checkpoint onto the mesh and prints the bytes it holds and how much its peak
resident memory grew while loading, for the per-process memory bound.
"""

from __future__ import annotations

import argparse
import json
import sys

from sharding.distributed import ProcessGroup
from sharding.mesh import MeshShape
from workers.local_processes import group_args

ENGINE = {"max_slots": 16, "max_len": 128, "prefill_buckets": [16, 32, 64], "moe_block_size": 8}
# Blocks of 8: the golden prompts (9-19 tokens) span several; a budget of 24 tokens chunks their prefill.
WARMUP = {"max_slots": 32, "max_len": 256, "prefill_buckets": [16, 32, 64, 128, 256], "moe_block_size": 8}
PAGED = {**ENGINE, "kv_blocks": 64, "kv_block_size": 8, "token_budget": 24}
GREEDY_TOKENS = 16


def golden(args, shard) -> dict:
    import jax
    import numpy as np

    from cluster.driver import Driver
    from cluster.scheduler import Request, Scheduler
    from grok1 import model

    engine = shard.engine
    config = engine.config.model
    cases = json.loads((args.golden_dir / "golden.json").read_text())
    golden_logits = np.load(args.golden_dir / "golden_logits.npz")
    lengths = [len(s) for s in cases["sequence_ids"]]
    width = max(lengths)
    tokens = np.asarray([s + [1] * (width - len(s)) for s in cases["sequence_ids"]], np.int32)
    forced = np.stack([np.pad(np.asarray(r, np.int32), ((0, 0), (0, width - n), (0, 0)))
                       for r, n in zip(cases["router_top2"], lengths)], axis=1)  # [L, B, T, 2]
    replicated = engine.layout.replicated
    forward = jax.jit(lambda p, t, o: model.full_forward(p, config, t, routing_override=o,
                                                         moe_fn=engine.layout.moe_fn),
                      out_shardings=replicated)
    forced_out = forward(engine.params, tokens, forced)
    free_out = jax.jit(lambda p, t: model.full_forward(p, config, t, moe_fn=engine.layout.moe_fn),
                       out_shardings=replicated)(engine.params, tokens)
    rel = []
    for index, n in enumerate(lengths):
        ours = np.asarray(forced_out.logits[index, :n], np.float32)
        ref = golden_logits[f"logits_{index}"].astype(np.float32)
        rel.append(float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)))
    experts = [np.asarray(free_out.expert_index[:, index, :n]).tolist() for index, n in enumerate(lengths)]

    scheduler = Scheduler(ENGINE["max_slots"], ENGINE["max_len"], config.vocab_size, config.eos_token)
    driver = Driver(engine, scheduler)
    prompts = [list(p) for p in cases["prompt_ids"]]
    # All prompts at once: they share decode steps, as in serving (batch invariance is tested elsewhere).
    done = driver.generate([Request(f"golden{k}", p, GREEDY_TOKENS, ignore_eos=True)
                            for k, p in enumerate(prompts)])
    greedy = [c.tokens for c in done]
    return {"rel_to_golden": rel, "experts": experts, "greedy": greedy,
            "expert_counts": driver.expert_counts.tolist()}


def paged(args, shard) -> dict:
    """Greedy tokens of the golden prompts, then of the last prompt again (a prefix hit), through the paged
    engine: all processes make the same calls, in the same order."""
    from cluster.driver import Driver
    from cluster.scheduler import Request, Scheduler

    scheduler = Scheduler.for_config(shard.engine.config, kv_ranks=shard.engine.kv_ranks)
    driver = Driver(shard.engine, scheduler)
    prompts = [list(p) for p in json.loads((args.golden_dir / "golden.json").read_text())["prompt_ids"]]
    done = driver.generate([Request(f"golden{k}", p, GREEDY_TOKENS, ignore_eos=True) for k, p in enumerate(prompts)])
    [again] = driver.generate([Request("again", prompts[-1], GREEDY_TOKENS, ignore_eos=True)])
    return {"greedy": [c.tokens for c in done], "again": again.tokens,
            "cached_tokens": scheduler.cached_tokens}


def rss_status(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def load(args, config, group) -> dict:
    """Peak memory growth while this process loads its slices (the peak is reset just before)."""
    import jax

    from sharding.distributed import initialize
    from sharding.layout import MeshLayout
    from workers.shard import load_placed_params

    initialize(group)
    layout = MeshLayout(config, MeshShape(args.ep, args.tp))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    before = rss_status("VmRSS")
    params = load_placed_params(config, args.checkpoint, layout)
    jax.block_until_ready(params)
    held = sum(buf.data.nbytes for leaf in jax.tree.leaves(params) for buf in leaf.addressable_shards)
    return {"local_param_bytes": int(held), "load_peak_growth": rss_status("VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["golden", "paged", "warmup", "load"])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--golden-dir")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    group_args(parser)
    args = parser.parse_args()
    if args.golden_dir:
        from pathlib import Path

        args.golden_dir = Path(args.golden_dir)

    from grok1.config import load_config
    from workers.shard import Shard

    config = load_config(args.config).replace(engine={"paged": PAGED, "warmup": WARMUP}.get(args.mode, ENGINE))
    group = ProcessGroup(args.coordinator, args.num_processes, args.process_id,
                         local_device_count=args.local_devices, timeout_s=60)
    if args.mode == "load":
        result = load(args, config, group)
    else:
        shard = Shard(config, args.checkpoint, MeshShape(args.ep, args.tp), group)
        if args.mode == "warmup":
            shard.engine.warmup()
            import jax

            jax.block_until_ready(shard.engine.state)  # the last steps' collectives: both processes end together
            result = {}
        else:
            result = (paged if args.mode == "paged" else golden)(args, shard)
        result["info"] = vars(shard.info())
    result["process_id"] = args.process_id
    print("RESULT " + json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
