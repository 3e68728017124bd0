"""Tests of grok1.checkpoint and grok1.release_layout: the golden checkpoint, round trips, and refusal of bad or
unsafe files."""

from __future__ import annotations

import filecmp
import json
import os
import pickle
import pickletools
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from grok1.checkpoint import load_checkpoint, save_checkpoint, write_random_checkpoint
from grok1.config import ModelConfig, load_config
from grok1.params import QuantizedWeight, dequantize, reference_leaves
from grok1.random_weights import random_params
from grok1.release_layout import CheckpointError, QuantizedWeight8bit, read_leaf

TINY = ModelConfig(vocab_size=512, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
                   sequence_len=128)
GROUPED = {"ffn_out": 8, "o_proj": 8}  # K = ffn_size 344 and num_q_heads * key_size 64, both divisible by 8


def golden_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / ".." / "shared" / "golden" / "grok1-tiny"
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


def listed_dtypes(entry: dict) -> tuple[np.dtype, np.dtype | None, tuple[int, ...] | None]:
    """A leaves.json entry's dtype field -> (dtype, scales dtype, scales shape): "float32" or, for a record,
    "int8+bfloat16 scales [8, 1, 688]" (scales shape of one layer, G on the axis before the last)."""
    found = re.fullmatch(r"int8\+(\w+) scales \[([\d, ]*)\]", entry["dtype"])
    if found is None:
        return np.dtype(getattr(ml_dtypes, entry["dtype"], entry["dtype"])), None, None
    scales_dtype = np.dtype(getattr(ml_dtypes, found[1], found[1]))
    return np.dtype(np.int8), scales_dtype, tuple(int(n) for n in found[2].split(","))


