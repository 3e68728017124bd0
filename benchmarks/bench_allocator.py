"""`make bench`: the decode step with glibc's malloc against tcmalloc (workers/allocator.py), side by side.

    python -m benchmarks.bench_allocator [--config configs/grok-1-tiny.yaml] [--active 1 8 32] [--rounds 3]

Each round starts two processes one after the other, alternating which goes first, both running the single-
process engine (32 slots) on the same checkpoint: one with `GROK1_ALLOCATOR=system`, one with `auto` (tcmalloc
preloaded). Each times `--steps` decode steps at each number of active sequences, with its user and kernel
CPU time per step (os.times: the kernel's share is where glibc's fresh mappings of XLA's per-step buffers
show). Prints a Markdown table of medians over the rounds; docs/benchmarks.md records one. Without tcmalloc
installed it says so and measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from workers.allocator import ALLOCATOR_ENV, KNOWN_ALLOCATORS, allocator_env, allocator_in_use, find_tcmalloc

ROOT = Path(__file__).resolve().parents[1]
SLOTS, PROMPT_LEN = 32, 16


def child(config_path: str, actives: list[int], steps: int) -> dict:
    """In the measured process: {active: (seconds, user CPU s, kernel CPU s) per step} and the allocator."""
    import numpy as np

    from grok1.config import load_config
    from grok1.engine import Engine, Sampling
    from grok1.loading import ensure_random_checkpoint, load_params

    config = load_config(config_path).replace(engine={"max_slots": SLOTS})
    engine = Engine(config, load_params(config, ensure_random_checkpoint(config, Path(config.checkpoint.path))))
    engine.warmup()
    rng = np.random.default_rng(0)
    out = {}
    for active in actives:
        for slot in range(SLOTS):
            engine.release(slot)
        prompts = [[int(t) for t in rng.integers(3, 1000, PROMPT_LEN)] for _ in range(active)]
        engine.prefill_many(list(range(active)), prompts, [Sampling(logprobs=False)] * active)
        for _ in range(3):  # untimed: the first steps after a prefill
            engine.decode_finish(engine.decode_start())
        cpu, started = os.times(), time.perf_counter()
        for _ in range(steps):
            engine.decode_finish(engine.decode_start())
        seconds, after = time.perf_counter() - started, os.times()
        out[active] = ((seconds / steps), (after.user - cpu.user) / steps, (after.system - cpu.system) / steps)
    return {"allocator": allocator_in_use(), "steps": out}


def run_child(choice: str, config_path: str, actives: list[int], steps: int) -> dict:
    env = {**os.environ, ALLOCATOR_ENV: choice, "PYTHONPATH": str(ROOT)}
    # Not this process's allocator (`make bench` runs it under tcmalloc): the child's is the choice's alone.
    env["LD_PRELOAD"] = " ".join(lib for lib in env.get("LD_PRELOAD", "").split()
                                 if not any(name in lib for name in KNOWN_ALLOCATORS))
    env.update(allocator_env(env))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_allocator", "--child", "--config", config_path,
                           "--active", *map(str, actives), "--steps", str(steps)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{choice}: exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--active", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.config, args.active, args.steps)), flush=True)
        return
    tcmalloc = find_tcmalloc()
    if tcmalloc is None:
        print("bench_allocator: no tcmalloc installed (apt-get install libtcmalloc-minimal4); nothing measured")
        return
    runs = {"system": [], "auto": []}
    for round_ in range(args.rounds):
        for choice in (("system", "auto") if round_ % 2 == 0 else ("auto", "system")):
            runs[choice].append(run_child(choice, args.config, args.active, args.steps))
    used = {choice: {run["allocator"] for run in results} for choice, results in runs.items()}
    print(f"{args.config}, {SLOTS} slots, {args.rounds} rounds of {args.steps} steps, medians; allocators seen: "
          f"system -> {sorted(used['system'])}, auto -> {sorted(used['auto'])} ({tcmalloc})\n")
    print("| active | glibc step ms | tcmalloc step ms | glibc / tcmalloc | CPU ms per step, user + kernel: glibc "
          "| tcmalloc |\n|---|---|---|---|---|---|")
    def median_ms(choice: str, active: int, k: int) -> float:  # k: 0 wall, 1 user CPU, 2 kernel CPU
        return 1e3 * statistics.median(run["steps"][str(active)][k] for run in runs[choice])

    for active in args.active:
        glibc, fast = median_ms("system", active, 0), median_ms("auto", active, 0)
        print(f"| {active} | {glibc:.1f} | {fast:.1f} | {glibc / fast:.2f}x | {median_ms('system', active, 1):.0f} + "
              f"{median_ms('system', active, 2):.0f} | {median_ms('auto', active, 1):.0f} + "
              f"{median_ms('auto', active, 2):.0f} |", flush=True)


if __name__ == "__main__":
    main()
