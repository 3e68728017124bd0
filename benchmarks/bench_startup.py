"""Start-up and rebuild time of one model replica (router + Ray shard group), with JAX's persistent compilation
cache empty, warm, and off, side by side in one run.

    python -m benchmarks.bench_startup [--config configs/grok-1-tiny.yaml] [--ep 2] [--num-cpus 4]

1. start, cache off: a router with GROK1_COMPILE_CACHE=off for its workers, until it serves (`wait_ready`);
   then a worker is killed and the time until the rebuilt group serves again is the rebuild, cache off.
2. start, cache cold: the same with an empty cache directory (the run fills it);
3. start, cache warm: a new router on the now filled directory; then the rebuild, cache warm.
Start-up is mostly compiling the steps: the ratio of warm to cold is what the cache saves a restarted replica
or a rebuilt group. Ray and the checkpoint (random weights, written on first use) are set up before timing.
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time
from pathlib import Path


def _start(config, settings, checkpoint: str, cache: str) -> tuple[object, float]:
    import ray

    from cluster.router import start_router

    started = time.perf_counter()
    router = start_router(config, settings, checkpoint=checkpoint, env={"GROK1_COMPILE_CACHE": cache})
    ray.get(router.wait_ready.remote(1800))
    return router, time.perf_counter() - started


def _rebuild(router) -> float:
    """Kill one shard worker; seconds until the router serves again on a rebuilt group."""
    import ray

    stats = ray.get(router.stats.remote())
    restarts = stats["restarts"]
    started = time.perf_counter()
    os.kill(stats["workers"][-1]["pid"], signal.SIGKILL)
    deadline = started + 1800
    while time.perf_counter() < deadline:
        stats = ray.get(router.stats.remote())
        if stats["restarts"] > restarts and stats["state"] == "ready":
            return time.perf_counter() - started
        if stats["state"] == "failed":
            raise RuntimeError(f"the rebuild failed: {stats['error']}")
        time.sleep(0.2)
    raise TimeoutError("the group was not rebuilt within 1800s")


def _stop(router) -> None:
    import ray

    ray.get(router.shutdown.remote(), timeout=120)
    ray.kill(router)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--checkpoint")
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray instance")
    args = parser.parse_args(argv)

    import ray

    from cluster.replica_config import ReplicaConfig
    from grok1.config import load_config
    from grok1.loading import ensure_random_checkpoint

    config = load_config(args.config)
    checkpoint = args.checkpoint or config.checkpoint.path
    if not args.checkpoint:
        ensure_random_checkpoint(config, Path(checkpoint))
    settings = ReplicaConfig(ep=args.ep, backend="ray")
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="grok1-compile-cache-") as cache:
            router, off = _start(config, settings, checkpoint, "off")
            rows.append(("start, cache off", off))
            rows.append(("rebuild, cache off", _rebuild(router)))
            _stop(router)
            router, cold = _start(config, settings, checkpoint, cache)
            rows.append(("start, cache cold (empty)", cold))
            _stop(router)
            router, warm = _start(config, settings, checkpoint, cache)
            rows.append(("start, cache warm", warm))
            rows.append(("rebuild, cache warm", _rebuild(router)))
            _stop(router)
    finally:
        ray.shutdown()
    print(f"\n{config.name}, ep={args.ep}, Ray shard workers, {args.num_cpus} logical CPUs "
          f"({os.cpu_count()} cores; a busy machine stretches every figure)")
    print(f"{'':<28} {'seconds':>8} {'vs cache off':>13}")
    baseline = {"start": off, "rebuild": rows[1][1]}
    for name, seconds in rows:
        print(f"{name:<28} {seconds:>8.1f} {seconds / baseline[name.split(',')[0]]:>12.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
