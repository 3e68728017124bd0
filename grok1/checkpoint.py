"""Load and save whole checkpoints in xAI's released Grok-1 layout (one file per leaf is `grok1.release_layout`).

Dtypes travel unchanged both ways: `load_checkpoint` returns each leaf in the dtype its file holds (the release:
bfloat16 embedding and scales, float32 norms and gate; another checkpoint may hold float32 where the release
has bfloat16, or the reverse) and `save_checkpoint` writes each leaf in the dtype it has, so loading and
saving again reproduces the files byte for byte. The model casts each param where it uses it.

Public API: `load_checkpoint`, `save_checkpoint`, `write_random_checkpoint`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from grok1.config import ModelConfig
from grok1.params import LAYER_PARAMS, QuantizedWeight, is_quantised
from grok1.progress import progress_bar
from grok1.random_weights import random_params
from grok1.release_layout import (
    CKPT_SUBDIR,
    RECORD_CLASS_NAME,
    RECORD_MODULES,
    CheckpointError,
    Leaf,
    QuantizedWeight8bit,
    ScaleGroups,
    check_file_set,
    check_float_array,
    check_record,
    describe,
    expected_leaves,
    read_checked,
    resolve_ckpt_dir,
)
from grok1.release_pickle import ReleasePickler

_LOAD_THREADS = 4

# ----------------------------------------------------------------------------------------------------------
# Loading a checkpoint


def _ordered_bounded_map(pool: ThreadPoolExecutor, fn, items: Iterable, window: int) -> Iterator:
    """pool.map, but with at most `window` results held at once, so a huge checkpoint never piles up."""
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


class _LayerStack:
    """Stacks the per-layer leaves of each param into [L, ...] arrays, allocated when its first layer arrives."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.stacked: dict[str, Any] = {}

    def put(self, leaf: Leaf, value) -> None:
        if isinstance(value, QuantizedWeight):
            if leaf.name not in self.stacked:
                self.stacked[leaf.name] = QuantizedWeight(self._empty_like(value.weight),
                                                          self._empty_like(value.scales))
            stacked = self.stacked[leaf.name]
            self._check_dtype(leaf, "scales ", stacked.scales, value.scales)
            stacked.weight[leaf.layer] = value.weight
            stacked.scales[leaf.layer] = value.scales
        else:
            if leaf.name not in self.stacked:
                self.stacked[leaf.name] = self._empty_like(value)
            self._check_dtype(leaf, "", self.stacked[leaf.name], value)
            self.stacked[leaf.name][leaf.layer] = value

    @staticmethod
    def _check_dtype(leaf: Leaf, what: str, stacked: np.ndarray, value: np.ndarray) -> None:
        """One stacked array has one dtype: a layer stored in another would be silently cast into it."""
        if value.dtype != stacked.dtype:
            raise CheckpointError(f"{leaf.where}: {what}dtype {value.dtype} differs from other layers' "
                                  f"{stacked.dtype}; a param's dtype must be equal across layers")

    def _empty_like(self, one_layer: np.ndarray) -> np.ndarray:
        return np.empty((self.num_layers, *one_layer.shape), one_layer.dtype)

    def result(self) -> dict[str, Any]:
        return {name: self.stacked[name] for name in LAYER_PARAMS}


