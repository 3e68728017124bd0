"""Read and write xAI's released Grok-1 checkpoint layout, safely.

The release is a directory ``ckpt-0/`` of files ``tensor{i:05d}_000``: one pickle per leaf of the reference's
parameter tree, in the order of `grok1.params.reference_leaves`. Large matrices are pickled
``QuantizedWeight8bit`` records (int8 ``weight``, bfloat16 ``scales``) referring to the class as
``__main__.QuantizedWeight8bit`` (the release) or ``model.QuantizedWeight8bit`` (golden sets); the other
leaves are numpy float arrays.

Pickles can run arbitrary code, so nothing here calls `pickle.load`: `read_leaf` uses an unpickler that
admits only numpy array reconstruction, ml_dtypes scalar types and the record class.

Public API: `CheckpointError`, `QuantizedWeight8bit`, `read_leaf`, `load_checkpoint`, `save_checkpoint`,
`random_params`, `write_random_checkpoint`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import pickle
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

try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _multiarray

CKPT_SUBDIR = "ckpt-0"
RECORD_CLASS_NAME = "QuantizedWeight8bit"
RECORD_MODULES = ("__main__", "model")  # the release's and the golden sets' module for the record class
PICKLE_PROTOCOL = 4  # what the reference's `pickle.dump` wrote (Python 3.10 default)
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
            raise pickle.UnpicklingError(
                f"{RECORD_CLASS_NAME} state must be a dict with 'weight' and 'scales', got {_describe(state)}")
        self.weight = state["weight"]
        self.scales = state["scales"]


# ----------------------------------------------------------------------------------------------------------
# Reading one file


def _ml_dtypes_scalar_types() -> dict[str, type]:
    return {name: value for name, value in vars(ml_dtypes).items()
            if isinstance(value, type) and issubclass(value, np.generic)}


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Every (module, name) a checkpoint pickle may refer to, and the object it resolves to."""
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; both mean the same functions.
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _multiarray._reconstruct
        allowed[(module, "scalar")] = _multiarray.scalar
    for name, scalar_type in _ml_dtypes_scalar_types().items():
        allowed[("ml_dtypes", name)] = scalar_type
    for module in RECORD_MODULES:
        allowed[(module, RECORD_CLASS_NAME)] = QuantizedWeight8bit
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of `_allowed_globals`; anything else (os.system, ...) is refused."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise CheckpointError(f"{self._source}: refused to load global {module}.{name} "
                                  "(not an array, dtype or QuantizedWeight8bit)") from None

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._source}: refused persistent id {pid!r}")


def read_leaf(path: str | os.PathLike) -> np.ndarray | QuantizedWeight8bit:
    """Unpickle one checkpoint file safely: a numpy array or a `QuantizedWeight8bit` record."""
    path = Path(path)
    try:
        with open(path, "rb") as file:
            value = _RestrictedUnpickler(file, str(path)).load()
            trailing = file.read(1)
    except CheckpointError:
        raise
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err}") from err
    except Exception as err:  # any other failure inside the unpickler means the bytes are not a valid leaf
        raise CheckpointError(f"{path}: truncated or corrupt pickle: {type(err).__name__}: {err}") from err
    if trailing:
        raise CheckpointError(f"{path}: unexpected bytes after the end of the pickle")
    if not isinstance(value, (np.ndarray, QuantizedWeight8bit)):
        raise CheckpointError(f"{path}: expected an array or {RECORD_CLASS_NAME}, got {_describe(value)}")
    return value


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
    expected = {leaf.file.name for leaf in leaves}
    extra = sorted(entry.name for entry in _tensor_files(ckpt_dir) if entry.name not in expected)
    if extra:
        raise CheckpointError(f"{ckpt_dir / extra[0]}: unexpected tensor file ({len(extra)} extra in all; "
                              f"the config expects {len(leaves)} leaves)")


def _is_float_dtype(dtype: np.dtype) -> bool:
    return dtype.kind == "f" or dtype.type in _ML_FLOAT_TYPES


_ML_FLOAT_TYPES = frozenset(t for name, t in _ml_dtypes_scalar_types().items()
                            if name.startswith(("float", "bfloat")))


