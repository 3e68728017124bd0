"""JAX's persistent compilation cache for every process that builds an engine.

Starting a replica is mostly compiling its steps (tiny config: ~30 s of ~35 s on 2 cores); with the cache a
restarted process or a rebuilt shard group loads the executables instead (~6 s). The cache is keyed by JAX on
the program, the devices and the versions, so a stale entry is never used for another program.

`$GROK1_COMPILE_CACHE` names the directory (default `~/.cache/grok1/jax-compile`); `off` disables it. A size
bound turns on JAX's file lock, so the processes of one host can share the directory safely.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

DEFAULT_DIR = Path("~/.cache/grok1/jax-compile")
MAX_BYTES = 4 << 30  # evicted least-recently-used beyond this
MIN_COMPILE_SECONDS = 0.5  # cheaper programs are not worth a file


def enable_compile_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Point this process's JAX at the cache (idempotent); returns the directory, or None when disabled."""
    value = str(directory) if directory is not None else os.environ.get("GROK1_COMPILE_CACHE", "")
    if value.lower() in ("off", "0", "false", "none"):
        return None
    path = Path(value or DEFAULT_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
