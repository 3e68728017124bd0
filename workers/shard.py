"""One process's part of a sharded model replica: join the group, load this process's slices, run the steps.

JAX across processes is multi-controller: every process of the group must make the same calls, with the same
arguments, in the same order, and each runs the same jitted step on its own devices while the collectives
connect them. So whoever drives a group (the router through the Ray workers, or a test's subprocesses) fans
every call out to all shards; each returns the same, fully replicated result.

Nothing here imports Ray: `workers/actor.py` wraps this class as a Ray actor.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from grok1.config import Grok1Config
from sharding.distributed import ProcessGroup, initialize
from sharding.mesh_shape import MeshShape


class ShardLoadError(RuntimeError):
    """The checkpoint cannot be loaded for this config and layout; the message says which file and why."""


@dataclass(frozen=True)
class ShardInfo:
    process_id: int
    pid: int
    hostname: str
    devices: list[str]  # this process's devices
    global_devices: int
    load_seconds: float
    peak_rss_bytes: int  # the process's peak resident memory after loading


def load_reporter(progress_to, process_id: int):
    """`report(done, total)` sending this process's loading progress to the `progress_to` actor (fire and
    forget: a lost message only delays a progress line), or None without one."""
    if progress_to is None:
        return None
    return lambda done, total: progress_to.load_progress.remote(process_id, done, total)


def load_placed_params(config: Grok1Config, checkpoint: Path, layout, *, progress: bool = False, report=None):
    """This process's slices of the params, laid out on `layout`'s mesh; `report(done, total)` hears the
    tensors loaded as they are (grok1/progress.py).

    From the sliceable format each process reads only the bytes its devices hold. From the released layout
    (whole tensors pickled per file) each process has to read every tensor and keeps its slices.
    """
    from grok1.checkpoint import load_checkpoint
    from grok1.release_layout import CheckpointError
    from grok1.sliceable import is_sliceable, load_sharded, open_sliceable

    try:
        if is_sliceable(checkpoint):
            shardings = layout.param_shardings(open_sliceable(checkpoint, config.model))
            return load_sharded(checkpoint, config.model, shardings, progress=progress, report=report)
        params = load_checkpoint(checkpoint, config.model, dequantize=config.checkpoint.dequantize_on_load,
                                 progress=progress, report=report)
        return layout.put_params(params)
    except (CheckpointError, ValueError, FileNotFoundError) as err:
        raise ShardLoadError(f"cannot load {checkpoint} for config {config.name!r}: {err}") from err


class Shard:
    """Owns one process's devices of a replica's mesh and the engine running on it."""

    def __init__(self, config: Grok1Config, checkpoint: str | os.PathLike, mesh_shape: MeshShape,
                 group: ProcessGroup, *, capacity_factor: float | None = None, progress: bool = False,
                 report=None):
        started = time.perf_counter()
        initialize(group)
        import jax

        from grok1.compile_cache import enable_compile_cache
        from grok1.paged_engine import make_engine
        from sharding.layout import MeshLayout

        enable_compile_cache()  # a restarted worker or a rebuilt group loads its steps instead of compiling
        if jax.device_count() != mesh_shape.size:
            raise ShardLoadError(f"mesh ep={mesh_shape.ep} x tp={mesh_shape.tp} needs {mesh_shape.size} devices; "
                                 f"the group of {group.num_processes} processes has {jax.device_count()}")
        self.group = group
        layout = MeshLayout(config, mesh_shape, capacity_factor=capacity_factor)
        params = load_placed_params(config, Path(checkpoint), layout, progress=progress, report=report)
        self.engine = make_engine(config, params, layout)
        self._info = ShardInfo(
            process_id=group.process_id, pid=os.getpid(), hostname=socket.gethostname(),
            devices=[str(d) for d in jax.local_devices()], global_devices=jax.device_count(),
            load_seconds=time.perf_counter() - started,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def info(self) -> ShardInfo:
        return self._info

    def shutdown(self):
        self.engine.shutdown()