def _check_float_array(leaf: _Leaf, value) -> np.ndarray:
    if isinstance(value, QuantizedWeight8bit):
        raise CheckpointError(f"{leaf.where}: expected a plain float array, found a {RECORD_CLASS_NAME} record")
    if not _is_float_dtype(value.dtype):
        raise CheckpointError(f"{leaf.where}: expected a float array, found dtype {value.dtype}")
    _check_shape(leaf, "shape", leaf.shape, value.shape)
    return value


def _check_record(leaf: _Leaf, value) -> tuple[np.ndarray, np.ndarray]:
    """The record's int8 weight [..., K, N] and its scales [..., G, N] as bfloat16, G dividing K."""
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
    return weight, scales.astype(ml_dtypes.bfloat16, copy=False)


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
        target = ml_dtypes.bfloat16 if leaf.name == "embedding" else np.float32
        return _check_float_array(leaf, value).astype(target, copy=False), None
    weight, scales = _check_record(leaf, value)
    quantised = QuantizedWeight(weight=weight, scales=scales)
    if dequantize:
        return dequantize_weight(quantised, dtype=ml_dtypes.bfloat16), scales.shape
    return quantised, scales.shape


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
            self.stacked[leaf.name].weight[leaf.layer] = value.weight
            self.stacked[leaf.name].scales[leaf.layer] = value.scales
        else:
            if leaf.name not in self.stacked:
                self.stacked[leaf.name] = self._empty_like(value)
            self.stacked[leaf.name][leaf.layer] = value

    def _empty_like(self, one_layer: np.ndarray) -> np.ndarray:
        return np.empty((self.num_layers, *one_layer.shape), one_layer.dtype)

    def result(self) -> dict[str, Any]:
        return {name: self.stacked[name] for name in LAYER_PARAMS}


def load_checkpoint(directory: str | os.PathLike, config: ModelConfig, *, dequantize: bool = False,
                    progress: bool = False) -> dict[str, Any]:
    """Load a released-layout checkpoint into our stacked params pytree (numpy arrays).

    Returns {"embedding": bf16 [V, D], "final_norm": f32 [D], "layers": {name: [L, ...]}}, where quantised
    params are QuantizedWeight(int8 [L, ..., K, N], bf16 [L, ..., G, N]), or bf16 arrays if `dequantize`.
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


class _ReleasePickler(pickle._Pickler):
    """Pickles exactly as the reference did (numpy 1.x, `model.py` loaded as a module or __main__).

    The pure-Python pickler is used because only it lets us choose the module a global is written under:
    numpy 2 would write numpy._core (unreadable by numpy < 1.26), and our record class lives in
    grok1.checkpoint, not in `__main__`/`model`. No module is registered in sys.modules for this.
    """

    def __init__(self, file, record_module: str):
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._renamed = [
            (_multiarray._reconstruct, "numpy.core.multiarray", "_reconstruct"),
            (_multiarray.scalar, "numpy.core.multiarray", "scalar"),
            (QuantizedWeight8bit, record_module, RECORD_CLASS_NAME),
        ]

    def save_global(self, obj, name=None):
        for renamed_obj, module_name, global_name in self._renamed:
            if obj is renamed_obj:
                self.save(module_name)
                self.save(global_name)
                self.write(pickle.STACK_GLOBAL)
                self.memoize(obj)
                return
        super().save_global(obj, name)


def _write_leaf(path: Path, value, record_module: str) -> None:
    """Write one pickle under a temporary name, then rename, so a crash never leaves a half file at `path`."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            _ReleasePickler(file, record_module).dump(value)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _leaf_to_save(leaf: _Leaf, params: dict[str, Any]):
    """The object to pickle for one leaf: a numpy float array or a QuantizedWeight8bit record."""
    value = params[leaf.name] if leaf.layer is None else params["layers"][leaf.name]
    if not is_quantised(leaf.name):
        array = np.asarray(value if leaf.layer is None else value[leaf.layer])
        if leaf.name != "embedding":  # the release's norms and router are float32
            array = array.astype(np.float32, copy=False)
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
# Random weights


_NORM_JITTER = 0.1  # norm scales are 1 +- this, as in the golden set (the reference initialises them to 0)
_TARGET_LOGIT_STD = 3.0  # final norm is chosen so logits are peaked but finite (golden set: about 2.6)
_EMBEDDING_CHUNK_ROWS = 8192


