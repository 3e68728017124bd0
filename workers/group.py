"""A replica's shard group, and the one fan-out primitive everything goes through.

`group.call(method, *args)` runs `method` (an engine verb, grok1.engine_api.ENGINE_VERBS, through
`ShardWorker.execute`) on every shard and returns their results (all equal: every step's
outputs are replicated); `submit` / `collect` split the same call in two so that the router can start a step
and read it later. Two backends share the interface:

- `RayShardGroup`: one `workers.actor.ShardWorker` per JAX process, in a placement group whose strategy spreads
  them over nodes (or packs them), joined into one mesh with `jax.distributed`.
- `LocalShardGroup`: the engine in this process (one device, or this process's virtual devices), so the router
  and its tests run without Ray.

Any failure of a member (its process died, its node went away, a call ran past its time limit) raises
`GroupFailure`: a JAX collective cannot go on without a member, so the owner tears the whole group down and
builds a new one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grok1.config import Grok1Config
from sharding.distributed import ProcessGroup
from sharding.mesh_shape import MeshShape
from workers.allocator import allocator_actor_options, allocator_in_use
from workers.cpu_binding import node_ranks, worker_cpus


class GroupFailure(RuntimeError):
    """A member of the shard group failed; the group must be rebuilt. Requests may be retried."""

    retriable = True


class GroupStartError(RuntimeError):
    """The group could not be started (no resources, a worker that never joined, a bad checkpoint)."""


@dataclass(frozen=True)
class GroupSpec:
    """What a replica's shard group is: the model, the weights, the mesh, and how it is placed.

    No defaults here: each setting is declared, described and range-checked once, in
    cluster/replica_config.py, whose `ReplicaConfig.group_spec` builds this."""

    config: Grok1Config
    checkpoint: str
    mesh: MeshShape
    strategy: str  # a Ray placement group strategy
    devices_per_process: int  # GPUs per worker on GPU nodes; virtual CPU devices otherwise
    use_gpus: bool
    capacity_factor: float | None
    start_timeout_s: float  # joining and loading
    step_timeout_s: float  # one prefill or decode step
    env: tuple[tuple[str, str], ...]  # extra environment for the workers (network interfaces, ...)
    cpu_bind: str  # how CPU workers sharing a node split its CPUs (workers/cpu_binding.py)
    placement_name: str | None  # the placement group's name, one per replica (None: unnamed)
    # An actor whose `load_progress.remote(process, tensors loaded, tensors)` hears each worker's loading: the
    # router sets itself when it builds the group (for `grok1 serve`'s progress lines); None: nobody listens.
    progress_to: Any

    @property
    def num_processes(self) -> int:
        if self.mesh.size % self.devices_per_process:
            raise GroupStartError(f"mesh of {self.mesh.size} devices is not a whole number of processes of "
                                  f"{self.devices_per_process} devices")
        return self.mesh.size // self.devices_per_process

    def validate(self) -> "GroupSpec":
        """What depends on the model: the mesh must fit it, and split into whole processes."""
        self.mesh.validate(self.config)
        _ = self.num_processes
        return self


class RayShardGroup:
    def __init__(self, spec: GroupSpec):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from workers.actor import ShardWorker

        self.spec = spec.validate()
        self._ray = ray
        n = spec.num_processes
        bundle = {"GPU": spec.devices_per_process, "CPU": 1} if spec.use_gpus else {"CPU": 1}
        if spec.placement_name:
            remove_placement_group_named(spec.placement_name)  # left by a router of this replica that died
        self.placement_group = placement_group([dict(bundle) for _ in range(n)], strategy=spec.strategy,
                                               name=spec.placement_name or "")
        self.workers = []
        self._timings_pending, self._timings = None, None
        try:
            deadline = time.monotonic() + spec.start_timeout_s
            try:
                ray.get(self.placement_group.ready(), timeout=min(60.0, spec.start_timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise GroupStartError(f"no room for {n} workers of {bundle} with strategy {spec.strategy} "
                                      f"(cluster resources: {ray.cluster_resources()})") from None
            options = {"num_gpus": spec.devices_per_process} if spec.use_gpus else {"num_cpus": 1}
            if not spec.use_gpus:  # XLA:CPU's per-step buffers come from malloc (workers/allocator.py)
                options.update(allocator_actor_options(dict(spec.env)))
            self.workers = [ShardWorker.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group,
                                                                     placement_group_bundle_index=k),
                **options).remote(dict(spec.env)) for k in range(n)]
            self.locations = self._get([w.location.remote() for w in self.workers], deadline, "report its node")
            port = self._get([self.workers[0].free_port.remote()], deadline, "pick a port")[0]
            coordinator = f"{self.locations[0]['ip']}:{port}"
            platform = "gpu" if spec.use_gpus else "cpu"
            join_timeout = int(max(10, min(300, deadline - time.monotonic())))
            cpus = self._worker_cpus()
            groups = [ProcessGroup(coordinator, n, k, platform=platform, timeout_s=join_timeout,
                                   local_device_count=None if spec.use_gpus else spec.devices_per_process)
                      for k in range(n)]
            self.infos = self._get([w.start.remote(spec.config, spec.checkpoint, spec.mesh, g, spec.capacity_factor,
                                                   progress_to=spec.progress_to, cpus=c)
                                    for w, g, c in zip(self.workers, groups, cpus)], deadline,
                                   "join the group and load")
            # What each bound worker's affinity is now (its `cpus` before were what it was allowed).
            bound = any(chosen is not None for chosen in cpus)
            now = self._get([w.location.remote() for w in self.workers], deadline, "report its CPUs") if bound \
                else [None] * n
            for location, chosen, after in zip(self.locations, cpus, now):
                location["bound_cpus"] = None if chosen is None else after["cpus"]
        except BaseException:
            self.shutdown()
            raise

    def _worker_cpus(self) -> list[list[int] | None]:
        """Each worker's CPUs under the spec's cpu_bind, from where the workers landed (GPU workers: none)."""
        setting = "all" if self.spec.use_gpus else self.spec.cpu_bind
        ranks = node_ranks([location["node_id"] for location in self.locations])
        try:
            cpus = [worker_cpus(setting, frozenset(location["cpus"]), rank, count)
                    for location, (rank, count) in zip(self.locations, ranks)]
        except ValueError as err:
            raise GroupStartError(f"cpu_bind: {err}") from None
        return [None if chosen is None else sorted(chosen) for chosen in cpus]

    def _get(self, refs, deadline: float, what: str):
        ray = self._ray
        try:
            return ray.get(refs, timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            raise GroupStartError(f"a shard worker did not {what} within {self.spec.start_timeout_s:.0f}s") from None
        except ray.exceptions.RayTaskError as err:
            raise GroupStartError(f"a shard worker failed to {what}: {err.cause!r}") from err
        except ray.exceptions.RayActorError as err:
            raise GroupStartError(f"a shard worker died before it could {what}: {err}") from err

    # The fan-out primitive.
    def submit(self, method: str, *args):
        return [worker.execute.remote(method, *args) for worker in self.workers]

    def collect(self, handle, timeout_s: float | None = None) -> list:
        """Every worker's result. Results are read as they arrive, so a dead worker is reported at once even
        while the others wait forever inside a collective that lost a member."""
        ray = self._ray
        timeout = self.spec.step_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        pending = list(handle)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise GroupFailure(f"{len(pending)} shard worker(s) did not answer within {timeout:.0f}s")
                ray.get(ready)  # raises if that worker died or failed
            return ray.get(list(handle))
        except ray.exceptions.RayActorError as err:
            raise GroupFailure(f"a shard worker died ({type(err).__name__})") from err
        except ray.exceptions.RayTaskError as err:
            raise GroupFailure(f"a shard worker failed: {err.cause!r}") from err

    def call(self, method: str, *args, timeout_s: float | None = None) -> list:
        return self.collect(self.submit(method, *args), timeout_s)

    def members(self) -> list[dict]:
        """Where each worker runs: node_id, ip, pid, gpu_ids, the malloc library it runs with, the CPUs it was
        allowed (`cpus`) and those it bound to (`bound_cpus`, None: not bound)."""
        return list(self.locations)

    def timings(self) -> list[dict] | None:
        """Each worker's {verb: (calls, seconds inside its calls)}, as last read, without waiting (the caller is
        a metrics scrape): a read is sent when none is pending, queued behind the steps already sent, and taken
        once every worker has answered. None until the first read is back."""
        ray = self._ray
        if self._timings_pending is not None:
            ready, _ = ray.wait(self._timings_pending, num_returns=len(self._timings_pending), timeout=0)
            if len(ready) == len(self._timings_pending):
                try:
                    self._timings = ray.get(self._timings_pending, timeout=0)
                except ray.exceptions.RayError:  # a worker died: the step that notices it rebuilds the group
                    pass
                self._timings_pending = None
        if self._timings_pending is None and self.workers:
            self._timings_pending = [worker.execute.remote("timings") for worker in self.workers]
        return self._timings

    def shutdown(self) -> None:
        ray = self._ray
        for worker in self.workers:
            try:
                ray.kill(worker, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            ray.util.remove_placement_group(self.placement_group)
        except Exception:
            pass
        self.workers = []


def remove_placement_group_named(name: str) -> bool:
    """Remove the placement group of that name, if there is one (True then). Ray keeps a placement group until
    its creator's job ends, not when the creating actor (a router) dies: whoever replaces or watches that
    router calls this, so the devices it reserved are not held for ever."""
    import ray

    try:
        stale = ray.util.get_placement_group(name)
    except ValueError:  # no such group
        return False
    ray.util.remove_placement_group(stale)
    return True


@dataclass(frozen=True)
class _Dispatched:
    """A decode step an in-process engine has started and not yet read (Engine.decode_start's handle)."""

    step: tuple


class LocalShardGroup:
    """The same interface over an engine in this process: the router without Ray, and its tests."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def from_spec(cls, spec: GroupSpec) -> "LocalShardGroup":
        from grok1.compile_cache import enable_compile_cache
        from grok1.paged_engine import make_engine
        from sharding.layout import MeshLayout
        from workers.shard import load_placed_params, load_reporter

        spec.validate()
        enable_compile_cache()
        layout = MeshLayout(spec.config, spec.mesh, capacity_factor=spec.capacity_factor)
        report = load_reporter(spec.progress_to, 0)
        engine = make_engine(spec.config, load_placed_params(spec.config, Path(spec.checkpoint), layout,
                                                             report=report), layout)
        engine.warmup()
        return cls(engine)

    def submit(self, method: str, *args):
        if method == "decode" and hasattr(self.engine, "decode_start"):
            # Dispatched only (JAX runs it asynchronously) and read in `collect`, as a Ray group's call is: the
            # pipelined driver hands out the last step's tokens while this one computes.
            return _Dispatched(self.engine.decode_start(*args))
        return [getattr(self.engine, method)(*args)]

    def collect(self, handle, timeout_s: float | None = None) -> list:
        if isinstance(handle, _Dispatched):
            return [self.engine.decode_finish(handle.step)]
        return handle

    def call(self, method: str, *args, timeout_s: float | None = None) -> list:
        return self.collect(self.submit(method, *args))

    def members(self) -> list[dict]:
        import os

        return [{"node_id": "local", "ip": "127.0.0.1", "pid": os.getpid(), "gpu_ids": [],
                 "allocator": allocator_in_use()}]

    def timings(self) -> None:
        """None: in this process a step's time inside the engine is the router's step time."""
        return None

    def shutdown(self) -> None:
        self.engine.shutdown()


class GroupEngine:
    """The engine verbs (see grok1.engine.Engine) on a shard group, for cluster.driver.Driver."""

    def __init__(self, group):
        self.group = group

    def prefill(self, slot, prompt, sampling):
        return self.group.call("prefill", slot, prompt, sampling)[0]

    def prefill_many(self, slots, prompts, samplings, generated=None, masks=None):
        # Extra arguments only when used: engines without resume or grammars take the three.
        extra = (generated, masks) if masks is not None else () if generated is None else (generated,)
        return self.group.call("prefill_many", slots, prompts, samplings, *extra)[0]

    def decode(self, masks=None, skip=()):
        return self.decode_finish(self.decode_start(masks, skip))

    def decode_start(self, masks=None, skip=()):
        # Grammar masks go to every worker: each samples the same tokens from the same (replicated) logits.
        return self.group.submit("decode", masks, skip) if masks or skip else self.group.submit("decode")

    def decode_finish(self, handle):
        return self.group.collect(handle)[0]

    def paged_step(self, plan):
        return self.group.call("paged_step", plan)[0]

    def release(self, slot):
        # Not waited for: the workers run calls in order, so the next step sees the slot released, and a
        # failure shows up in that step's results.
        self.group.submit("release", slot)

    def ping(self):
        return self.group.call("ping", timeout_s=10) if hasattr(self.group, "workers") else None

    def check_health(self) -> bool:
        return all(self.group.call("check_health"))

    def shutdown(self) -> None:
        self.group.shutdown()
