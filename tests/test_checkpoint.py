"""Tests of grok1.checkpoint: the golden checkpoint, round trips, and refusal of bad or unsafe files."""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import pickletools
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from grok1.checkpoint import (
    CheckpointError,
    QuantizedWeight8bit,
    load_checkpoint,
    random_params,
    read_leaf,
    save_checkpoint,
    write_random_checkpoint,
)
from grok1.config import ModelConfig, load_config
from grok1.params import QuantizedWeight, dequantize, reference_leaves

TINY = ModelConfig(vocab_size=512, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
                   sequence_len=128)
GROUPED = {"ffn_out": 8, "o_proj": 8}  # K = ffn_size 344 and num_q_heads * key_size 64, both divisible by 8


def golden_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "golden" / "grok1-tiny"
    return Path(os.environ.get("GROK1_GOLDEN_DIR", default))


@pytest.fixture(scope="module")
def golden() -> tuple[Path, ModelConfig]:
    directory = golden_dir()
    if not (directory / "config.json").is_file():
        pytest.skip(f"golden set not found at {directory}")
    return directory, load_config(directory / "config.json").model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A small random checkpoint; tests that damage it work on a copy."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, seed=1)


@pytest.fixture
def damaged_copy(tiny_checkpoint, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))


def leaf_file(directory: Path, config: ModelConfig, name: str, layer: int | None = None) -> tuple[Path, str]:
    """The file of one of our params and its reference path."""
    for index, (path, our_name, our_layer) in enumerate(reference_leaves(config)):
        if (our_name, our_layer) == (name, layer):
            return directory / "ckpt-0" / f"tensor{index:05d}_000", path
    raise KeyError((name, layer))


def assert_trees_bitwise_equal(a, b, where="params"):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_trees_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, QuantizedWeight):
        assert isinstance(b, QuantizedWeight), where
        assert_trees_bitwise_equal(a.weight, b.weight, f"{where}.weight")
        assert_trees_bitwise_equal(a.scales, b.scales, f"{where}.scales")
    else:
        assert isinstance(b, np.ndarray), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert a.tobytes() == b.tobytes(), where


def pickle_globals(path: Path) -> set[str]:
    """The "module name" pairs a pickle file refers to (read with pickletools, nothing is executed)."""
    strings, found = [], set()
    for opcode, arg, _ in pickletools.genops(path.read_bytes()):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE"):
            strings.append(arg)
        elif opcode.name == "STACK_GLOBAL":
            found.add(f"{strings[-2]} {strings[-1]}")
    return found


# ------------------------------------------------------------------------------------------------- golden set


def test_golden_loads_with_documented_shapes_and_dtypes(golden):
    directory, config = golden
    params = load_checkpoint(directory, config)
    assert params["embedding"].dtype == ml_dtypes.bfloat16
    assert params["embedding"].shape == (config.vocab_size, config.emb_size)
    assert params["final_norm"].dtype == np.float32 and params["final_norm"].shape == (config.emb_size,)
    layers, num_layers = params["layers"], config.num_layers
    assert layers["router"].dtype == np.float32
    assert layers["router"].shape == (num_layers, config.emb_size, config.num_experts)
    assert layers["pre_moe_norm"].shape == (num_layers, config.emb_size)
    ffn_in = layers["ffn_gelu_in"]
    assert ffn_in.weight.dtype == np.int8 and ffn_in.scales.dtype == ml_dtypes.bfloat16
    assert ffn_in.weight.shape == (num_layers, config.num_experts, config.emb_size, config.ffn_size)
    assert ffn_in.scales.shape == (num_layers, config.num_experts, 1, config.ffn_size)


def test_golden_shapes_match_leaves_json(golden):
    directory, config = golden
    params = load_checkpoint(directory / "ckpt-0", config)  # the ckpt-0 dir itself is accepted too
    listed = json.loads((directory / "leaves.json").read_text())
    for entry, (_, name, layer) in zip(listed, reference_leaves(config)):
        value = params[name] if layer is None else params["layers"][name]
        weight = value.weight if isinstance(value, QuantizedWeight) else value
        assert list(weight.shape if layer is None else weight.shape[1:]) == entry["shape"], entry["path"]
        assert isinstance(value, QuantizedWeight) == entry["quantised"], entry["path"]


