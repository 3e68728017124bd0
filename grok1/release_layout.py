"""xAI's released Grok-1 checkpoint layout, leaf by leaf: the file set, the record class, safe reading of one
file and the checks each leaf passes, shared by the whole-checkpoint reader and writer (`grok1.checkpoint`)
and the converter to the sliceable format (`grok1.sliceable_convert`).

The release is a directory ``ckpt-0/`` of files ``tensor{i:05d}_000``: one pickle per leaf of the reference's
parameter tree, in the order of `grok1.params.reference_leaves`. Large matrices are pickled
``QuantizedWeight8bit`` records (int8 ``weight``, bfloat16 ``scales``) referring to the class as
``__main__.QuantizedWeight8bit`` (the release) or ``model.QuantizedWeight8bit`` (golden sets); the other
leaves are numpy float arrays.

Pickles can run arbitrary code, so nothing here calls `pickle.load`: `read_leaf` uses
`grok1.release_pickle`, which admits only int8, float32 and bfloat16 arrays and the record class, and runs
none of numpy's pickle code. Tensor files that are links to outside their directory are refused.

Public API: `CheckpointError`, `QuantizedWeight8bit`, `read_leaf`, `check_inside`, `Leaf`, `expected_leaves`,
`resolve_ckpt_dir`, `check_file_set`, `check_float_array`, `check_record`, `read_checked`, `ScaleGroups`,
`release_dtypes`, `describe`.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import ml_dtypes
import numpy as np

from grok1.config import ModelConfig
from grok1.params import QuantizedWeight, is_quantised, layer_shapes, reference_leaves, top_shapes
from grok1.params import dequantize as dequantize_weight
from grok1.release_pickle import RefusedPickle
from grok1.release_pickle import load as load_pickle

CKPT_SUBDIR = "ckpt-0"
RECORD_CLASS_NAME = "QuantizedWeight8bit"
RECORD_MODULES = ("__main__", "model")  # the release's and the golden sets' module for the record class
TENSOR_FILE_RE = re.compile(r"^tensor(\d{5})_(\d{3})$")


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
                f"{RECORD_CLASS_NAME} state must be a dict with 'weight' and 'scales', got {describe(state)}")
        self.weight = state["weight"]
        self.scales = state["scales"]


def describe(value) -> str:
    """A value as an error message names it: an array by dtype and shape, anything else by type."""
    if isinstance(value, np.ndarray):
        return f"array of {value.dtype} {value.shape}"
    return type(value).__name__


# ----------------------------------------------------------------------------------------------------------
# One file


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
        raise CheckpointError(f"{path}: expected an array or {RECORD_CLASS_NAME}, got {describe(value)}")
    if isinstance(value, QuantizedWeight8bit) and not {"weight", "scales"} <= vars(value).keys():
        raise CheckpointError(f"{path}: {RECORD_CLASS_NAME} record without weight and scales")
    return value


def check_inside(file: Path, directory: Path) -> None:
    """Refuse a file that is (or lies under) a link to outside `directory`: a checkpoint names only its own files."""
    real, root = file.resolve(), directory.resolve()
    if not real.is_relative_to(root):
        raise CheckpointError(f"{file}: links to {real}, outside the checkpoint directory {root}")


# ----------------------------------------------------------------------------------------------------------
# The file set


class Leaf(NamedTuple):
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


def expected_leaves(ckpt_dir: Path, config: ModelConfig) -> list[Leaf]:
    """Every file a checkpoint of `config` has in `ckpt_dir`, in the release's order."""
    shapes = {**top_shapes(config), **layer_shapes(config)}
    return [Leaf(i, path, name, layer, ckpt_dir / f"tensor{i:05d}_000", shapes[name])
            for i, (path, name, layer) in enumerate(reference_leaves(config))]


def resolve_ckpt_dir(directory: str | os.PathLike) -> Path:
    """Accept the directory holding ckpt-0/ or ckpt-0 itself."""
    directory = Path(directory)
    if (directory / CKPT_SUBDIR).is_dir():
        return directory / CKPT_SUBDIR
    if directory.is_dir() and (directory.name == CKPT_SUBDIR or any(_tensor_files(directory))):
        return directory
    raise CheckpointError(f"{directory}: no {CKPT_SUBDIR}/ directory of tensor files found")


def _tensor_files(ckpt_dir: Path) -> Iterator[Path]:
    return (entry for entry in ckpt_dir.iterdir() if TENSOR_FILE_RE.match(entry.name))


