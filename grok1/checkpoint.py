"""Read and write xAI's released Grok-1 checkpoint layout, safely.

The release is a directory ``ckpt-0/`` of files ``tensor{i:05d}_000``: one pickle per leaf of the reference's
parameter tree, in the order of `grok1.params.reference_leaves`. Large matrices are pickled
``QuantizedWeight8bit`` records (int8 ``weight``, bfloat16 ``scales``) referring to the class as
``__main__.QuantizedWeight8bit`` (the release) or ``model.QuantizedWeight8bit`` (golden sets); the other
leaves are numpy float arrays.

Dtypes travel unchanged both ways: `load_checkpoint` returns each leaf in the dtype its file holds (the release:
bfloat16 embedding and scales, float32 norms and gate; another checkpoint may hold float32 where the release
has bfloat16, or the reverse) and `save_checkpoint` writes each leaf in the dtype it has, so loading and
saving again reproduces the files byte for byte. The model casts each param where it uses it.

Pickles can run arbitrary code, so nothing here calls `pickle.load`: `read_leaf` uses
`grok1.release_pickle`, which admits only int8, float32 and bfloat16 arrays and the record class, and runs
none of numpy's pickle code. Tensor files that are links to outside their directory are refused.

Public API: `CheckpointError`, `QuantizedWeight8bit`, `read_leaf`, `load_checkpoint`, `save_checkpoint`,
`random_params`, `write_random_checkpoint`, `release_dtypes`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

import ml_dtypes
import numpy as np

from grok1.config import ModelConfig
from grok1.params import (
    LAYER_PARAMS,
    QuantizedWeight,
    is_quantised,
    layer_shapes,
    reference_leaves,
    top_shapes,
)
from grok1.params import dequantize as dequantize_weight
from grok1.random_weights import random_params
from grok1.release_pickle import RefusedPickle, ReleasePickler
from grok1.release_pickle import load as load_pickle

CKPT_SUBDIR = "ckpt-0"
RECORD_CLASS_NAME = "QuantizedWeight8bit"
RECORD_MODULES = ("__main__", "model")  # the release's and the golden sets' module for the record class
TENSOR_FILE_RE = re.compile(r"^tensor(\d{5})_(\d{3})$")
_LOAD_THREADS = 4


class CheckpointError(ValueError):
    """A checkpoint file is missing, unexpected, unsafe, corrupt or mis-shaped; the message names it."""


@dataclass
class QuantizedWeight8bit:
    """Local stand-in for the reference's record class: int8 `weight` [..., K, N], `scales` [..., G, N]."""

    weight: Any
    scales: Any

    def __setstate__(self, state):
        # The reference pickles a dataclass: its state is its __dict__. Keys beyond these two are dropped.
        if not isinstance(state, dict) or not {"weight", "scales"} <= state.keys():
            raise RefusedPickle(
                f"{RECORD_CLASS_NAME} state must be a dict with 'weight' and 'scales', got {_describe(state)}")
        self.weight = state["weight"]
        self.scales = state["scales"]


# ----------------------------------------------------------------------------------------------------------
# Reading one file


