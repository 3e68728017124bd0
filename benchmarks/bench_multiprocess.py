"""`make bench`: the expert-parallel engine across processes vs the single-process engine, in one run.

    python -m benchmarks.bench_multiprocess [--config configs/grok-1-tiny.yaml] [--steps 30] [--repeats 3]

At 32 concurrent sequences (every decode slot active), decode step time, steps/s and tokens/s for:
- the single-process engine: one process, no mesh (grok1.engine.Engine as bench_engine runs it), and the same
  engine on a 1x1 mesh (the expert-parallel code path with ep=1); every row has its ratio to both;
- ep=2 and ep=4 on virtual devices in one process: the cost of partitioning (the all-to-all dispatch/combine,
  its padded buffers, the split attention) without processes;
- ep=2 and ep=4 as 2 and 4 processes of one JAX group over gloo (workers.local_processes.run_local_group, one device
  each): the same programs, plus the processes and the collectives between them.

Each layout runs benchmarks/multiprocess_worker.py; process 0 reports the median of `repeats` timed runs of
`steps` steps. "process cost" is a layout's step time minus the same mesh on virtual devices in one process:
what the separate processes and gloo add (on a machine with fewer cores than processes it also holds the
processes' competition for the cores). Prints a Markdown table; docs/benchmarks.md records one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path

from workers.local_processes import run_local_group

WORKER = "benchmarks.multiprocess_worker"


@dataclass(frozen=True)
class Layout:
    name: str
    ep: int
    processes: int
    local_devices: int  # per process


LAYOUTS = [
    Layout("1 process, mesh 1x1", 1, 1, 1),
    Layout("ep=2, 1 process x 2 virtual devices", 2, 1, 2),
    Layout("ep=2, 2 processes over gloo", 2, 2, 1),
    Layout("ep=4, 1 process x 4 virtual devices", 4, 1, 4),
    Layout("ep=4, 4 processes over gloo", 4, 4, 1),
]


def measure(config_path: str, checkpoint: str, layout: Layout, *, slots: int = 32, steps: int = 30,
            repeats: int = 3, prompt_len: int = 16, plain: bool = False, timeout_s: float = 600) -> dict:
    """Median seconds per decode step of `layout` (and of the mesh-less engine with `plain`)."""
    args = ["--config", config_path, "--checkpoint", checkpoint, "--ep", str(layout.ep), "--slots", str(slots),
            "--steps", str(steps), "--repeats", str(repeats), "--prompt-len", str(prompt_len)]
    results = run_local_group(WORKER, args + (["--plain"] if plain else []), layout.processes,
                              local_devices=layout.local_devices, timeout_s=timeout_s)
    failed = [r for r in results if r.returncode != 0]
    if failed:
        raise RuntimeError("\n".join(f"{layout.name}: process {r.process_id} exited {r.returncode}:\n"
                                     f"{r.stderr[-3000:]}" for r in failed))
    [line] = [line for line in results[0].stdout.splitlines() if line.startswith("RESULT ")]
    out = json.loads(line[len("RESULT "):])
    step = {"step_s": statistics.median(out["seconds"]) / steps, "runs_s": out["seconds"]}
    if plain:
        step["plain_step_s"] = statistics.median(out["plain_seconds"]) / steps
    return step


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--checkpoint", help="default: the config's, a random one written on first use")
    parser.add_argument("--slots", type=int, default=32, help="decode slots, all active (concurrent sequences)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from grok1.config import load_config
    from grok1.loading import ensure_random_checkpoint

    config = load_config(args.config)
    checkpoint = args.checkpoint or str(ensure_random_checkpoint(config, Path(config.checkpoint.path)))
    steps = {}
    plain_step = None
    for layout in LAYOUTS:
        first = layout is LAYOUTS[0]
        out = measure(args.config, checkpoint, layout, slots=args.slots, steps=args.steps, repeats=args.repeats,
                      plain=first)
        steps[layout] = out["step_s"]
        if first:
            plain_step = out["plain_step_s"]
        print(f"{layout.name}: {1000 * out['step_s']:.1f} ms/step (runs {[round(s, 2) for s in out['runs_s']]} s)",
              flush=True)

    base = steps[LAYOUTS[0]]
    virtual = {layout.ep: steps[layout] for layout in LAYOUTS if layout.processes == 1}
    print(f"\n{config.name}: {args.slots} concurrent sequences, decode step time (median of {args.repeats} x "
          f"{args.steps} steps), {platform.machine()} CPU, {os.cpu_count()} cores\n")
    print("| layout | processes | step ms | steps/s | tok/s | vs engine | vs mesh 1x1 | process cost ms |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [("single-process engine, no mesh (bench_engine)", 1, plain_step, None)]
    rows += [(layout.name, layout.processes, steps[layout],
              steps[layout] - virtual[layout.ep] if layout.processes > 1 else None) for layout in LAYOUTS]
    for name, processes, step, extra in rows:
        print(f"| {name} | {processes} | {1000 * step:.1f} | {1 / step:.1f} | {args.slots / step:.0f} | "
              f"{plain_step / step:.2f}x | {base / step:.2f}x | {'' if extra is None else f'{1000 * extra:+.1f}'} |")


if __name__ == "__main__":
    main()