def loop_dequantised(weight: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Obviously correct dequantisation, a loop over scale groups: rows g*K/G .. (g+1)*K/G of the int8 weight
    [..., K, N] times scales[..., g, :], multiplied in the scales' dtype (as the reference and our model do),
    then rounded once to bfloat16. int8 times a bfloat16 scale is exact in float32."""
    k, groups = weight.shape[-2], scales.shape[-2]
    rows = k // groups
    product = np.empty(weight.shape, np.float64)  # exact: 8 bits times at most 24
    for g in range(groups):
        block = weight[..., g * rows:(g + 1) * rows, :].astype(np.float64)
        product[..., g * rows:(g + 1) * rows, :] = block * scales[..., g:g + 1, :].astype(np.float64)
    # To float32 (a float32 multiply's one rounding; exact for bfloat16 scales), then to bfloat16.
    return product.astype(np.float32).astype(ml_dtypes.bfloat16)


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
    """Shapes from the config; dtypes (and the scales' shape, which says G) as leaves.json lists them."""
    directory, config = golden
    params = load_checkpoint(directory, config)
    layers, num_layers = params["layers"], config.num_layers
    assert params["embedding"].shape == (config.vocab_size, config.emb_size)
    assert params["final_norm"].shape == (config.emb_size,)
    assert layers["gate"].shape == (num_layers, config.emb_size, config.num_experts)
    assert layers["pre_moe_norm"].shape == (num_layers, config.emb_size)
    ffn_in = layers["ffn_gelu_in"]
    assert ffn_in.weight.shape == (num_layers, config.num_experts, config.emb_size, config.ffn_size)
    groups = ffn_in.scales.shape[-2]
    assert config.emb_size % groups == 0
    assert ffn_in.scales.shape == (num_layers, config.num_experts, groups, config.ffn_size)

    release_floats = {np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)}
    listed = json.loads((directory / "leaves.json").read_text())
    for entry, (_, name, layer) in zip(listed, reference_leaves(config), strict=True):
        value = params[name] if layer is None else params["layers"][name]
        dtype, scales_dtype, scales_shape = listed_dtypes(entry)
        if isinstance(value, QuantizedWeight):
            assert value.weight.dtype == dtype == np.int8, entry["path"]
            assert value.scales.dtype == scales_dtype and scales_dtype in release_floats, entry["path"]
            assert value.scales.shape[1:] == scales_shape, entry["path"]
        else:
            assert value.dtype == dtype and dtype in release_floats, entry["path"]


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
    """Every quantised leaf of the golden set, with however many scale groups G its scales have."""
    directory, config = golden
    quantised = load_checkpoint(directory, config)["layers"]
    dequantised = load_checkpoint(directory, config, dequantize=True)["layers"]
    for name in quantised:
        if not isinstance(quantised[name], QuantizedWeight):
            continue
        for layer in range(config.num_layers):
            file, _ = leaf_file(directory, config, name, layer)
            raw = read_leaf(file)
            assert isinstance(raw, QuantizedWeight8bit)
            assert quantised[name].weight[layer].tobytes() == raw.weight.tobytes()
            assert quantised[name].scales[layer].tobytes() == raw.scales.tobytes()
            assert dequantised[name].dtype == ml_dtypes.bfloat16
            manual = loop_dequantised(raw.weight, raw.scales)
            np.testing.assert_array_equal(dequantised[name][layer], manual, err_msg=f"{name}[{layer}]")


def test_reference_leaf_order_matches_golden_leaves_json(golden):
    directory, config = golden
    listed = json.loads((directory / "leaves.json").read_text())
    assert [entry["index"] for entry in listed] == list(range(len(listed)))
    assert [path for path, _, _ in reference_leaves(config)] == [entry["path"] for entry in listed]


def test_reference_leaf_order_sorts_layers_as_strings():
    paths = [path for path, _, _ in reference_leaves(ModelConfig(num_layers=64))]

    def first(layer):
        return next(i for i, p in enumerate(paths) if f"/decoder_layer_{layer}/" in p)

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


def test_dequantised_with_several_scale_groups_matches_a_loop_over_groups(tmp_path):
    """G = 2 and 4 (and 1), random int8 weights and scales written by our writer: the loader's dequantisation
    equals a numpy loop over the groups, and each group's scale reaches only its own block of rows."""
    groups = {"ffn_out": 4, "ffn_gelu_in": 2, "o_proj": 2, "q_proj": 4}
    params = random_params(TINY, seed=8, scale_groups=groups)
    rng = np.random.default_rng(8)
    for name in groups:  # scales far apart per group, so that a group applied to the wrong rows shows
        scales = params["layers"][name].scales
        scales[...] = rng.uniform(0.5, 8.0, size=scales.shape).astype(ml_dtypes.bfloat16)
    save_checkpoint(tmp_path, params, TINY)
    loaded = load_checkpoint(tmp_path, TINY)
    dequantised = load_checkpoint(tmp_path, TINY, dequantize=True)["layers"]
    for name, value in loaded["layers"].items():
        if not isinstance(value, QuantizedWeight):
            continue
        assert value.scales.shape[-2] == groups.get(name, 1), name
        np.testing.assert_array_equal(dequantised[name], loop_dequantised(value.weight, value.scales),
                                      err_msg=name)


def test_progress_bar_goes_to_stderr(tiny_checkpoint, capsys):
    load_checkpoint(tiny_checkpoint, TINY, progress=True)
    captured = capsys.readouterr()
    assert "loading checkpoint" in captured.err and captured.out == ""


def retyped(params, dtype_of):
    """A copy of `params` with float leaves and scales cast by `dtype_of(name, current dtype)`."""
    def cast(name, array):
        return array.astype(dtype_of(name, array.dtype))
    layers = {name: QuantizedWeight(value.weight, cast(name, value.scales)) if isinstance(value, QuantizedWeight)
              else cast(name, value) for name, value in params["layers"].items()}
    return {"embedding": cast("embedding", params["embedding"]),
            "final_norm": cast("final_norm", params["final_norm"]), "layers": layers}


def swapped_float_dtype(name, dtype):
    return np.dtype(np.float32) if dtype == ml_dtypes.bfloat16 else np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype_of", [swapped_float_dtype, lambda name, dtype: np.dtype(np.float32),
                                      lambda name, dtype: np.dtype(ml_dtypes.bfloat16)],
                         ids=["swapped", "all_float32", "all_bfloat16"])
