"""From a checkpoint directory to params on the device, for one process (the engine, benchmarks, the CLI)."""

from __future__ import annotations

import sys
from pathlib import Path

from grok1.checkpoint import load_checkpoint, write_random_checkpoint
from grok1.config import Grok1Config


def ensure_random_checkpoint(config: Grok1Config, directory: Path, seed: int = 0) -> Path:
    """Write a random-weight checkpoint for `config` at `directory` unless one is there already."""
    if (directory / "ckpt-0").is_dir():
        return directory
    print(f"writing a random-weight {config.name} checkpoint to {directory} (seed {seed})", file=sys.stderr)
    return write_random_checkpoint(directory, config.model, seed=seed)


def load_params(config: Grok1Config, directory: Path):
    """The whole params pytree on this process's default device (a sharded replica uses workers.shard)."""
    import jax
    import jax.numpy as jnp

    params = load_checkpoint(directory, config.model, dequantize=config.checkpoint.dequantize_on_load,
                             progress=sys.stderr.isatty())
    return jax.tree.map(jnp.asarray, params)