def test_golden_dequantised_leaf_matches_manual_product(golden):
    directory, config = golden
    file, _ = leaf_file(directory, config, "ffn_out", 1)
    raw = read_leaf(file)
    assert isinstance(raw, QuantizedWeight8bit)
    manual = raw.weight.astype(np.float32) * raw.scales.astype(np.float32)

    quantised = load_checkpoint(directory, config)["layers"]["ffn_out"]
    assert quantised.weight[1].tobytes() == raw.weight.tobytes()
    assert quantised.scales[1].tobytes() == raw.scales.tobytes()
    dequantised = load_checkpoint(directory, config, dequantize=True)["layers"]["ffn_out"]
    assert dequantised.dtype == ml_dtypes.bfloat16
    # int8 times a bfloat16 scale is exact in float32; the bf16 result is that product rounded once.
    np.testing.assert_array_equal(dequantised[1], manual.astype(ml_dtypes.bfloat16))
    np.testing.assert_allclose(dequantised[1].astype(np.float32), manual, rtol=2**-8)


def test_reference_leaf_order_matches_golden_leaves_json(golden):
    directory, config = golden
    listed = json.loads((directory / "leaves.json").read_text())
    assert [entry["index"] for entry in listed] == list(range(len(listed)))
    assert [path for path, _, _ in reference_leaves(config)] == [entry["path"] for entry in listed]


def test_reference_leaf_order_sorts_layers_as_strings():
    paths = [path for path, _, _ in reference_leaves(ModelConfig(num_layers=64))]
    first = lambda layer: next(i for i, p in enumerate(paths) if f"/decoder_layer_{layer}/" in p)
    assert first(10) < first(2)
    assert len(paths) == 2 + 64 * 12


def test_saving_golden_params_reproduces_golden_bytes(golden, tmp_path):
    directory, config = golden
    save_checkpoint(tmp_path, load_checkpoint(directory, config), config, record_module="model")
    for index in range(len(reference_leaves(config))):
        name = f"tensor{index:05d}_000"
        assert filecmp.cmp(tmp_path / "ckpt-0" / name, directory / "ckpt-0" / name, shallow=False), name


# ------------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("record_module", ["__main__", "model"])
def test_round_trip_is_bitwise(tmp_path, record_module):
    params = random_params(TINY, seed=3)
    save_checkpoint(tmp_path, params, TINY, record_module=record_module)
    assert_trees_bitwise_equal(load_checkpoint(tmp_path, TINY), params)

    record_file, _ = leaf_file(tmp_path, TINY, "q_proj", 0)
    assert f"{record_module} QuantizedWeight8bit" in pickle_globals(record_file)
    assert "numpy.core.multiarray _reconstruct" in pickle_globals(record_file)  # as numpy 1.x wrote it
    # The record class was never registered where the pickle says it lives.
    assert "model" not in sys.modules
    assert not hasattr(sys.modules["__main__"], "QuantizedWeight8bit")


def test_round_trip_with_grouped_scales(tmp_path):
    params = random_params(TINY, seed=4, scale_groups=GROUPED)
    assert params["layers"]["ffn_out"].scales.shape == (2, TINY.num_experts, 8, TINY.emb_size)
    assert params["layers"]["o_proj"].scales.shape == (2, 8, TINY.emb_size)
    save_checkpoint(tmp_path, params, TINY)
    loaded = load_checkpoint(tmp_path, TINY)
    assert_trees_bitwise_equal(loaded, params)

    dequantised = load_checkpoint(tmp_path, TINY, dequantize=True)
    for name, value in loaded["layers"].items():
        expected = dequantize(value, dtype=ml_dtypes.bfloat16) if isinstance(value, QuantizedWeight) else value
        assert_trees_bitwise_equal(dequantised["layers"][name], expected, name)


def test_progress_bar_goes_to_stderr(tiny_checkpoint, capsys):
    load_checkpoint(tiny_checkpoint, TINY, progress=True)
    captured = capsys.readouterr()
    assert "loading checkpoint" in captured.err and captured.out == ""


