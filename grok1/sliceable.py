"""A sliceable on-disk checkpoint format, from which a process reads only the bytes of its own slices.

The released checkpoint pickles whole tensors, so a process that owns 1/N of the model would still have to
unpickle all of it. `convert` rewrites it, once, as a directory of raw arrays, one per leaf of OUR stacked
params pytree (`grok1.params`), which are then opened as memory maps:

    DST/manifest.json                 {"format": "grok1-sliceable-v1", "config": {ModelConfig fields},
                                       "tensors": {name: {"file": ..., "dtype": ..., "shape": [...]}}}
    DST/embedding.bin                 bfloat16 [V, D]
    DST/final_norm.bin                float32  [D]
    DST/layers.pre_attn_norm.bin      float32  [L, D]            (and the other norms, and layers.router)
    DST/layers.q_proj.weight.bin      int8     [L, D, Hq*K]      (every quantised param: .weight ...)
    DST/layers.q_proj.scales.bin      bfloat16 [L, G, Hq*K]      (... and .scales)

Each file is the C-order, little-endian bytes of its array and nothing else. Leaf names are the pytree paths
joined by dots (`leaf_name`), so writer and reader agree by construction. The manifest is written last (to a
temporary name, then renamed): a directory without one is an unfinished conversion and is refused. Every
file is written under a temporary name and renamed into place, so a process that still maps the files of
a previous conversion keeps reading them unchanged. Tensor files are plain names in DST, not links out of it.

Public API: `FORMAT`, `MANIFEST`, `leaf_name`, `leaf_names`, `convert`, `is_sliceable`, `open_sliceable`,
`load_sliceable`, `load_sharded`, `sliceable_bytes`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

# Internal helpers of the released-layout loader, reused so that conversion checks and converts every leaf
# exactly as `load_checkpoint` does (same errors; dtypes then cast to the release's, which the format fixes).
from grok1.checkpoint import (
    CheckpointError,
    _check_file_set,
    _expected_leaves,
    _Leaf,
    _read_checked,
    _resolve_ckpt_dir,
    check_inside,
    release_dtypes,
)
from grok1.config import ModelConfig
from grok1.params import LAYER_PARAMS, TOP_PARAMS, QuantizedWeight, is_quantised, layer_shapes, top_shapes

FORMAT = "grok1-sliceable-v1"
MANIFEST = "manifest.json"
_SUFFIX = ".bin"
_CONVERT_THREADS = 4  # leaves read (unpickled) and written at once; bounds conversion memory to ~4 leaves

_DTYPES: dict[str, np.dtype] = {
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


def _template(config: ModelConfig) -> dict[str, Any]:
    """Our params tree (quantised params as QuantizedWeight) whose leaves are their names."""
    skeleton = {name: 0 for name in TOP_PARAMS}
    skeleton["layers"] = {name: QuantizedWeight(0, 0) if spec.quantised else 0
                          for name, spec in LAYER_PARAMS.items()}
    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path), skeleton)


def _stacked_name(name: str, part: str | None = None) -> str:
    """Name of our leaf a released leaf (or its record's `part`) goes into; agrees with `_template`."""
    prefix = None if name in TOP_PARAMS else "layers"
    return ".".join(p for p in (prefix, name, part) if p is not None)


def _dtype_name(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name} for the sliceable format")
    return name


def _little_endian_bytes(array: np.ndarray) -> memoryview:
    """The C-order little-endian bytes of `array` (no copy on little-endian hosts for contiguous arrays)."""
    array = np.ascontiguousarray(array)
    if array.dtype.itemsize > 1:
        array = array.view(f"u{array.dtype.itemsize}").astype(f"<u{array.dtype.itemsize}", copy=False)
    return memoryview(array.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------------------------------------
# Writing (conversion from the released layout)


class _StackedFile:
    """One output file holding `slots` arrays of `slot_shape` back to back (the stacked [L, ...] array),
    created at full size (sparse) under a temporary name when its first slot arrives; `commit` renames it."""

    def __init__(self, path: Path, slot_shape: tuple[int, ...], slots: int | None, dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.shape = slot_shape if slots is None else (slots, *slot_shape)  # the array the file holds
        self.slot_bytes = math.prod(slot_shape) * self.dtype.itemsize
        # Never truncate `path` itself: another process may have it mapped (SIGBUS, or new bytes under it).
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        with os.fdopen(fd, "wb") as file:
            file.truncate(self.slot_bytes * (slots or 1))

    def write(self, slot: int, array: np.ndarray) -> None:
        data = _little_endian_bytes(array)
        if len(data) != self.slot_bytes:  # cannot happen after _read_checked's shape checks
            raise CheckpointError(f"{self.path}: slot {slot} takes {self.slot_bytes} bytes, got {len(data)}")
        with open(self.tmp, "r+b") as file:
            file.seek(slot * self.slot_bytes)
            file.write(data)

    def commit(self) -> None:
        _fsync(self.tmp)
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


class _Writer:
    """Routes each checked released leaf into its slot of the stacked output files (thread-safe)."""

    def __init__(self, dst: Path, config: ModelConfig):
        self.dst, self.num_layers = dst, config.num_layers
        self.files: dict[str, _StackedFile] = {}
        self.scales_shape: dict[str, tuple[int, ...]] = {}
        self.lock = threading.Lock()

    def _file(self, name: str, slot_shape: tuple[int, ...], slots: int | None, dtype) -> _StackedFile:
        with self.lock:
            if name not in self.files:
                self.files[name] = _StackedFile(self.dst / (name + _SUFFIX), slot_shape, slots, dtype)
            return self.files[name]

    def put(self, leaf: _Leaf, value, scales_shape: tuple[int, ...] | None) -> None:
        if leaf.layer is None:
            self._file(_stacked_name(leaf.name), value.shape, None, value.dtype).write(0, value)
            return
        parts = [(None, value)]
        if isinstance(value, QuantizedWeight):
            with self.lock:
                first = self.scales_shape.setdefault(leaf.name, scales_shape)
            if first != scales_shape:
                raise CheckpointError(f"{leaf.where}: scales shape {scales_shape} differs from other layers' "
                                      f"{first}; scale groups G must be equal across layers")
            parts = [("weight", value.weight), ("scales", value.scales)]
        for part, array in parts:
            name = _stacked_name(leaf.name, part)
            self._file(name, array.shape, self.num_layers, array.dtype).write(leaf.layer, array)

    def manifest(self, config: ModelConfig) -> dict[str, Any]:
        tensors = {}
        for name in leaf_names(_template(config)):
            stacked = self.files[name]
            tensors[name] = {"file": stacked.path.name, "dtype": _dtype_name(stacked.dtype),
                             "shape": list(stacked.shape)}
        return {"format": FORMAT, "config": dataclasses.asdict(config), "tensors": tensors}


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on every platform
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as file:
        json.dump(data, file, indent=1)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    _fsync(path.parent)


def convert(src: str | os.PathLike, dst: str | os.PathLike, config: ModelConfig, *,
            progress: bool = False) -> Path:
    """Convert a released-layout checkpoint (`src`: the directory holding ckpt-0/, or ckpt-0 itself) into the
    sliceable format at `dst` (created if needed; a previous conversion there is overwritten).

    Streams: each released leaf is read, checked as `load_checkpoint` checks it, written into its layer's slot
    of the preallocated stacked file and dropped, so at most a few leaves are in memory at once. The manifest
    is written last. Returns `dst`.
    """
    config.validate()
    ckpt_dir = _resolve_ckpt_dir(src)
    leaves = _expected_leaves(ckpt_dir, config)
    _check_file_set(ckpt_dir, leaves)  # fail before writing anything
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)  # from here until the end, dst is not loadable
    writer = _Writer(dst, config)

    def convert_leaf(leaf: _Leaf) -> None:
        value, scales_shape = _read_checked(leaf, dequantize=False)
        writer.put(leaf, release_dtypes(leaf, value), scales_shape)  # the format fixes each param's dtype

    try:
        with ThreadPoolExecutor(_CONVERT_THREADS) as pool, \
                _progress_bar(len(leaves), progress, "converting") as bar:
            futures = [pool.submit(convert_leaf, leaf) for leaf in leaves]  # each holds memory only while it runs
            try:
                for future in futures:
                    future.result()
                    bar.update(1)
            finally:
                for future in futures:
                    future.cancel()
        manifest = writer.manifest(config)
        for stacked in writer.files.values():
            stacked.commit()
    finally:
        for stacked in writer.files.values():
            stacked.discard()  # a no-op after a commit; after a failure, removes the temporary file
    _write_json_atomically(dst / MANIFEST, manifest)
    return dst


# ----------------------------------------------------------------------------------------------------------
# Reading


def is_sliceable(directory: str | os.PathLike) -> bool:
    """True if `directory` holds a finished sliceable checkpoint (a manifest of this format)."""
    try:
        with open(Path(directory) / MANIFEST) as file:
            return json.load(file).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: no manifest; not a sliceable checkpoint (or an unfinished conversion)")
    check_inside(path, directory)
    try:
        with open(path) as file:
            manifest = json.load(file)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable manifest: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    for key in ("config", "tensors"):
        if not isinstance(manifest.get(key), dict):
            raise CheckpointError(f"{path}: manifest has no {key!r} mapping")
    return manifest


def _check_config(path: Path, stored: dict[str, Any], config: ModelConfig) -> None:
    expected = dataclasses.asdict(config)
    for key in sorted(expected.keys() | stored.keys()):
        if key not in stored:
            raise CheckpointError(f"{path}: config field model.{key} is missing from the manifest")
        if key not in expected:
            raise CheckpointError(f"{path}: unknown config field model.{key} in the manifest")
        if stored[key] != expected[key]:
            raise CheckpointError(f"{path}: config field model.{key} is {stored[key]!r} in the checkpoint "
                                  f"but {expected[key]!r} in the given config")


def _expected_specs(config: ModelConfig) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape) of every leaf; a scales shape has None for its group count G."""
    num_layers = config.num_layers
    specs: dict[str, tuple[str, tuple]] = {
        "embedding": ("bfloat16", top_shapes(config)["embedding"]),
        "final_norm": ("float32", top_shapes(config)["final_norm"]),
    }
    for name, shape in layer_shapes(config).items():
        if is_quantised(name):
            specs[_stacked_name(name, "weight")] = ("int8", (num_layers, *shape))
            specs[_stacked_name(name, "scales")] = ("bfloat16", (num_layers, *shape[:-2], None, shape[-1]))
        else:
            specs[_stacked_name(name)] = ("float32", (num_layers, *shape))
    return specs


def _tensor_file(path: Path, name: str, entry: Any) -> Path:
    """The file of one manifest entry: a plain name in the manifest's directory, not a link out of it."""
    if not isinstance(entry, dict) or not {"file", "dtype", "shape"} <= entry.keys():
        raise CheckpointError(f"{path}: tensor {name}: entry must have file, dtype and shape")
    file = entry["file"]
    if not isinstance(file, str) or not file or Path(file).name != file or file in (".", ".."):
        raise CheckpointError(f"{path}: tensor {name}: file must be a plain file name, got {file!r}")
    check_inside(path.parent / file, path.parent)
    return path.parent / file


def _check_tensor(path: Path, name: str, entry: Any, dtype: str, shape: tuple) -> tuple[Path, tuple[int, ...]]:
    """The file and shape of one manifest entry, after checking them against the config."""
    file = _tensor_file(path, name, entry)
    if entry["dtype"] != dtype:
        raise CheckpointError(f"{path}: tensor {name}: dtype is {entry['dtype']!r}, expected {dtype!r}")
    found = entry["shape"]
    if (not isinstance(found, list) or len(found) != len(shape)
            or not all(isinstance(n, int) and n > 0 for n in found)
            or any(e is not None and e != n for e, n in zip(shape, found))):
        raise CheckpointError(f"{path}: tensor {name}: shape {found!r} does not match the config's "
                              f"{[('G' if e is None else e) for e in shape]}")
    return file, tuple(found)


def open_sliceable(directory: str | os.PathLike, config: ModelConfig) -> dict[str, Any]:
    """Open a sliceable checkpoint as our params pytree of read-only `np.memmap`s (nothing is read yet).

    Checks the manifest's format, that its config equals `config` (the error names the differing field),
    every tensor's dtype and shape against the config, and every file's size (the error names the file).
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    path = directory / MANIFEST
    _check_config(path, manifest["config"], config)
    tensors = manifest["tensors"]
    template = _template(config)
    names = leaf_names(template)
    specs = _expected_specs(config)
    assert set(specs) == set(names), "internal: _expected_specs disagrees with _template"
    missing = [name for name in names if name not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise CheckpointError(f"{path}: tensors " + (f"missing: {', '.join(missing)}" if missing else "")
                              + ("; " if missing and extra else "")
                              + (f"unexpected: {', '.join(extra)}" if extra else ""))
    checked = {}  # the whole manifest first, then the files
    for name in names:
        dtype, expected_shape = specs[name]
        file, shape = _check_tensor(path, name, tensors[name], dtype, expected_shape)
        if name.endswith(".scales"):
            k = specs[name[: -len("scales")] + "weight"][1][-2]
            if k % shape[-2]:
                raise CheckpointError(f"{path}: tensor {name}: {shape[-2]} scale groups do not divide K={k}")
        checked[name] = (dtype, file, shape)
    maps: dict[str, np.memmap] = {}
    for name, (dtype, file, shape) in checked.items():
        itemsize = _DTYPES[dtype].itemsize
        expected_bytes = math.prod(shape) * itemsize
        try:
            size = file.stat().st_size
        except OSError as err:
            raise CheckpointError(f"{file}: cannot read tensor {name}: {err}") from err
        if size != expected_bytes:
            raise CheckpointError(f"{file}: size is {size} bytes, expected {expected_bytes} "
                                  f"({dtype} {list(shape)}) for tensor {name}")
        maps[name] = np.memmap(file, dtype=_DTYPES[dtype], mode="r", shape=shape)
    return jax.tree.map(lambda name: maps[name], template)


def load_sliceable(directory: str | os.PathLike, config: ModelConfig) -> dict[str, Any]:
    """A sliceable checkpoint fully read into memory: our params pytree of plain numpy arrays."""
    return jax.tree.map(np.array, open_sliceable(directory, config))


def load_sharded(directory: str | os.PathLike, config: ModelConfig, shardings, *,
                 progress: bool = False) -> dict[str, Any]:
    """Our params pytree of `jax.Array`s laid out by `shardings` (a pytree of the same structure whose leaves
    are `jax.sharding.Sharding`s, or one Sharding for every leaf).

    Each process reads from disk only the slices its addressable devices hold.
    """
    maps = open_sliceable(directory, config)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, maps)
    names = leaf_names(maps)
    flat_maps, treedef = jax.tree.flatten(maps)
    try:
        flat_shardings = treedef.flatten_up_to(shardings)
    except (ValueError, TypeError) as err:
        raise ValueError(f"shardings must have the structure of the params pytree: {err}") from err
    arrays = []
    with _progress_bar(len(flat_maps), progress, "loading shards") as bar:
        for name, memmap, sharding in zip(names, flat_maps, flat_shardings):
            if not isinstance(sharding, jax.sharding.Sharding):
                raise ValueError(f"shardings.{name}: expected a jax.sharding.Sharding, got "
                                 f"{type(sharding).__name__}")

            def read(index, memmap=memmap):
                return np.asarray(memmap[index])

            arrays.append(jax.make_array_from_callback(memmap.shape, sharding, read, dtype=memmap.dtype))
            bar.update(1)
    return jax.tree.unflatten(treedef, arrays)


def sliceable_bytes(directory: str | os.PathLike) -> int:
    """Bytes of all tensor files listed in the manifest (checked as `open_sliceable` checks their names)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    path, total = directory / MANIFEST, 0
    for name, entry in manifest["tensors"].items():
        file = _tensor_file(path, name, entry)
        try:
            total += file.stat().st_size
        except OSError as err:
            raise CheckpointError(f"{file}: cannot read tensor {name}: {err}") from err
    return total


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        yield _NoProgress()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr) as bar:
        yield bar


class _NoProgress:
    def update(self, n: int) -> None:
        pass