def test_saving_keeps_each_leaf_dtype_and_resaving_is_byte_identical(tmp_path, dtype_of):
    """float32 where the release has bfloat16 and the reverse: loaded as stored, saved as loaded."""
    params = retyped(random_params(TINY, seed=9), dtype_of)
    save_checkpoint(tmp_path / "first", params, TINY, record_module="model")
    loaded = load_checkpoint(tmp_path / "first", TINY)
    assert_trees_bitwise_equal(loaded, params)
    save_checkpoint(tmp_path / "second", loaded, TINY, record_module="model")
    for index in range(len(reference_leaves(TINY))):
        name = f"tensor{index:05d}_000"
        assert filecmp.cmp(tmp_path / "first" / "ckpt-0" / name, tmp_path / "second" / "ckpt-0" / name,
                           shallow=False), name


def test_saving_refuses_dtypes_the_release_format_cannot_hold(tmp_path):
    params = random_params(TINY, seed=10)
    params["final_norm"] = params["final_norm"].astype(np.float64)
    with pytest.raises(CheckpointError, match="float64"):
        save_checkpoint(tmp_path, params, TINY)
    assert not (tmp_path / "ckpt-0").exists()  # nothing written


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
    with pytest.raises(ValueError, match="gate"):
        random_params(TINY, scale_groups={"gate": 2})


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


def test_dtypes_must_agree_across_layers(damaged_copy):
    file, path = leaf_file(damaged_copy, TINY, "pre_moe_norm", 1)
    file.write_bytes(pickle.dumps(np.ones(TINY.emb_size, ml_dtypes.bfloat16), protocol=4))
    with pytest.raises(CheckpointError, match="dtype bfloat16 differs") as error:
        load_checkpoint(damaged_copy, TINY)
    assert path in str(error.value) and file.name in str(error.value)


def test_record_file_linking_outside_the_checkpoint_is_refused(damaged_copy, tmp_path):
    file, path = leaf_file(damaged_copy, TINY, "q_proj", 1)
    outside = tmp_path / "elsewhere"
    shutil.move(file, outside)
    file.symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside the checkpoint directory") as error:
        load_checkpoint(damaged_copy, TINY)
    assert path in str(error.value) and str(file) in str(error.value)
    file.unlink()
    file.symlink_to(os.path.relpath(outside, file.parent))  # relative links are resolved too
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        load_checkpoint(damaged_copy, TINY)


def test_links_inside_the_checkpoint_are_followed(tmp_path):
    """A ckpt-0 that is itself a link, and tensor files linking to others in it, still load."""
    real = write_random_checkpoint(tmp_path / "real", TINY, seed=7)
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "ckpt-0").symlink_to(real / "ckpt-0")
    expected = load_checkpoint(real, TINY)
    assert_trees_bitwise_equal(load_checkpoint(tmp_path / "linked", TINY), expected)
    file, _ = leaf_file(real, TINY, "final_norm")
    moved = real / "ckpt-0" / "final_norm.pickle"
    shutil.move(file, moved)
    file.symlink_to(moved.name)
    assert_trees_bitwise_equal(load_checkpoint(real, TINY), expected)


# ---------------------------------------------------------------------------------------- crafted pickles
# Hand-assembled pickles that numpy's own unpickling accepts with harm. Each is read in a fresh interpreter,
# so that a segfault fails the test instead of killing pytest.


@dataclass
class Global:
    module: str
    name: str


@dataclass
class Call:
    """`func(*args)` (REDUCE), then BUILD with `state` unless it is None."""

    func: Any
    args: tuple
    state: Any = None


def encode(value) -> bytes:
    """Pickle opcodes building `value` (plain values, tuples, lists, dicts, Global, Call); no memo."""
    if value is None:
        return pickle.NONE
    if isinstance(value, bool):
        return pickle.NEWTRUE if value else pickle.NEWFALSE
    if isinstance(value, int):
        return pickle.LONG1 + bytes([8]) + value.to_bytes(8, "little", signed=True)
    if isinstance(value, float):
        return pickle.BINFLOAT + struct.pack(">d", value)
    if isinstance(value, str):
        return pickle.BINUNICODE + struct.pack("<I", len(value.encode())) + value.encode()
    if isinstance(value, bytes):
        return pickle.BINBYTES + struct.pack("<I", len(value)) + value
    if isinstance(value, tuple):
        return pickle.MARK + b"".join(map(encode, value)) + pickle.TUPLE
    if isinstance(value, list):
        return pickle.MARK + b"".join(map(encode, value)) + pickle.LIST
    if isinstance(value, dict):
        return pickle.EMPTY_DICT + pickle.MARK + b"".join(encode(k) + encode(v) for k, v in value.items()) \
            + pickle.SETITEMS
    if isinstance(value, Global):
        return pickle.GLOBAL + f"{value.module}\n{value.name}\n".encode()
    if isinstance(value, Call):
        built = encode(value.func) + encode(tuple(value.args)) + pickle.REDUCE
        return built if value.state is None else built + encode(value.state) + pickle.BUILD
    raise TypeError(type(value))


