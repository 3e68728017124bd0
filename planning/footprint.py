"""Bytes of the params and the decode state, whole and per device, from shapes alone (nothing allocated).

1. params: the pytree of `grok1.params` (shapes from `layer_shapes`/`top_shapes`, dtypes as
   `grok1.checkpoint.load_checkpoint` returns them) as `ShapeDtypeStruct`s, split by `sharding.rules.param_specs`;
2. decode state: `jax.eval_shape` of `grok1.steps.init_state`, split by `sharding.rules.state_specs` as
   `MeshLayout.state_shardings` is (the KV cache by its logical axes, the rest replicated).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

from grok1.config import Grok1Config, ModelConfig
from grok1.params import LAYER_PARAMS, QuantizedWeight, is_quantised, layer_shapes, top_shapes
from grok1.steps import init_state
from planning.mesh_choice import PlanError
from sharding.mesh_shape import EP, TP, MeshShape
from sharding.rules import path_name

# Scale groups G along the input axis in xAI's released checkpoint (the others have one group per column).
RELEASE_SCALE_GROUPS: Mapping[str, int] = {"o_proj": 8, "ffn_out": 8}


def param_structs(model: ModelConfig, scale_groups: Mapping[str, int] = RELEASE_SCALE_GROUPS,
                  dequantized: bool = False):
    """The params pytree as `load_checkpoint` returns the release's, as ShapeDtypeStructs: bf16 embedding, f32
    norms and gate, QuantizedWeight(int8 [L, ..., K, N], bf16 scales [L, ..., G, N]) or bf16 if dequantized."""
    layers: dict[str, Any] = {}
    for name, shape in layer_shapes(model).items():
        stacked = (model.num_layers, *shape)
        if not is_quantised(name):
            layers[name] = jax.ShapeDtypeStruct(stacked, np.float32)
        elif dequantized:
            layers[name] = jax.ShapeDtypeStruct(stacked, ml_dtypes.bfloat16)
        else:
            scales = (*stacked[:-2], scale_groups.get(name, 1), stacked[-1])
            layers[name] = QuantizedWeight(jax.ShapeDtypeStruct(stacked, np.int8),
                                           jax.ShapeDtypeStruct(scales, ml_dtypes.bfloat16))
    top = top_shapes(model)
    return {"embedding": jax.ShapeDtypeStruct(top["embedding"], ml_dtypes.bfloat16),
            "final_norm": jax.ShapeDtypeStruct(top["final_norm"], np.float32),
            "layers": {name: layers[name] for name in LAYER_PARAMS}}


def state_structs(config: Grok1Config, slots: int):
    """The engine's DecodeState for `slots` slots as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(functools.partial(init_state, config.replace(engine={"max_slots": slots})))


def shard_shape(shape: tuple[int, ...], spec: P, mesh: MeshShape, name: str = "array") -> tuple[int, ...]:
    """The block of `shape` each device holds under `spec`; every split dimension must divide evenly."""
    sizes = {EP: mesh.ep, TP: mesh.tp}
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    block = []
    for axis, (dim, names) in enumerate(zip(shape, entries)):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        parts = math.prod(sizes[n] for n in names)
        if dim % parts:
            raise PlanError(f"{name}: dimension {axis} of shape {tuple(shape)} ({dim}) does not divide over "
                            f"{'x'.join(f'{n}={sizes[n]}' for n in names)}")
        block.append(dim // parts)
    return tuple(block)


def per_device_bytes(structs, specs, mesh: MeshShape) -> dict[str, int]:
    """Bytes each device holds, by leaf path ("layers/q_proj/weight", ...). Every device holds as many."""
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat = jax.tree_util.tree_flatten_with_path(structs)[0]
    out = {}
    for (path, leaf), spec in zip(flat, flat_specs, strict=True):
        name = path_name(path)
        out[name] = math.prod(shard_shape(leaf.shape, spec, mesh, name)) * np.dtype(leaf.dtype).itemsize
    return out


def total_bytes(structs) -> int:
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(structs))


WEIGHT_KINDS = ("int8 weights", "scales (bf16)", "dequantised weights (bf16)", "embedding (bf16)",
                "norms, gate (f32)")  # the plan's lines, in this order


def weight_kind(path: str) -> str:
    """Which of WEIGHT_KINDS a param leaf ("layers/q_proj/weight", "embedding", ...) counts in."""
    if path.endswith("/weight"):
        return "int8 weights"
    if path.endswith("/scales"):
        return "scales (bf16)"
    if path.startswith("layers/") and is_quantised(path.split("/")[1]):
        return "dequantised weights (bf16)"
    if path == "embedding":
        return "embedding (bf16)"
    return "norms, gate (f32)"
