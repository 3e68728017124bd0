"""Tests of grok1.sliceable, sliceable_convert and sliceable_format: conversion from the released layout,
memory-mapped and sharded loading, refusal of incomplete or mismatched checkpoints, and that reading a slice
reads only that slice's bytes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from cli.main import main as cli_main
from grok1.checkpoint import load_checkpoint, write_random_checkpoint
from grok1.config import ModelConfig, load_config
from grok1.release_layout import CheckpointError
from grok1.sliceable import is_sliceable, load_sharded, load_sliceable, open_sliceable, sliceable_bytes
from grok1.sliceable_convert import convert
from grok1.sliceable_format import FORMAT, MANIFEST, leaf_names

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = ModelConfig(vocab_size=512, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
                   sequence_len=128)
GROUPED = {"ffn_out": 8, "o_proj": 8}  # K = ffn_size 344 and num_q_heads * key_size 64, both divisible by 8
# FFN weights of 2 layers x 3 x 8 experts x 512 x 2736 int8: 67 MB, enough to see in a process's RSS; one
# expert's matrix is 1.4 MB of contiguous bytes.
BIG = ModelConfig(vocab_size=1024, emb_size=512, key_size=32, num_q_heads=4, num_kv_heads=2, num_layers=2,
                  sequence_len=128, widening_factor=8.0, num_experts=8)
FFN = ("ffn_gelu_in", "ffn_value_in", "ffn_out")


def golden_dir() -> Path:
    default = REPO_ROOT / ".." / "shared" / "golden" / "grok1-tiny"
    return Path(os.environ.get("GROK1_GOLDEN_DIR", default))


def assert_bitwise_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for name, a, e in zip(leaf_names(expected), jax.tree.leaves(actual), jax.tree.leaves(expected)):
        a = np.asarray(a)
        assert type(a) is np.ndarray, f"{name}: {type(a).__name__}"
        assert a.dtype == e.dtype, f"{name}: dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
        assert a.tobytes() == e.tobytes(), f"{name}: values differ"


def run_python(code: str, devices: int = 1, timeout: int = 120) -> str:
    """Run `code` in a fresh interpreter (own jax, own RSS) with `devices` virtual CPU devices."""
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    """Small random released-layout checkpoints: one scale group everywhere, and grouped scales."""
    return {"plain": write_random_checkpoint(tmp_path_factory.mktemp("plain"), TINY, seed=1),
            "grouped": write_random_checkpoint(tmp_path_factory.mktemp("grouped"), TINY, seed=2,
                                               scale_groups=GROUPED)}


@pytest.fixture(scope="module")
def sliceable(released, tmp_path_factory) -> Path:
    return convert(released["grouped"], tmp_path_factory.mktemp("sliceable") / "out", TINY)


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["plain", "grouped"])
def test_round_trip_equals_load_checkpoint(released, tmp_path, kind):
    dst = convert(released[kind], tmp_path / "sl", TINY)
    assert dst == tmp_path / "sl" and is_sliceable(dst)
    assert_bitwise_equal(load_sliceable(dst, TINY), load_checkpoint(released[kind], TINY))


def test_layout_on_disk(sliceable):
    manifest = json.loads((sliceable / MANIFEST).read_text())
    assert manifest["format"] == FORMAT
    assert manifest["config"] == dataclasses.asdict(TINY)
    tensors = manifest["tensors"]
    assert tensors["embedding"] == {"file": "embedding.bin", "dtype": "bfloat16", "shape": [512, 64]}
    assert tensors["final_norm"] == {"file": "final_norm.bin", "dtype": "float32", "shape": [64]}
    assert tensors["layers.gate"] == {"file": "layers.gate.bin", "dtype": "float32", "shape": [2, 64, 8]}
    assert tensors["layers.q_proj.weight"]["dtype"] == "int8"
    assert tensors["layers.ffn_out.scales"] == {"file": "layers.ffn_out.scales.bin", "dtype": "bfloat16",
                                                "shape": [2, 8, 8, 64]}
    # Each file is exactly the raw little-endian bytes of the stacked array.
    maps = open_sliceable(sliceable, TINY)
    weight = maps["layers"]["ffn_out"].weight
    raw = np.fromfile(sliceable / "layers.ffn_out.weight.bin", dtype=np.int8).reshape(weight.shape)
    assert np.array_equal(raw, weight)
    norm = np.fromfile(sliceable / "final_norm.bin", dtype="<f4")
    assert np.array_equal(norm, maps["final_norm"])
    assert sliceable_bytes(sliceable) == sum(x.nbytes for x in jax.tree.leaves(maps))


def test_open_sliceable_gives_read_only_memmaps(sliceable):
    maps = open_sliceable(sliceable, TINY)
    assert sorted(leaf_names(maps)) == sorted(json.loads((sliceable / MANIFEST).read_text())["tensors"])
    for name, leaf in zip(leaf_names(maps), jax.tree.leaves(maps)):
        assert isinstance(leaf, np.memmap), name
        assert not leaf.flags.writeable, name
    assert maps["embedding"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert maps["layers"]["q_proj"].scales.dtype == np.dtype(ml_dtypes.bfloat16)
    assert maps["layers"]["q_proj"].weight.dtype == np.int8
    assert maps["layers"]["pre_attn_norm"].dtype == np.float32


def test_golden_converts_and_loads_equal(tmp_path):
    directory = golden_dir()
    if not (directory / "config.json").is_file():
        pytest.skip(f"golden set not found at {directory}")
    config = load_config(directory / "config.json").model
    dst = convert(directory, tmp_path / "golden-sliceable", config)
    assert_bitwise_equal(load_sliceable(dst, config), load_checkpoint(directory, config))


def test_convert_overwrites_a_previous_conversion(released, tmp_path):
    dst = convert(released["plain"], tmp_path / "sl", TINY)
    convert(released["grouped"], dst, TINY)
    assert_bitwise_equal(load_sliceable(dst, TINY), load_checkpoint(released["grouped"], TINY))


def test_reconversion_leaves_maps_of_the_old_files_unchanged(released, tmp_path):
    """convert replaces files by renaming new ones into place; a process mapping the old ones keeps them."""
    dst = convert(released["plain"], tmp_path / "sl", TINY)
    old_maps = open_sliceable(dst, TINY)
    before = {name: np.array(leaf) for name, leaf in zip(leaf_names(old_maps), jax.tree.leaves(old_maps))}
    convert(released["grouped"], dst, TINY)  # other weights, other scales shapes
    for name, leaf in zip(leaf_names(old_maps), jax.tree.leaves(old_maps)):
        assert np.asarray(leaf).tobytes() == before[name].tobytes(), name
    assert_bitwise_equal(load_sliceable(dst, TINY), load_checkpoint(released["grouped"], TINY))
    assert sorted(p.name for p in dst.iterdir() if p.name.startswith(".")) == []  # no temporary files left


def test_load_sharded_single_device(sliceable):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = load_sharded(sliceable, TINY, sharding)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(arrays))
    assert_bitwise_equal(arrays, load_sliceable(sliceable, TINY))


def test_load_sharded_rejects_mismatched_shardings(sliceable):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match="structure"):
        load_sharded(sliceable, TINY, {"embedding": sharding})


def test_load_sharded_on_four_devices(sliceable):
    out = run_python(f"""
        import jax, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        from grok1.config import ModelConfig
        from grok1.sliceable import load_sharded, load_sliceable, open_sliceable
        from grok1.sliceable_format import leaf_names
        assert jax.device_count() == 4, jax.devices()
        config = ModelConfig(**{dataclasses.asdict(TINY)!r})
        mesh = jax.make_mesh((2, 2), ("ep", "tp"))
        replicated = NamedSharding(mesh, P())
        shardings = jax.tree.map(lambda _: replicated, open_sliceable({str(sliceable)!r}, config))
        shardings["layers"]["ffn_out"].weight = NamedSharding(mesh, P(None, "ep", "tp", None))
        shardings["layers"]["ffn_gelu_in"].weight = NamedSharding(mesh, P(None, "ep", None, "tp"))
        shardings["layers"]["ffn_gelu_in"].scales = NamedSharding(mesh, P(None, "ep", None, "tp"))
        shardings["embedding"] = NamedSharding(mesh, P(None, "tp"))
        arrays = load_sharded({str(sliceable)!r}, config, shardings, progress=True)
        full = load_sliceable({str(sliceable)!r}, config)
        checked = 0
        for name, array, expected, sharding in zip(leaf_names(full), jax.tree.leaves(arrays),
                                                   jax.tree.leaves(full), jax.tree.leaves(shardings)):
            assert array.sharding == sharding, name
            assert len(array.addressable_shards) == 4, name
            for shard in array.addressable_shards:
                data = np.asarray(shard.data)
                assert data.dtype == expected.dtype, name
                assert data.tobytes() == np.ascontiguousarray(expected[shard.index]).tobytes(), name
            host = np.asarray(array)
            assert host.dtype == expected.dtype and host.tobytes() == expected.tobytes(), name
            checked += 1
        shard = arrays["layers"]["ffn_out"].weight.addressable_shards[0]
        print(checked, shard.data.shape, arrays["layers"]["ffn_out"].weight.shape)
    """, devices=4)
    checked, _, _ = out.split(" ", 2)
    assert int(checked) == len(leaf_names(load_sliceable(sliceable, TINY)))
    assert "(2, 4, 172, 64) (2, 8, 344, 64)" in out


# ------------------------------------------------------------------------- reading only one's own slices


def test_reading_a_slice_reads_only_its_bytes(tmp_path):
    """A process touching experts 0..E/4 of every FFN leaf grows its RSS by about 1/4 of those files.

    The files are first dropped from the page cache (they are clean: convert fsyncs them), so that pages are
    faulted in from disk with ordinary readahead; otherwise a kernel with large page-cache folios maps whole
    folios (up to 2 MB) that the writer left there, and RSS rounds every slice up to them.
    """
    src = write_random_checkpoint(tmp_path / "released", BIG, seed=3)
    dst = convert(src, tmp_path / "sliceable", BIG)
    out = run_python(f"""
        import json, os, numpy as np, psutil
        from grok1.config import ModelConfig
        from grok1.sliceable import open_sliceable
        config = ModelConfig(**{dataclasses.asdict(BIG)!r})
        maps = open_sliceable({str(dst)!r}, config)
        ffn = [leaf for name in {FFN!r} for leaf in (maps["layers"][name].weight, maps["layers"][name].scales)]
        total = sum(leaf.nbytes for leaf in ffn)
        for leaf in ffn:
            if hasattr(os, "posix_fadvise"):
                fd = os.open(leaf.filename, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        process = psutil.Process()
        def read_bytes():
            try:
                return process.io_counters().read_bytes
            except (AttributeError, psutil.Error):
                return 0
        base, base_io = process.memory_info().rss, read_bytes()
        quarter = config.num_experts // 4
        for leaf in ffn:  # max() touches every byte of the slice without copying it
            leaf[:, :quarter].max()
        after_quarter, quarter_io = process.memory_info().rss, read_bytes()
        for leaf in ffn:
            leaf.max()
        after_all, all_io = process.memory_info().rss, read_bytes()
        print(json.dumps({{"total": total, "quarter": after_quarter - base, "all": after_all - base,
                          "quarter_io": quarter_io - base_io, "all_io": all_io - base_io}}))
    """)
    numbers = json.loads(out.strip().splitlines()[-1])
    total = numbers["total"]
    print(f"\nFFN bytes {total}; RSS growth: experts 0..E/4 {numbers['quarter']} "
          f"({numbers['quarter'] / total:.2f}x), then everything {numbers['all']} ({numbers['all'] / total:.2f}x); "
          f"bytes read from disk (with readahead): {numbers['quarter_io']}, {numbers['all_io']}")
    assert total > 60e6
    assert 0.1 * total < numbers["quarter"] < 0.5 * total
    assert 0.8 * total < numbers["all"] < 1.5 * total


# ------------------------------------------------------------------------------------------------ errors


def test_missing_manifest_is_refused(sliceable, tmp_path):
    assert not is_sliceable(tmp_path)
    with pytest.raises(CheckpointError, match="no manifest"):
        open_sliceable(tmp_path, TINY)
    with pytest.raises(CheckpointError, match="no manifest"):
        load_sliceable(tmp_path / "nowhere", TINY)


def test_wrong_format_is_refused(sliceable, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((sliceable / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format": "something-else"}))
    assert not is_sliceable(copy)
    with pytest.raises(CheckpointError, match="something-else"):
        open_sliceable(copy, TINY)


def test_config_mismatch_names_the_field(sliceable):
    with pytest.raises(CheckpointError, match=r"model\.sequence_len"):
        open_sliceable(sliceable, dataclasses.replace(TINY, sequence_len=256))
    with pytest.raises(CheckpointError, match=r"model\.num_layers"):
        open_sliceable(sliceable, dataclasses.replace(TINY, num_layers=3))


def test_truncated_file_names_the_file(released, tmp_path):
    dst = convert(released["plain"], tmp_path / "sl", TINY)
    path = dst / "layers.ffn_out.weight.bin"
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size - 1)
    with pytest.raises(CheckpointError, match=r"layers\.ffn_out\.weight\.bin.*size"):
        open_sliceable(dst, TINY)
    path.unlink()
    with pytest.raises(CheckpointError, match=r"layers\.ffn_out\.weight\.bin"):
        open_sliceable(dst, TINY)


def test_manifest_shape_mismatch_is_refused(sliceable, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    manifest = json.loads((sliceable / MANIFEST).read_text())
    manifest["tensors"]["layers.gate"]["shape"] = [2, 64, 4]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layers\.gate: shape"):
        open_sliceable(copy, TINY)
    manifest["tensors"]["layers.gate"]["shape"] = [2, 64, 8]
    manifest["tensors"]["layers.gate"]["file"] = "../escape.bin"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="plain file name"):
        open_sliceable(copy, TINY)


def test_failed_conversion_leaves_nothing_loadable(released, tmp_path):
    dst = convert(released["plain"], tmp_path / "sl", TINY)
    wrong = dataclasses.replace(TINY, emb_size=32)  # every leaf is mis-shaped for it
    with pytest.raises(CheckpointError, match=r"params/.* in .*tensor\d{5}_000: expected"):
        convert(released["plain"], dst, wrong)
    assert not is_sliceable(dst)
    with pytest.raises(CheckpointError, match="no manifest"):
        open_sliceable(dst, TINY)
    assert [p.name for p in dst.iterdir() if p.name.endswith(".tmp")] == []


def test_sliceable_bytes_checks_file_names(sliceable, tmp_path):
    copy = Path(shutil.copytree(sliceable, tmp_path / "copy"))
    (tmp_path / "escape.bin").write_bytes(bytes(100))
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["tensors"]["layers.gate"]["file"] = "../escape.bin"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layers\.gate: file must be a plain file name"):
        sliceable_bytes(copy)


def test_tensor_file_linking_outside_the_checkpoint_is_refused(sliceable, tmp_path):
    copy = Path(shutil.copytree(sliceable, tmp_path / "copy"))
    file = copy / "layers.gate.bin"
    outside = tmp_path / "gate.bin"
    shutil.move(file, outside)
    file.symlink_to(outside)  # same bytes, but not the checkpoint's own file
    for read in (lambda: open_sliceable(copy, TINY), lambda: sliceable_bytes(copy)):
        with pytest.raises(CheckpointError, match="outside the checkpoint directory") as error:
            read()
        assert str(file) in str(error.value)
    file.unlink()
    file.symlink_to(copy / "final_norm.bin")  # a link inside the directory is fine (sizes are still checked)
    with pytest.raises(CheckpointError, match=r"layers\.gate\.bin: size"):
        open_sliceable(copy, TINY)


def test_manifest_linking_outside_is_refused(sliceable, tmp_path):
    copy = Path(shutil.copytree(sliceable, tmp_path / "copy"))
    shutil.move(copy / MANIFEST, tmp_path / MANIFEST)
    (copy / MANIFEST).symlink_to(tmp_path / MANIFEST)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        open_sliceable(copy, TINY)


def test_convert_refuses_released_tensors_linking_outside(released, tmp_path):
    src = Path(shutil.copytree(released["plain"], tmp_path / "src"))
    file = src / "ckpt-0" / "tensor00001_000"
    shutil.move(file, tmp_path / "tensor")
    file.symlink_to(tmp_path / "tensor")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as error:
        convert(src, tmp_path / "out", TINY)
    assert str(file) in str(error.value)


def test_convert_refuses_a_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="no ckpt-0"):
        convert(tmp_path / "nothing", tmp_path / "out", TINY)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_convert(released, tmp_path, capsys):
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps({"name": "tiny", "model": dataclasses.asdict(TINY)}))
    dst = tmp_path / "cli-out"
    assert cli_main(["checkpoint", "convert", str(released["grouped"]), str(dst),
                     "--config", str(config_file)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(dst)
    assert f"wrote {sliceable_bytes(dst)} bytes" in captured.err
    assert_bitwise_equal(load_sliceable(dst, TINY), load_checkpoint(released["grouped"], TINY))
    # A config that does not fit the checkpoint is a clean error (exit 2), not a traceback.
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "wrong", "model": {**dataclasses.asdict(TINY), "num_layers": 3}}))
    assert cli_main(["checkpoint", "convert", str(released["grouped"]), str(tmp_path / "x"),
                     "--config", str(wrong)]) == 2
    assert "grok1: error:" in capsys.readouterr().err


def test_an_older_format_version_is_refused_with_what_to_do(sliceable, tmp_path):
    """A v1 directory (written before the gate's file was renamed) is recognised and refused by name."""
    copy = tmp_path / "v1"
    copy.mkdir()
    manifest = json.loads((sliceable / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({**manifest, "format": "grok1-sliceable-v1"}))
    assert is_sliceable(copy)
    with pytest.raises(CheckpointError, match="grok1-sliceable-v1.*checkpoint convert"):
        open_sliceable(copy, TINY)