def crafted(value) -> bytes:
    return pickle.PROTO + bytes([4]) + encode(value) + pickle.STOP


NDARRAY = Global("numpy", "ndarray")
BFLOAT16 = Global("ml_dtypes", "bfloat16")
F4_STATE = (3, "<", None, None, None, -1, -1, 0)  # dtype states as numpy writes them
I1_STATE = (3, "|", None, None, None, -1, -1, 0)
BF16_STATE = (3, "<", None, None, None, 2, 2, 64)
OBJECT_STATE = (3, "|", None, None, None, -1, -1, 63)


def dtype(name, state, copy=True) -> Call:
    return Call(Global("numpy", "dtype"), (name, False, copy), state)


def array(shape, dtype_call, data, fortran=False, cls=NDARRAY) -> Call:
    """An array as numpy 1.x pickles it: _reconstruct(cls, (0,), b"b"), then BUILD (1, shape, dtype, F, data)."""
    return Call(Global("numpy.core.multiarray", "_reconstruct"), (cls, (0,), b"b"),
                (1, shape, dtype_call, fortran, data))


def object_field_dtype(flags: int) -> Call:
    """A structured dtype with one object field; flags 0 hides from numpy that it holds pointers."""
    return dtype("V8", (3, "|", None, ("a",), {"a": (dtype("O8", OBJECT_STATE), 0)}, 8, 1, flags))


POINTER = (0x4141414141).to_bytes(8, "little")  # an address the file chooses
BF16_ONE_FIVE = b"\xc0\x3f"


def test_hand_assembled_pickles_load_as_numpy_writes_them(tmp_path):
    """The assembler writes what numpy does: both readers agree on its arrays (so refusals below are real)."""
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    cases = {
        "f4": (array((2, 3), dtype("f4", F4_STATE), values.tobytes()), values),
        "fortran": (array((3, 2), dtype("f4", F4_STATE), values.tobytes(), fortran=True), values.T),
        "i1": (array((3,), dtype("i1", I1_STATE), b"\x01\xff\x7f"), np.array([1, -1, 127], np.int8)),
        "bf16": (array((1,), dtype(BFLOAT16, BF16_STATE), BF16_ONE_FIVE), np.array([1.5], ml_dtypes.bfloat16)),
        "empty": (array((0, 4), dtype("f4", F4_STATE), b""), np.zeros((0, 4), np.float32)),
    }
    for name, (value, expected) in cases.items():
        file = tmp_path / name
        file.write_bytes(crafted(value))
        for loaded in (pickle.loads(file.read_bytes()), read_leaf(file)):
            assert (loaded.dtype, loaded.shape) == (expected.dtype, expected.shape), name
            assert np.array_equal(loaded, expected) and loaded.flags.writeable, name


