"""Reading the sliceable checkpoint format (`grok1.sliceable_format`): memory maps of every tensor, checked
against the config, from which a process reads only the bytes of its own slices.

Public API: `is_sliceable`, `open_sliceable`, `load_sliceable`, `load_sharded`, `sliceable_bytes`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grok1.config import ModelConfig
from grok1.progress import progress_bar
from grok1.release_layout import CheckpointError, check_inside
from grok1.sliceable_format import DTYPES, FORMAT, MANIFEST, expected_specs, leaf_names, name_tree


def is_sliceable(directory: str | os.PathLike) -> bool:
    """True if `directory` holds a finished sliceable checkpoint (a manifest of this format)."""
    try:
        with open(Path(directory) / MANIFEST) as file:
            found = json.load(file).get("format")  # any version: an older one is refused by name when read
            return isinstance(found, str) and found.startswith(FORMAT.rsplit("-", 1)[0] + "-")
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
        raise CheckpointError(f"{path}: format is {found!r}, expected {FORMAT!r}; convert the released checkpoint "
                              "again with `grok1 checkpoint convert`")
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
    tree = name_tree(config)
    names = leaf_names(tree)
    specs = expected_specs(config)
    assert set(specs) == set(names), "internal: expected_specs disagrees with name_tree"
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
        itemsize = DTYPES[dtype].itemsize
        expected_bytes = math.prod(shape) * itemsize
        try:
            size = file.stat().st_size
        except OSError as err:
            raise CheckpointError(f"{file}: cannot read tensor {name}: {err}") from err
        if size != expected_bytes:
            raise CheckpointError(f"{file}: size is {size} bytes, expected {expected_bytes} "
                                  f"({dtype} {list(shape)}) for tensor {name}")
        maps[name] = np.memmap(file, dtype=DTYPES[dtype], mode="r", shape=shape)
    return jax.tree.map(lambda name: maps[name], tree)


def load_sliceable(directory: str | os.PathLike, config: ModelConfig) -> dict[str, Any]:
    """A sliceable checkpoint fully read into memory: our params pytree of plain numpy arrays."""
    return jax.tree.map(np.array, open_sliceable(directory, config))


def load_sharded(directory: str | os.PathLike, config: ModelConfig, shardings, *,
                 progress: bool = False, report=None) -> dict[str, Any]:
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
    with progress_bar(len(flat_maps), "loading shards", progress, report) as bar:
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