def test_random_params_are_deterministic_and_sane():
    params = random_params(TINY, seed=5)
    assert_trees_bitwise_equal(params, random_params(TINY, seed=5))
    ffn_in = params["layers"]["ffn_gelu_in"]
    assert ffn_in.weight.min() >= -127 and ffn_in.weight.max() <= 127
    # x @ w keeps unit scale for unit x.
    x = np.random.default_rng(0).standard_normal((256, TINY.emb_size)).astype(np.float32)
    gain = (x @ dequantize(QuantizedWeight(ffn_in.weight[0, 0], ffn_in.scales[0, 0]))).std()
    assert 0.8 < gain < 1.2
    assert np.all(np.abs(params["layers"]["pre_attn_norm"] - 1) < 1)
    assert np.isfinite(params["embedding"].astype(np.float32)).all()


def test_random_params_rejects_bad_scale_groups():
    with pytest.raises(ValueError, match="ffn_out"):
        random_params(TINY, scale_groups={"ffn_out": 3})  # 344 is not divisible by 3
    with pytest.raises(ValueError, match="router"):
        random_params(TINY, scale_groups={"router": 2})


# -------------------------------------------------------------------------------------- unsafe and bad files


class _RunsShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_malicious_pickle_is_refused_and_not_executed(damaged_copy, tmp_path):
    sentinel = tmp_path / "pwned"
    file, _ = leaf_file(damaged_copy, TINY, "final_norm")
    file.write_bytes(pickle.dumps(_RunsShellCommand(f"touch {sentinel}")))

    with pytest.raises(CheckpointError, match="system") as error:
        read_leaf(file)
    assert str(file) in str(error.value)
    with pytest.raises(CheckpointError, match="system") as error:
        load_checkpoint(damaged_copy, TINY)
    assert file.name in str(error.value)
    assert not sentinel.exists()


def test_missing_file(damaged_copy):
    file, path = leaf_file(damaged_copy, TINY, "k_proj", 1)
    file.unlink()
    with pytest.raises(CheckpointError, match="missing") as error:
        load_checkpoint(damaged_copy, TINY)
    assert path in str(error.value) and file.name in str(error.value)


def test_extra_file(damaged_copy):
    count = len(reference_leaves(TINY))
    extra = damaged_copy / "ckpt-0" / f"tensor{count:05d}_000"
    shutil.copy(damaged_copy / "ckpt-0" / "tensor00001_000", extra)
    with pytest.raises(CheckpointError, match="unexpected") as error:
        load_checkpoint(damaged_copy, TINY)
    assert extra.name in str(error.value)


def test_truncated_file(damaged_copy):
    file, path = leaf_file(damaged_copy, TINY, "ffn_value_in", 0)
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_checkpoint(damaged_copy, TINY)
    assert path in str(error.value) and file.name in str(error.value)


def test_mis_shaped_tensor(damaged_copy):
    file, path = leaf_file(damaged_copy, TINY, "post_attn_norm", 1)
    file.write_bytes(pickle.dumps(np.ones(TINY.emb_size + 1, np.float32), protocol=4))
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(damaged_copy, TINY)
    message = str(error.value)
    assert path in message and file.name in message
    assert f"({TINY.emb_size},)" in message and f"({TINY.emb_size + 1},)" in message


def test_plain_array_where_record_expected(damaged_copy):
    file, path = leaf_file(damaged_copy, TINY, "v_proj", 0)
    shape = (TINY.emb_size, TINY.num_kv_heads * TINY.key_size)
    file.write_bytes(pickle.dumps(np.zeros(shape, np.int8), protocol=4))
    with pytest.raises(CheckpointError, match="record") as error:
        load_checkpoint(damaged_copy, TINY)
    assert path in str(error.value) and file.name in str(error.value)


def test_scale_groups_must_agree_across_layers(damaged_copy, tmp_path):
    grouped = write_random_checkpoint(tmp_path / "grouped", TINY, seed=6, scale_groups=GROUPED)
    source, _ = leaf_file(grouped, TINY, "o_proj", 1)
    file, path = leaf_file(damaged_copy, TINY, "o_proj", 1)
    shutil.copy(source, file)  # layer 1 now has G=8, layer 0 G=1
    for dequantise in (False, True):
        with pytest.raises(CheckpointError, match="scale groups") as error:
            load_checkpoint(damaged_copy, TINY, dequantize=dequantise)
        assert path in str(error.value) and file.name in str(error.value)
