"""The sliceable on-disk checkpoint format, from which a process reads only the bytes of its own slices: its
names, dtypes and shapes, shared by the converter (`grok1.sliceable_convert`) and the reader
(`grok1.sliceable`).

The released checkpoint pickles whole tensors, so a process that owns 1/N of the model would still have to
unpickle all of it. `grok1.sliceable_convert.convert` rewrites it, once, as a directory of raw arrays, one
per leaf of OUR stacked params pytree (`grok1.params`), which are then opened as memory maps:

    DST/manifest.json                 {"format": "grok1-sliceable-v2", "config": {ModelConfig fields},
                                       "tensors": {name: {"file": ..., "dtype": ..., "shape": [...]}}}
    DST/embedding.bin                 bfloat16 [V, D]
    DST/final_norm.bin                float32  [D]
    DST/layers.pre_attn_norm.bin      float32  [L, D]            (and the other norms, and layers.gate)
    DST/layers.q_proj.weight.bin      int8     [L, D, Hq*K]      (every quantised param: .weight ...)
    DST/layers.q_proj.scales.bin      bfloat16 [L, G, Hq*K]      (... and .scales)

Each file is the C-order, little-endian bytes of its array and nothing else. Leaf names are the pytree paths
joined by dots (`leaf_name`), so writer and reader agree by construction. The manifest is written last (to a
temporary name, then renamed): a directory without one is an unfinished conversion and is refused. Every
file is written under a temporary name and renamed into place, so a process that still maps the files of
a previous conversion keeps reading them unchanged. Tensor files are plain names in DST, not links out of it.

Public API: `FORMAT`, `MANIFEST`, `SUFFIX`, `DTYPES`, `leaf_name`, `leaf_names`, `name_tree`, `stacked_name`,
`dtype_name`, `expected_specs`.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_dtypes
import numpy as np

from grok1.config import ModelConfig
from grok1.params import LAYER_PARAMS, TOP_PARAMS, QuantizedWeight, is_quantised, layer_shapes, top_shapes
from grok1.release_layout import CheckpointError

FORMAT = "grok1-sliceable-v2"  # v2: the MoE gate's file is layers.gate (v1: layers.router)
MANIFEST = "manifest.json"
SUFFIX = ".bin"

DTYPES: dict[str, np.dtype] = {
    "int8": np.dtype(np.int8),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("<f4"),
}


# ----------------------------------------------------------------------------------------------------------
# Leaf names


def _key_str(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def leaf_name(path) -> str:
    """The name of a leaf from its pytree path: keys joined by dots, e.g. "layers.q_proj.weight"."""
    return ".".join(_key_str(key) for key in path)


def leaf_names(params) -> list[str]:
    """Names of the leaves of a params pytree, in `jax.tree.leaves` order."""
    return [leaf_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def name_tree(config: ModelConfig) -> dict[str, Any]:
    """Our params tree (quantised params as QuantizedWeight) whose leaves are their names."""
    skeleton = {name: 0 for name in TOP_PARAMS}
    skeleton["layers"] = {name: QuantizedWeight(0, 0) if spec.quantised else 0
                          for name, spec in LAYER_PARAMS.items()}
    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path), skeleton)


def stacked_name(name: str, part: str | None = None) -> str:
    """Name of our leaf a released leaf (or its record's `part`) goes into; agrees with `name_tree`."""
    prefix = None if name in TOP_PARAMS else "layers"
    return ".".join(p for p in (prefix, name, part) if p is not None)


# ----------------------------------------------------------------------------------------------------------
# Dtypes and shapes


def dtype_name(dtype) -> str:
    """The manifest's name for `dtype`; refuses a dtype the format has no name for."""
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise CheckpointError(f"unsupported dtype {name} for the sliceable format")
    return name


def expected_specs(config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape) of every leaf; a scales shape has None for its group count G."""
    num_layers = config.num_layers
    specs: dict[str, tuple[str, tuple]] = {
        "embedding": ("bfloat16", top_shapes(config)["embedding"]),
        "final_norm": ("float32", top_shapes(config)["final_norm"]),
    }
    for name, shape in layer_shapes(config).items():
        if is_quantised(name):
            specs[stacked_name(name, "weight")] = ("int8", (num_layers, *shape))
            specs[stacked_name(name, "scales")] = ("bfloat16", (num_layers, *shape[:-2], None, shape[-1]))
        else:
            specs[stacked_name(name)] = ("float32", (num_layers, *shape))
    return specs
