"""Tests of grok1.config: the shipped configs, the released Grok-1 numbers, and errors that name the key."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from grok1.config import (
    ConfigError,
    EngineConfig,
    Grok1Config,
    ModelConfig,
    config_from_dict,
    load_config,
    reference_ffn_size,
)
from tests.conftest import DEFAULT_GOLDEN_DIR, is_public_golden_set

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.iterdir() if p.suffix in (".yaml", ".yml", ".json"))

# The tensor shapes of xAI's released checkpoint (xai-org/grok-1), written out independently of grok1.params.
RELEASED_LAYER_SHAPES = [
    (6144, 48 * 128),  # multi_head_attention/query/w
    (6144, 8 * 128),  # multi_head_attention/key/w
    (6144, 8 * 128),  # multi_head_attention/value/w
    (48 * 128, 6144),  # multi_head_attention/linear/w
    (6144, 8),  # router/w
    (8, 6144, 32768),  # moe/linear/w
    (8, 6144, 32768),  # moe/linear_v/w
    (8, 32768, 6144),  # moe/linear_1/w
    (6144,), (6144,), (6144,), (6144,),  # rms_norm, rms_norm_1, rms_norm_2, rms_norm_3
]
RELEASED_TOP_SHAPES = [(131072, 6144), (6144,)]  # in_out_embed/embeddings, rms_norm/scale


def test_config_files_found():
    assert {"grok-1.yaml", "grok-1-tiny.yaml"} <= {p.name for p in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_every_config_file_parses_and_validates(path):
    config = load_config(path)
    assert isinstance(config, Grok1Config)
    assert config.validate() is config
    assert config.engine.max_len <= config.model.sequence_len
    assert config.model.ffn_size % 8 == 0


def test_grok1_has_the_released_values():
    model = load_config(CONFIG_DIR / "grok-1.yaml").model
    assert (model.num_layers, model.emb_size, model.num_q_heads, model.num_kv_heads, model.key_size) == \
        (64, 6144, 48, 8, 128)
    assert (model.widening_factor, model.num_experts, model.num_selected_experts) == (8.0, 8, 2)
    assert (model.vocab_size, model.sequence_len, model.pad_token, model.eos_token) == (131072, 8192, 0, 2)
    assert model.ffn_size == 32768
    assert math.isclose(model.attn_output_multiplier, 0.08838834764831845, rel_tol=1e-12)  # 1/sqrt(128)
    assert math.isclose(model.embedding_multiplier_scale, 78.38367176906169, rel_tol=1e-12)
    assert math.isclose(model.output_multiplier_scale, 0.5773502691896257, rel_tol=1e-12)  # 1/sqrt(3)
    # The defaults of ModelConfig are the release too.
    assert model == ModelConfig()


def test_grok1_parameter_count():
    """Grok-1 is announced as 314B parameters; the released tensors hold 315.68B weights (0.54% more).

    The count must equal the sum over the released shapes exactly, and be within 1% of the announced 314B.
    """
    count = load_config(CONFIG_DIR / "grok-1.yaml").model.param_count()
    released = (sum(math.prod(s) for s in RELEASED_TOP_SHAPES)
                + 64 * sum(math.prod(s) for s in RELEASED_LAYER_SHAPES))
    assert count == released, f"param_count {count:,} != {released:,} from the released tensor shapes"
    assert abs(count - 314e9) / 314e9 <= 0.01, f"{count / 1e9:.2f}B parameters is not about 314B"


def test_tiny_config_matches_the_golden_architecture(golden_dir):
    if not is_public_golden_set(golden_dir):
        pytest.skip(f"{golden_dir} is not the public golden set (its config.json differs from "
                    f"{DEFAULT_GOLDEN_DIR / 'config.json'}): grok-1-tiny.yaml describes only the public one")
    tiny = load_config(CONFIG_DIR / "grok-1-tiny.yaml").model
    golden = load_config(golden_dir / "config.json").model
    for field in dataclasses.fields(ModelConfig):
        assert getattr(tiny, field.name) == getattr(golden, field.name), \
            f"grok-1-tiny.yaml model.{field.name} differs from the golden config.json"
    assert tiny == golden


def test_golden_config_json_loads_as_model_section(golden_dir):
    raw = json.loads((golden_dir / "config.json").read_text())
    model = load_config(golden_dir / "config.json").model
    for key, value in raw.items():
        assert getattr(model, key) == value, key


def test_reference_ffn_size():
    assert reference_ffn_size(6144, 8) == 32768
    assert reference_ffn_size(128, 8) == 688
    assert reference_ffn_size(64, 8) == 344  # 341 rounded up to a multiple of 8


# ------------------------------------------------------------------------------------------------ errors


def base_config() -> dict:
    """The tiny YAML's content: valid, and small enough that every error below is the only one."""
    return yaml.safe_load((CONFIG_DIR / "grok-1-tiny.yaml").read_text())


