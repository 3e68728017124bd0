"""The Ray actor around one shard: one actor = one JAX process = one part of a replica's mesh.

The actor starts empty so that the group can first learn where each one landed (node, address) and pick the
coordinator's port on the first one's node; `start` then joins the JAX group and loads this shard's slices.
Calls run one at a time, in the order the router sent them, which is what multi-controller JAX needs.
Each worker adds up the wall time spent inside its steps (`timings()`), so a benchmark can split a step's
time between the worker and Ray's dispatch around it.
"""

from __future__ import annotations

import os
import time

import ray

from grok1.engine_api import ENGINE_VERBS, PAGED_ENGINE_VERBS
from sharding.distributed import ProcessGroup, node_ip, pick_free_port
from sharding.mesh_shape import MeshShape
from workers.allocator import allocator_in_use
from workers.cpu_binding import allowed_cpus, bind


@ray.remote(max_restarts=0, max_task_retries=0)
class ShardWorker:
    def __init__(self, env: dict[str, str] | None = None):
        os.environ.update(env or {})  # e.g. NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME from the cluster config
        self.shard = None
        self._timings: dict[str, list] = {}  # verb -> [calls, seconds inside the call]

    def location(self) -> dict:
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": node_ip(), "pid": os.getpid(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "allocator": allocator_in_use(),
                "cpus": sorted(allowed_cpus())}

    def free_port(self) -> int:
        return pick_free_port()

    def start(self, config, checkpoint: str, mesh_shape: MeshShape, group: ProcessGroup,
              capacity_factor: float | None = None, warmup: bool = True, progress_to=None, cpus=None):
        """`progress_to`: an actor told this shard's tensors loaded as they load (GroupSpec.progress_to).
        `cpus`: the CPUs this worker binds to before its JAX backend exists (workers/cpu_binding.py); None:
        all it is allowed."""
        from workers.shard import Shard, load_reporter

        bind(None if cpus is None else frozenset(cpus))

        self.shard = Shard(config, checkpoint, mesh_shape, group, capacity_factor=capacity_factor,
                           report=load_reporter(progress_to, group.process_id))
        if warmup:
            self.shard.engine.warmup()  # compile every step now, together, rather than on the first requests
        return self.shard.info()

    def ping(self) -> int:
        return os.getpid()

    def execute(self, verb: str, *args):
        """Run one of the engine's verbs (grok1.engine_api.ENGINE_VERBS) on this process's shard: the one entry
        point for every multi-worker operation (workers.group), so a new verb needs no forwarding code."""
        if verb in ("ping", "timings"):  # the worker's own: liveness, and the time spent inside verbs
            return getattr(self, verb)(*args)
        if verb not in ENGINE_VERBS | PAGED_ENGINE_VERBS:
            raise ValueError(f"{verb!r} is not an engine verb ({sorted(ENGINE_VERBS | PAGED_ENGINE_VERBS)})")
        started = time.perf_counter()
        out = getattr(self.shard.engine, verb)(*args)  # host arrays: the step and its collectives have finished
        self._count(verb.removesuffix("_many"), started)
        return out

    def _count(self, verb: str, started: float) -> None:
        calls_seconds = self._timings.setdefault(verb, [0, 0.0])
        calls_seconds[0] += 1
        calls_seconds[1] += time.perf_counter() - started

    def timings(self, reset: bool = False) -> dict[str, tuple[int, float]]:
        """{verb: (calls, seconds spent inside them)} since the last reset."""
        out = {verb: (calls, seconds) for verb, (calls, seconds) in self._timings.items()}
        if reset:
            self._timings = {}
        return out

    def shutdown(self):
        if self.shard is not None:
            self.shard.shutdown()