HARMFUL = {  # name -> (the pickle's value, a fragment of the refusal); numpy's unpickling accepts these
    "object_array": (array((2,), dtype("O8", OBJECT_STATE), [1, "x"]), "dtype 'O8'"),
    "object_field_with_forged_flags": (array((1,), object_field_dtype(flags=0), POINTER), "dtype 'V8'"),  # segfault
    "ndarray_called_with_forged_dtype": (Call(NDARRAY, ((1,), object_field_dtype(flags=0), POINTER)), "V8"),
    "ndarray_called_on_a_buffer": (Call(NDARRAY, ((2,), dtype("f4", F4_STATE), bytes(8))), "called"),
    # copy=False hands back numpy's process-wide bfloat16 descriptor; BUILD sets its item size to 1, so this
    # array (and every later bfloat16 array) reads past its buffer.
    "bfloat16_descriptor_rewritten": (array((2,), dtype(BFLOAT16, (3, "<", None, None, None, 1, 1, 64), copy=False),
                                            BF16_ONE_FIVE), "would change it"),
    "float32_byte_order_changed": (array((2,), dtype("f4", (3, ">", *F4_STATE[2:])), bytes(8)), "would change it"),
    "float32_given_fields": (array((2,), dtype("f4", (3, "<", None, ("a",), {"a": (dtype("f4", F4_STATE), 0)},
                                                      4, 4, 0)), bytes(8)), "would change it"),
    "float16": (array((2,), dtype("f2", F4_STATE), bytes(4)), "dtype 'f2'"),
    "data_is_str": (array((2,), dtype("f4", F4_STATE), "\0" * 8), "got str"),
    "scalar_with_forged_object_field": (  # a record whose weight is a scalar read through a pointer: segfault
        Call(Global("model", "QuantizedWeight8bit"),
             (Call(Global("numpy.core.multiarray", "scalar"), (object_field_dtype(flags=0), POINTER)),
              array((1,), dtype(BFLOAT16, BF16_STATE), BF16_ONE_FIVE))), "numpy.core.multiarray.scalar"),
}
REFUSED_BEFORE = {  # numpy or the allow-list already refused these; kept so that the reader still does
    "object_field": (array((1,), object_field_dtype(flags=27), POINTER), "dtype 'V8'"),
    "data_is_list": (array((2,), dtype("f4", F4_STATE), [1.0, 2.0]), "got list"),
    "data_too_short": (array((4,), dtype("f4", F4_STATE), bytes(8)), "must be 16 bytes"),
    "data_too_long": (array((1,), dtype("f4", F4_STATE), bytes(8)), "must be 4 bytes"),
    "negative_shape": (array((-1,), dtype("f4", F4_STATE), b""), "shape"),
    "dtype_not_from_numpy_dtype": (array((2,), "f4", bytes(8)), "dtype must come from numpy.dtype"),
    "ndarray_subclass": (array((2,), dtype("f4", F4_STATE), bytes(8), cls=Global("numpy", "memmap")),
                         "numpy.memmap"),
    "record_class_as_array": (array((2,), dtype("f4", F4_STATE), bytes(8),
                                    cls=Global("model", "QuantizedWeight8bit")), "plain numpy.ndarray"),
    "os_system": (Call(Global("os", "system"), ("true",)), "os.system"),
    "builtins_eval": (Call(Global("builtins", "eval"), ("1 + 1",)), "builtins.eval"),
}
CRAFTED = {**HARMFUL, **REFUSED_BEFORE}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_pickle_is_refused_and_harms_nothing(name, damaged_copy):
    value, fragment = CRAFTED[name]
    file, path = leaf_file(damaged_copy, TINY, "final_norm")
    file.write_bytes(crafted(value))
    code = f"""
        import ml_dtypes, numpy as np
        from grok1.checkpoint import load_checkpoint
        from grok1.release_layout import CheckpointError, read_leaf
        from grok1.config import ModelConfig
        for attempt in (lambda: read_leaf({str(file)!r}),
                        lambda: load_checkpoint({str(damaged_copy)!r}, ModelConfig(**{asdict(TINY)!r}))):
            try:
                value = attempt()
                print("accepted", repr(value)[:300])  # repr touches every element, as any use would
            except CheckpointError as err:
                print("refused:", str(err).replace(chr(10), " "))
        bf16 = np.array([1.5, -2.0], ml_dtypes.bfloat16)
        assert np.dtype(ml_dtypes.bfloat16).itemsize == 2 and bf16.tobytes() == b"\\xc0\\x3f\\x00\\xc0"
        assert np.dtype(np.float32).byteorder == "=" and np.float32(1.5).tobytes() == b"\\x00\\x00\\xc0\\x3f"
        print("intact")
    """
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"crashed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}"
    read, loaded, intact = result.stdout.splitlines()
    assert read.startswith("refused:") and str(file) in read and fragment in read, read
    assert loaded.startswith("refused:") and path in loaded and file.name in loaded, loaded
    assert intact == "intact"