def _validated_scale_groups(config: ModelConfig, scale_groups: dict[str, int] | None) -> dict[str, int]:
    shapes = layer_shapes(config)
    groups = {name: 1 for name in shapes if is_quantised(name)}
    for name, count in (scale_groups or {}).items():
        if name not in groups:
            raise ValueError(f"scale_groups: {name!r} is not a quantised param (one of {sorted(groups)})")
        k = shapes[name][-2]
        if not isinstance(count, int) or count <= 0 or k % count:
            raise ValueError(f"scale_groups[{name!r}] = {count!r} must be a positive divisor of K={k}")
        groups[name] = count
    return groups


def _random_quantised(rng: np.random.Generator, shape: tuple[int, ...], groups: int):
    """int8 uniform in [-127, 127] with per-output-channel scales so that x @ w keeps x's scale."""
    *lead, k, n = shape
    weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
    # Uniform ints in [-127, 127] have std 127/sqrt(3); dividing by that and sqrt(K) gives unit gain.
    base = math.sqrt(3.0) / (127.0 * math.sqrt(k))
    jitter = rng.uniform(0.9, 1.1, size=(*lead, groups, n)).astype(np.float32)
    return weight, (base * jitter).astype(ml_dtypes.bfloat16)


def _random_layer_leaf(rng: np.random.Generator, name: str, shape: tuple[int, ...], config: ModelConfig):
    if name == "router":
        return (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(config.emb_size)).astype(np.float32)
    return (1.0 + _NORM_JITTER * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _random_embedding(rng: np.random.Generator, config: ModelConfig) -> np.ndarray:
    """N(0, 1) * init scale / embedding multiplier, so the model's scaled input has unit scale."""
    std = config.embedding_init_scale / config.embedding_multiplier_scale
    embedding = np.empty((config.vocab_size, config.emb_size), ml_dtypes.bfloat16)
    for start in range(0, config.vocab_size, _EMBEDDING_CHUNK_ROWS):  # chunks: no full float32 copy
        rows = min(_EMBEDDING_CHUNK_ROWS, config.vocab_size - start)
        chunk = rng.standard_normal((rows, config.emb_size), dtype=np.float32) * np.float32(std)
        embedding[start:start + rows] = chunk.astype(ml_dtypes.bfloat16)
    return embedding


def _final_norm_scale(config: ModelConfig) -> float:
    """Logit std = scale * embedding std * sqrt(D) * output multiplier; pick the scale for the target."""
    embedding_std = config.embedding_init_scale / config.embedding_multiplier_scale
    return _TARGET_LOGIT_STD / (embedding_std * math.sqrt(config.emb_size) * config.output_multiplier_scale)


def random_params(config: ModelConfig, seed: int = 0, *,
                  scale_groups: dict[str, int] | None = None) -> dict[str, Any]:
    """Random weights in our stacked pytree (numpy), quantised like the release.

    `scale_groups` maps a quantised param (e.g. "ffn_out", "o_proj") to its number of scale groups G > 1.
    """
    groups = _validated_scale_groups(config, scale_groups)
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(config)
    num_layers = config.num_layers
    layers: dict[str, Any] = {}
    for name, shape in shapes.items():
        if is_quantised(name):
            scales_shape = (*shape[:-2], groups[name], shape[-1])
            layers[name] = QuantizedWeight(np.empty((num_layers, *shape), np.int8),
                                           np.empty((num_layers, *scales_shape), ml_dtypes.bfloat16))
        else:
            layers[name] = np.empty((num_layers, *shape), np.float32)
    for layer in range(num_layers):  # one layer at a time: no temporaries larger than a layer
        for name, shape in shapes.items():
            if is_quantised(name):
                layers[name].weight[layer], layers[name].scales[layer] = _random_quantised(rng, shape,
                                                                                           groups[name])
            else:
                layers[name][layer] = _random_layer_leaf(rng, name, shape, config)
    embedding = _random_embedding(rng, config)
    final_norm = (_final_norm_scale(config)
                  * (1.0 + 0.01 * rng.standard_normal(config.emb_size, dtype=np.float32))).astype(np.float32)
    return {"embedding": embedding, "final_norm": final_norm, "layers": layers}


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