def check_file_set(ckpt_dir: Path, leaves: list[Leaf]) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# The checks each leaf passes


def _is_float_dtype(dtype: np.dtype) -> bool:
    return dtype in (np.float32, ml_dtypes.bfloat16)  # the float dtypes of the release (all we read)


def check_float_array(leaf: Leaf, value) -> np.ndarray:
    """`value` if it is a float array of the leaf's shape (in either of the release's float dtypes)."""
    if isinstance(value, QuantizedWeight8bit):
        raise CheckpointError(f"{leaf.where}: expected a plain float array, found a {RECORD_CLASS_NAME} record")
    if not _is_float_dtype(value.dtype):
        raise CheckpointError(f"{leaf.where}: expected a float array, found dtype {value.dtype}")
    _check_shape(leaf, "shape", leaf.shape, value.shape)
    return value


def check_record(leaf: Leaf, value) -> tuple[np.ndarray, np.ndarray]:
    """The record's int8 weight [..., K, N] and its float scales [..., G, N] (their own dtype), G dividing K."""
    if not isinstance(value, QuantizedWeight8bit):
        raise CheckpointError(f"{leaf.where}: expected a {RECORD_CLASS_NAME} record (int8 weight + scales), "
                              f"found {describe(value)}")
    weight, scales = value.weight, value.scales
    if not isinstance(weight, np.ndarray) or weight.dtype != np.int8:
        raise CheckpointError(f"{leaf.where}: record weight must be an int8 array, found {describe(weight)}")
    if not isinstance(scales, np.ndarray) or not _is_float_dtype(scales.dtype):
        raise CheckpointError(f"{leaf.where}: record scales must be a float array, found {describe(scales)}")
    _check_shape(leaf, "weight shape", leaf.shape, weight.shape)
    *lead, k, n = leaf.shape
    groups = scales.shape[-2] if scales.ndim == weight.ndim else None
    if groups is None or groups == 0 or k % groups or scales.shape != (*lead, groups, n):
        raise CheckpointError(f"{leaf.where}: scales shape {scales.shape} is not [..., G, N] = "
                              f"{(*lead, 'G', n)} with G dividing K={k}")
    return weight, scales


def _check_shape(leaf: Leaf, what: str, expected: tuple, actual: tuple) -> None:
    if tuple(actual) != tuple(expected):
        raise CheckpointError(f"{leaf.where}: expected {what} {tuple(expected)}, found {tuple(actual)}")


def read_checked(leaf: Leaf, dequantize: bool):
    """Read one file; returns it as it goes into our pytree (a float array or a QuantizedWeight) and the
    shape of its scales (None if not quantised), so the caller can check G agrees across layers."""
    try:
        value = read_leaf(leaf.file)
    except CheckpointError as err:  # read_leaf names the file; add which param it holds
        raise CheckpointError(f"{leaf.param}: {err}") from err
    if not is_quantised(leaf.name):
        return check_float_array(leaf, value), None
    weight, scales = check_record(leaf, value)
    quantised = QuantizedWeight(weight=weight, scales=scales)
    if dequantize:
        return dequantize_weight(quantised, dtype=ml_dtypes.bfloat16), scales.shape
    return quantised, scales.shape


class ScaleGroups:
    """Checks that each quantised param's scales have one shape across layers, so one group count G
    (safe to call from several reader threads)."""

    def __init__(self):
        self._first: dict[str, tuple[int, ...]] = {}
        self._lock = threading.Lock()

    def check(self, leaf: Leaf, scales_shape: tuple[int, ...]) -> None:
        with self._lock:
            first = self._first.setdefault(leaf.name, scales_shape)
        if first != scales_shape:
            raise CheckpointError(f"{leaf.where}: scales shape {scales_shape} differs from other layers' "
                                  f"{first}; scale groups G must be equal across layers")


def release_dtypes(leaf: Leaf, value):
    """A leaf as `read_checked` returns it, cast to the release's dtypes: bfloat16 embedding and scales, float32
    norms and gate (for formats that fix one dtype per param, such as grok1.sliceable_format)."""
    if isinstance(value, QuantizedWeight):
        return QuantizedWeight(value.weight, value.scales.astype(ml_dtypes.bfloat16, copy=False))
    if is_quantised(leaf.name):  # dequantised on load: already bfloat16
        return value
    return value.astype(ml_dtypes.bfloat16 if leaf.name == "embedding" else np.float32, copy=False)
