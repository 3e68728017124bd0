"""Run N copies of a Python module on this host as one JAX process group, without Ray.

Each copy gets `--process-id K --num-processes N --coordinator 127.0.0.1:PORT` appended to its arguments and
joins the group with `sharding.distributed.initialize`. The tests and `make bench` use this; the cluster uses
the Ray shard workers instead, which join the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sharding.distributed import pick_free_port
from workers.allocator import allocator_env

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ProcessResult:
    process_id: int
    returncode: int
    stdout: str
    stderr: str


def group_args(parser) -> None:
    """The arguments every module run by `run_local_group` accepts."""
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--coordinator", default="127.0.0.1:0")
    parser.add_argument("--local-devices", type=int, default=1)


def run_local_group(module: str, args: list[str], num_processes: int, *, local_devices: int = 1,
                    timeout_s: float = 600, env: dict[str, str] | None = None) -> list[ProcessResult]:
    """Start the group, wait for every process (at most `timeout_s`), and return each one's output.

    If one process fails or the time runs out, the others are killed: a group cannot go on without a member.
    """
    coordinator = f"127.0.0.1:{pick_free_port('127.0.0.1')}"
    environment = {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}
    environment.update(allocator_env(environment))  # CPU processes: XLA's per-step buffers (workers/allocator.py)
    procs = [subprocess.Popen(
        [sys.executable, "-m", module, *args, "--process-id", str(k), "--num-processes", str(num_processes),
         "--coordinator", coordinator, "--local-devices", str(local_devices)],
        cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(num_processes)]
    results: list[ProcessResult | None] = [None] * num_processes
    deadline = time.monotonic() + timeout_s
    try:
        for k, proc in enumerate(procs):
            stdout, stderr = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results[k] = ProcessResult(k, proc.returncode, stdout, stderr)
            if proc.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        pass
    finally:
        for k, proc in enumerate(procs):
            if proc.poll() is None:
                proc.kill()
                stdout, stderr = proc.communicate()
                results[k] = ProcessResult(k, -9, stdout, stderr + f"\n[killed after {timeout_s}s or a peer's failure]")
            elif results[k] is None:
                stdout, stderr = proc.communicate()
                results[k] = ProcessResult(k, proc.returncode, stdout, stderr)
    return results