def read_leaf(path: str | os.PathLike) -> np.ndarray | QuantizedWeight8bit:
    """Unpickle one checkpoint file safely: a numpy array or a `QuantizedWeight8bit` record."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            value = load_pickle(file, {(module, RECORD_CLASS_NAME): QuantizedWeight8bit
                                       for module in RECORD_MODULES})
            trailing = file.read(1)
    except RefusedPickle as err:
        raise CheckpointError(f"{path}: {err}") from err
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from err
    except Exception as err:  # any other failure inside the unpickler means the bytes are not a valid leaf
        raise CheckpointError(f"{path}: truncated or corrupt pickle: {type(err).__name__}: {err}") from err
    if trailing:
        raise CheckpointError(f"{path}: unexpected bytes after the end of the pickle")
    if not isinstance(value, (np.ndarray, QuantizedWeight8bit)):
        raise CheckpointError(f"{path}: expected an array or {RECORD_CLASS_NAME}, got {_describe(value)}")
    if isinstance(value, QuantizedWeight8bit) and not {"weight", "scales"} <= vars(value).keys():
        raise CheckpointError(f"{path}: {RECORD_CLASS_NAME} record without weight and scales")
    return value


def check_inside(file: Path, directory: Path) -> None:
    """Refuse a file that is (or lies under) a link to outside `directory`: a checkpoint names only its own files."""
    real, root = file.resolve(), directory.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(f"{file}: links to {real}, outside the checkpoint directory {root}")


# ----------------------------------------------------------------------------------------------------------
# Loading a checkpoint


class _Leaf(NamedTuple):
    """One expected file: which of our params it fills, and where it is."""

    index: int
    reference_path: str
    name: str
    layer: int | None
    file: Path
    shape: tuple[int, ...]

    @property
    def param(self) -> str:
        ours = self.name if self.layer is None else f"layers.{self.name}[{self.layer}]"
        return f"{self.reference_path} ({ours})"

    @property
    def where(self) -> str:
        return f"{self.param} in {self.file}"


def _expected_leaves(ckpt_dir: Path, config: ModelConfig) -> list[_Leaf]:
    shapes = {**top_shapes(config), **layer_shapes(config)}
    return [_Leaf(i, path, name, layer, ckpt_dir / f"tensor{i:05d}_000", shapes[name])
            for i, (path, name, layer) in enumerate(reference_leaves(config))]


def _resolve_ckpt_dir(directory: str | os.PathLike) -> Path:
    """Accept the directory holding ckpt-0/ or ckpt-0 itself."""
    directory = Path(directory)
    if (directory / CKPT_SUBDIR).is_dir():
        return directory / CKPT_SUBDIR
    if directory.is_dir() and (directory.name == CKPT_SUBDIR or any(_tensor_files(directory))):
        return directory
    raise CheckpointError(f"{directory}: no {CKPT_SUBDIR}/ directory of tensor files found")


def _tensor_files(ckpt_dir: Path) -> Iterator[Path]:
    return (entry for entry in ckpt_dir.iterdir() if TENSOR_FILE_RE.match(entry.name))


def _check_file_set(ckpt_dir: Path, leaves: list[_Leaf]) -> None:
    """Fail before reading anything if a file is missing or one more than the config expects is there."""
    for leaf in leaves:
        if not leaf.file.is_file():
            raise CheckpointError(f"{leaf.where}: file is missing")
        try:
            check_inside(leaf.file, ckpt_dir)
        except CheckpointError as err:
            raise CheckpointError(f"{leaf.param}: {err}") from None
    expected = {leaf.file.name for leaf in leaves}
    extra = sorted(entry.name for entry in _tensor_files(ckpt_dir) if entry.name not in expected)
    if extra:
        raise CheckpointError(f"{ckpt_dir / extra[0]}: unexpected tensor file ({len(extra)} extra in all; "
                              f"the config expects {len(leaves)} leaves)")


def _is_float_dtype(dtype: np.dtype) -> bool:
    return dtype in (np.float32, ml_dtypes.bfloat16)  # the float dtypes of the release (all we read)


def _check_float_array(leaf: _Leaf, value) -> np.ndarray:
    if isinstance(value, QuantizedWeight8bit):
        raise CheckpointError(f"{leaf.where}: expected a plain float array, found a {RECORD_CLASS_NAME} record")
    if not _is_float_dtype(value.dtype):
        raise CheckpointError(f"{leaf.where}: expected a float array, found dtype {value.dtype}")
    _check_shape(leaf, "shape", leaf.shape, value.shape)
    return value


def _check_record(leaf: _Leaf, value) -> tuple[np.ndarray, np.ndarray]:
    """The record's int8 weight [..., K, N] and its float scales [..., G, N] (their own dtype), G dividing K."""
    if not isinstance(value, QuantizedWeight8bit):
        raise CheckpointError(f"{leaf.where}: expected a {RECORD_CLASS_NAME} record (int8 weight + scales), "
                              f"found {_describe(value)}")
    weight, scales = value.weight, value.scales
    if not isinstance(weight, np.ndarray) or weight.dtype != np.int8:
        raise CheckpointError(f"{leaf.where}: record weight must be an int8 array, found {_describe(weight)}")
    if not isinstance(scales, np.ndarray) or not _is_float_dtype(scales.dtype):
        raise CheckpointError(f"{leaf.where}: record scales must be a float array, found {_describe(scales)}")
    _check_shape(leaf, "weight shape", leaf.shape, weight.shape)
    *lead, k, n = leaf.shape
    groups = scales.shape[-2] if scales.ndim == weight.ndim else None
    if groups is None or groups == 0 or k % groups or scales.shape != (*lead, groups, n):
        raise CheckpointError(f"{leaf.where}: scales shape {scales.shape} is not [..., G, N] = "
                              f"{(*lead, 'G', n)} with G dividing K={k}")
    return weight, scales


def _check_shape(leaf: _Leaf, what: str, expected: tuple, actual: tuple) -> None:
    if tuple(actual) != tuple(expected):
        raise CheckpointError(f"{leaf.where}: expected {what} {tuple(expected)}, found {tuple(actual)}")


def _read_checked(leaf: _Leaf, dequantize: bool):
    """Read one file; returns it as it goes into our pytree (a float array or a QuantizedWeight) and the
    shape of its scales (None if not quantised), so the caller can check G agrees across layers."""
    try:
        value = read_leaf(leaf.file)
    except CheckpointError as err:  # read_leaf names the file; add which param it holds
        raise CheckpointError(f"{leaf.param}: {err}") from err
    if not is_quantised(leaf.name):
        return _check_float_array(leaf, value), None
    weight, scales = _check_record(leaf, value)
    quantised = QuantizedWeight(weight=weight, scales=scales)
    if dequantize:
        return dequantize_weight(quantised, dtype=ml_dtypes.bfloat16), scales.shape
    return quantised, scales.shape


