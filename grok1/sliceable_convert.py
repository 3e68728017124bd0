"""Conversion of a released-layout checkpoint into the sliceable format (`grok1.sliceable_format`), streamed
leaf by leaf: each released leaf is checked exactly as `grok1.checkpoint.load_checkpoint` checks it (same
errors, from `grok1.release_layout`), cast to the dtypes the format fixes, and written into its slot.

Every file is written under a temporary name and renamed into place, so a process that still maps the files
of a previous conversion keeps reading them unchanged; the manifest is written last, so a directory without
one is an unfinished conversion.

Public API: `convert`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from grok1.config import ModelConfig
from grok1.params import QuantizedWeight
from grok1.progress import progress_bar
from grok1.release_layout import (
    CheckpointError,
    Leaf,
    ScaleGroups,
    check_file_set,
    expected_leaves,
    read_checked,
    release_dtypes,
    resolve_ckpt_dir,
)
from grok1.sliceable_format import FORMAT, MANIFEST, SUFFIX, dtype_name, leaf_names, name_tree, stacked_name

_CONVERT_THREADS = 4  # leaves read (unpickled) and written at once; bounds conversion memory to ~4 leaves


def _little_endian_bytes(array: np.ndarray) -> memoryview:
    """The C-order little-endian bytes of `array` (no copy on little-endian hosts for contiguous arrays)."""
    array = np.ascontiguousarray(array)
    if array.dtype.itemsize > 1:
        array = array.view(f"u{array.dtype.itemsize}").astype(f"<u{array.dtype.itemsize}", copy=False)
    return memoryview(array.reshape(-1).view(np.uint8))


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
        if len(data) != self.slot_bytes:  # cannot happen after read_checked's shape checks
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
        self.groups = ScaleGroups()
        self.lock = threading.Lock()

    def _file(self, name: str, slot_shape: tuple[int, ...], slots: int | None, dtype) -> _StackedFile:
        with self.lock:
            if name not in self.files:
                self.files[name] = _StackedFile(self.dst / (name + SUFFIX), slot_shape, slots, dtype)
            return self.files[name]

    def put(self, leaf: Leaf, value, scales_shape: tuple[int, ...] | None) -> None:
        if leaf.layer is None:
            self._file(stacked_name(leaf.name), value.shape, None, value.dtype).write(0, value)
            return
        parts = [(None, value)]
        if isinstance(value, QuantizedWeight):
            self.groups.check(leaf, scales_shape)
            parts = [("weight", value.weight), ("scales", value.scales)]
        for part, array in parts:
            name = stacked_name(leaf.name, part)
            self._file(name, array.shape, self.num_layers, array.dtype).write(leaf.layer, array)

    def manifest(self, config: ModelConfig) -> dict[str, Any]:
        tensors = {}
        for name in leaf_names(name_tree(config)):
            stacked = self.files[name]
            tensors[name] = {"file": stacked.path.name, "dtype": dtype_name(stacked.dtype),
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
    ckpt_dir = resolve_ckpt_dir(src)
    leaves = expected_leaves(ckpt_dir, config)
    check_file_set(ckpt_dir, leaves)  # fail before writing anything
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / MANIFEST).unlink(missing_ok=True)  # from here until the end, dst is not loadable
    writer = _Writer(dst, config)

    def convert_leaf(leaf: Leaf) -> None:
        value, scales_shape = read_checked(leaf, dequantize=False)
        writer.put(leaf, release_dtypes(leaf, value), scales_shape)  # the format fixes each param's dtype

    try:
        with ThreadPoolExecutor(_CONVERT_THREADS) as pool, \
                progress_bar(len(leaves), "converting", progress) as bar:
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