def with_change(section: str | None, key: str, value) -> dict:
    data = base_config()
    if section is None:
        data[key] = value
    else:
        data.setdefault(section, {})
        data[section][key] = value
    return data


@pytest.mark.parametrize("section,key", [(None, "modle"), ("model", "num_head"), ("engine", "slots"),
                                         ("checkpoint", "dir")])
def test_unknown_keys_are_refused(section, key):
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_change(section, key, 1))
    named = key if section is None else f"{section}.{key}"
    assert named in str(error.value)
    assert "unknown key" in str(error.value)


BAD_VALUES = [
    ("model", "num_kv_heads", 3, "model.num_kv_heads"),  # does not divide num_q_heads = 4
    ("model", "key_size", 33, "model.key_size"),  # odd: no rotary pairs
    ("model", "num_selected_experts", 9, "model.num_selected_experts"),  # more than num_experts = 8
    ("model", "emb_size", -128, "model.emb_size"),
    ("model", "num_layers", 0, "model.num_layers"),
    ("model", "num_experts", -1, "model.num_experts"),
    ("model", "vocab_size", -5, "model.vocab_size"),
    ("model", "emb_size", 128.0, "model.emb_size"),  # sizes are integers
    ("model", "num_layers", True, "model.num_layers"),
    ("model", "widening_factor", -8.0, "model.widening_factor"),
    ("model", "eos_token", 131072, "model.eos_token"),  # outside the vocabulary
    ("model", "eos_token", -1, "model.eos_token"),
    ("model", "pad_token", 200000, "model.pad_token"),
    ("engine", "max_len", 257, "engine.max_len"),  # longer than model.sequence_len = 256
    ("engine", "max_slots", 0, "engine.max_slots"),
    ("engine", "moe_block_size", -16, "engine.moe_block_size"),
    ("engine", "prefill_buckets", [32, 16], "engine.prefill_buckets"),
    ("checkpoint", "dequantize_on_load", "yes", "checkpoint.dequantize_on_load"),
    ("checkpoint", "path", 5, "checkpoint.path"),
    (None, "tokenizer", 7, "tokenizer"),
    # YAML's `true` is an int to isinstance(), but never a token id or a bucket.
    ("model", "eos_token", True, "model.eos_token"),
    ("model", "pad_token", False, "model.pad_token"),
    ("engine", "prefill_buckets", [True, 32], "engine.prefill_buckets"),
]


@pytest.mark.parametrize("section,key,value,named", BAD_VALUES,
                         ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD_VALUES])
def test_impossible_values_are_refused_naming_the_key(section, key, value, named):
    with pytest.raises(ConfigError) as error:
        config_from_dict(with_change(section, key, value))
    assert named in str(error.value)


def test_file_errors_name_the_file_and_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(with_change("model", "num_kv_heads", 3)))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value) and "model.num_kv_heads" in str(error.value)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_engine_max_len_defaults_to_at_most_sequence_len():
    data = base_config()
    del data["engine"]["max_len"]
    config = config_from_dict(data)
    assert config.engine.max_len == min(EngineConfig.max_len, config.model.sequence_len)


def test_valid_change_round_trips():
    config = config_from_dict(with_change("model", "num_kv_heads", 4))
    assert config.model.num_kv_heads == 4 and config.model.q_per_kv == 1