def release_dtypes(leaf: _Leaf, value):
    """A leaf as `_read_checked` returns it, cast to the release's dtypes: bfloat16 embedding and scales, float32
    norms and gate (for formats that fix one dtype per param, such as grok1.sliceable)."""
    if isinstance(value, QuantizedWeight):
        return QuantizedWeight(value.weight, value.scales.astype(ml_dtypes.bfloat16, copy=False))
    if is_quantised(leaf.name):  # dequantised on load: already bfloat16
        return value
    return value.astype(ml_dtypes.bfloat16 if leaf.name == "embedding" else np.float32, copy=False)


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
        self.scale_shape: dict[str, tuple[int, ...]] = {}

    def check_groups(self, leaf: _Leaf, scales_shape: tuple[int, ...]) -> None:
        first = self.scale_shape.setdefault(leaf.name, scales_shape)
        if first != scales_shape:
            raise CheckpointError(f"{leaf.where}: scales shape {scales_shape} differs from other layers' "
                                  f"{first}; scale groups G must be equal across layers")

    def put(self, leaf: _Leaf, value) -> None:
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
    def _check_dtype(leaf: _Leaf, what: str, stacked: np.ndarray, value: np.ndarray) -> None:
        """One stacked array has one dtype: a layer stored in another would be silently cast into it."""
        if value.dtype != stacked.dtype:
            raise CheckpointError(f"{leaf.where}: {what}dtype {value.dtype} differs from other layers' "
                                  f"{stacked.dtype}; a param's dtype must be equal across layers")

    def _empty_like(self, one_layer: np.ndarray) -> np.ndarray:
        return np.empty((self.num_layers, *one_layer.shape), one_layer.dtype)

    def result(self) -> dict[str, Any]:
        return {name: self.stacked[name] for name in LAYER_PARAMS}


def load_checkpoint(directory: str | os.PathLike, config: ModelConfig, *, dequantize: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Load a released-layout checkpoint into our stacked params pytree (numpy arrays).

    Returns {"embedding": [V, D], "final_norm": [D], "layers": {name: [L, ...]}}, where quantised params are
    QuantizedWeight(int8 [L, ..., K, N], scales [L, ..., G, N]), or bf16 arrays if `dequantize`. Float leaves
    and scales keep the dtype of their files (the release: bf16 embedding and scales, f32 norms and gate).
    """
    ckpt_dir = _resolve_ckpt_dir(directory)
    leaves = _expected_leaves(ckpt_dir, config)
    _check_file_set(ckpt_dir, leaves)
    top: dict[str, np.ndarray] = {}
    layers = _LayerStack(config.num_layers)

    def read(leaf: _Leaf):
        return (leaf, *_read_checked(leaf, dequantize))

    with ThreadPoolExecutor(_LOAD_THREADS) as pool, _progress_bar(len(leaves), progress) as bar:
        for leaf, value, scales_shape in _ordered_bounded_map(pool, read, leaves, window=2 * _LOAD_THREADS):
            if leaf.layer is None:
                top[leaf.name] = value
            else:
                if scales_shape is not None:
                    layers.check_groups(leaf, scales_shape)
                layers.put(leaf, value)
            bar.update(1)
    return {"embedding": top["embedding"], "final_norm": top["final_norm"], "layers": layers.result()}


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool):
    if not enabled:
        yield _NoProgress()
        return
    from tqdm import tqdm  # only needed when asked for

    with tqdm(total=total, desc="loading checkpoint", unit="tensor", file=sys.stderr) as bar:
        yield bar


class _NoProgress:
    def update(self, n: int) -> None:
        pass


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


def _leaf_to_save(leaf: _Leaf, params: dict[str, Any]):
    """The object to pickle for one leaf: a numpy float array or a QuantizedWeight8bit record, each array in
    the dtype the param has (float32 or bfloat16; nothing is cast, so a loaded checkpoint saves byte for byte).
    """
    value = params[leaf.name] if leaf.layer is None else params["layers"][leaf.name]
    if not is_quantised(leaf.name):
        array = np.asarray(value if leaf.layer is None else value[leaf.layer])
        return np.ascontiguousarray(_check_float_array(leaf, array))
    if not isinstance(value, QuantizedWeight):
        raise CheckpointError(f"{leaf.where}: can only save quantised params as QuantizedWeight, "
                              f"got {_describe(value)}")
    record = QuantizedWeight8bit(weight=np.ascontiguousarray(np.asarray(value.weight[leaf.layer])),
                                 scales=np.ascontiguousarray(np.asarray(value.scales[leaf.layer])))
    weight, scales = _check_record(leaf, record)
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
    leaves = _expected_leaves(ckpt_dir, config)
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


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"array of {value.dtype} {value.shape}"
    return type(value).__name__
