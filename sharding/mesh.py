"""The device mesh of one replica: its devices laid out as `ep` x `tp` (see sharding/mesh_shape.py)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from grok1.config import ConfigError
from sharding.mesh_shape import EP, TP, MeshShape

__all__ = ["MeshShape", "make_mesh"]


def make_mesh(shape: MeshShape, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) != shape.size:
        raise ConfigError(f"mesh ep={shape.ep} x tp={shape.tp} needs {shape.size} devices, found {len(devices)}")
    return Mesh(np.asarray(devices).reshape(shape.ep, shape.tp), (EP, TP))