def load_checkpoint(directory: str | os.PathLike, config: ModelConfig, *, dequantize: bool = False,
                    progress: bool = False, report=None) -> dict[str, Any]:
    """Load a released-layout checkpoint into our stacked params pytree (numpy arrays).

    Returns {"embedding": [V, D], "final_norm": [D], "layers": {name: [L, ...]}}, where quantised params are
    QuantizedWeight(int8 [L, ..., K, N], scales [L, ..., G, N]), or bf16 arrays if `dequantize`. Float leaves
    and scales keep the dtype of their files (the release: bf16 embedding and scales, f32 norms and gate).
    """
    ckpt_dir = resolve_ckpt_dir(directory)
    leaves = expected_leaves(ckpt_dir, config)
    check_file_set(ckpt_dir, leaves)
    top: dict[str, np.ndarray] = {}
    layers, groups = _LayerStack(config.num_layers), ScaleGroups()

    def read(leaf: Leaf):
        return (leaf, *read_checked(leaf, dequantize))

    with ThreadPoolExecutor(_LOAD_THREADS) as pool, \
            progress_bar(len(leaves), "loading checkpoint", progress, report) as bar:
        for leaf, value, scales_shape in _ordered_bounded_map(pool, read, leaves, window=2 * _LOAD_THREADS):
            if leaf.layer is None:
                top[leaf.name] = value
            else:
                if scales_shape is not None:
                    groups.check(leaf, scales_shape)
                layers.put(leaf, value)
            bar.update(1)
    return {"embedding": top["embedding"], "final_norm": top["final_norm"], "layers": layers.result()}


# ----------------------------------------------------------------------------------------------------------
# Saving a checkpoint


def _write_leaf(path: Path, value, record_module: str) -> None:
    """Write one pickle under a temporary name, then rename, so a crash never leaves a half file at `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            ReleasePickler(file, {QuantizedWeight8bit: (record_module, RECORD_CLASS_NAME)}).dump(value)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _leaf_to_save(leaf: Leaf, params: dict[str, Any]):
    """The object to pickle for one leaf: a numpy float array or a QuantizedWeight8bit record, each array in
    the dtype the param has (float32 or bfloat16; nothing is cast, so a loaded checkpoint saves byte for byte).
    """
    value = params[leaf.name] if leaf.layer is None else params["layers"][leaf.name]
    if not is_quantised(leaf.name):
        array = np.asarray(value if leaf.layer is None else value[leaf.layer])
        return np.ascontiguousarray(check_float_array(leaf, array))
    if not isinstance(value, QuantizedWeight):
        raise CheckpointError(f"{leaf.where}: can only save quantised params as QuantizedWeight, "
                              f"got {describe(value)}")
    record = QuantizedWeight8bit(weight=np.ascontiguousarray(np.asarray(value.weight[leaf.layer])),
                                 scales=np.ascontiguousarray(np.asarray(value.scales[leaf.layer])))
    weight, scales = check_record(leaf, record)
    return QuantizedWeight8bit(weight=weight, scales=np.ascontiguousarray(scales))


def save_checkpoint(directory: str | os.PathLike, params: dict[str, Any], config: ModelConfig, *,
                    record_module: str = "__main__") -> Path:
    """Write `params` (our stacked pytree, quantised) as `directory/ckpt-0/tensor{i:05d}_000`, as released.

    Each leaf is written in its own dtype, which must be one the release uses (float32 or bfloat16 floats,
    int8 weights with float scales); `random_params` makes the release's dtypes.

    `record_module` is the module the record class is pickled under: "__main__" as in the release, or
    "model" as in the golden sets. Returns `directory`.
    """
    if record_module not in RECORD_MODULES:
        raise ValueError(f"record_module must be one of {RECORD_MODULES}, got {record_module!r}")
    directory = Path(directory)
    ckpt_dir = directory / CKPT_SUBDIR
    leaves = expected_leaves(ckpt_dir, config)
    for leaf in leaves:  # check everything before writing anything
        _leaf_to_save(leaf, params)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for leaf in leaves:
        _write_leaf(leaf.file, _leaf_to_save(leaf, params), record_module)
    return directory


# ----------------------------------------------------------------------------------------------------------
# Random weights (generated by grok1.random_weights)


def write_random_checkpoint(directory: str | os.PathLike, config: ModelConfig, seed: int = 0,
                            record_module: str = "__main__", *,
                            scale_groups: dict[str, int] | None = None) -> Path:
    """Write random weights (see `random_params`) as a released-layout checkpoint; returns `directory`."""
    params = random_params(config, seed, scale_groups=scale_groups)
    return save_checkpoint(directory, params, config, record_module=record_module)
