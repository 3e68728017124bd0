"""Sharding: partition rules, mesh validation, expert-parallel dispatch, and sharded == unsharded forward."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from grok1.config import ConfigError, Grok1Config, ModelConfig
from grok1.model import KV_CACHE_AXES, KVCache
from grok1.paged_attention import PAGED_KV_AXES
from grok1.params import LAYER_AXES, TOP_AXES, QuantizedWeight, dequantize, param_axes, scale_axes
from grok1.random_weights import random_params
from grok1.steps import (
    FORWARD_GATHERED_AXES,
    FORWARD_SHARE_AXES,
    SAMPLE_H_AXES,
    SAMPLE_LOGITS_AXES,
    SAMPLED_AXES,
    SETTINGS_AXES,
    init_state,
)
from sharding.expert_parallel import (
    CHOICE_AXES,
    MOE_PARAMS,
    TOKEN_AXES,
    VALID_AXES,
    capacity,
    dispatch_positions,
    shard_map_specs,
)
from sharding.mesh import MeshShape
from sharding.rules import (
    LOGICAL_AXIS_RULES,
    ShardingRuleError,
    layer_specs,
    logical_spec,
    param_specs,
    spec_for,
    state_specs,
)

SMALL = ModelConfig(vocab_size=512, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
                    sequence_len=128)


def test_every_parameter_matches_exactly_one_rule():
    specs = param_specs(random_params(SMALL, scale_groups={"ffn_out": 8, "o_proj": 8}))
    assert specs["layers"]["ffn_out"].weight == P(None, "ep", "tp", None)
    assert specs["layers"]["ffn_out"].scales == P(None, "ep", "tp", None)  # G > 1: groups follow K
    assert specs["layers"]["ffn_gelu_in"].scales == P(None, "ep", None, "tp")  # G == 1: not split
    assert specs["layers"]["q_proj"].weight == P(None, None, "tp")


def test_unmatched_and_doubly_matched_parameters_are_errors_naming_them():
    with pytest.raises(ShardingRuleError, match="'layers/new_thing' has no logical axes"):
        spec_for("layers/new_thing")
    with pytest.raises(ShardingRuleError, match="'layers/new_thing' has no logical axes"):
        layer_specs({"new_thing": np.zeros((4, 4))})
    with pytest.raises(ShardingRuleError, match="'embedding': logical axis 'embed' matches 2 rules"):
        spec_for("embedding", LOGICAL_AXIS_RULES + (("embed", "tp"),))
    with pytest.raises(ShardingRuleError, match="'layers/q_proj': logical axis 'heads' matches no rule"):
        spec_for("layers/q_proj", tuple(rule for rule in LOGICAL_AXIS_RULES if rule[0] != "heads"))


def test_a_name_the_model_uses_without_a_rule_raises_when_params_are_laid_out():
    rules = tuple(rule for rule in LOGICAL_AXIS_RULES if rule[0] != "ffn")
    with pytest.raises(ShardingRuleError, match="'layers/ffn_gelu_in' weight: logical axis 'ffn' matches no rule"):
        param_specs(random_params(SMALL), rules)


def test_a_parameter_whose_axis_names_do_not_match_its_rank_is_an_error_naming_it():
    params = random_params(SMALL)
    params["layers"]["gate"] = params["layers"]["gate"][..., None]
    with pytest.raises(ShardingRuleError, match=r"'layers/gate' has 4 dimensions \(2, 64, 8, 1\) but 3 axis names"):
        param_specs(params)


def test_bad_layouts_of_merged_dimensions_and_repeated_mesh_axes_are_refused():
    rules = tuple((name, "ep" if name == "head_dim" else mesh_axis) for name, mesh_axis in LOGICAL_AXIS_RULES)
    with pytest.raises(ShardingRuleError, match="x: merged dimension .* minor axis 'head_dim'"):
        logical_spec((("heads", "head_dim"),), "x", rules)
    with pytest.raises(ShardingRuleError, match="x: axes .* split two dimensions over one mesh axis"):
        logical_spec(("heads", "ffn"), "x")


def test_every_parameter_names_as_many_axes_as_it_has_dimensions():
    """For the released scale groups (G = 8 on o_proj and ffn_out) and G = 1, weights and scales."""
    for groups in (None, {"o_proj": 8, "ffn_out": 8}):
        params = random_params(SMALL, scale_groups=groups)
        flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
        for path, leaf in flat:
            name = "/".join(key.key for key in path)
            axes = param_axes(name)
            assert axes is not None and len(axes) == len(leaf.shape), name
            if isinstance(leaf, QuantizedWeight):
                assert len(scale_axes(axes, leaf.scales.shape[-2])) == leaf.scales.ndim, name
    assert len(KV_CACHE_AXES) == KVCache.zeros(SMALL, 2, 8).k.ndim


def test_the_rules_name_exactly_the_axes_in_use_once_each():
    used = {"scale_groups", *KV_CACHE_AXES, *PAGED_KV_AXES, *TOKEN_AXES, *VALID_AXES, *CHOICE_AXES,
            *SAMPLE_H_AXES, *SAMPLE_LOGITS_AXES, *SAMPLED_AXES, *SETTINGS_AXES, *FORWARD_SHARE_AXES,
            *FORWARD_GATHERED_AXES}
    for axes in [*LAYER_AXES.values(), *TOP_AXES.values()]:
        used |= {part for dim in axes for part in (dim if isinstance(dim, tuple) else (dim,))}
    names = [name for name, _ in LOGICAL_AXIS_RULES]
    assert len(names) == len(set(names)) and set(names) == used


def test_decode_state_and_moe_specs_keep_their_layouts():
    """As layout.py's KV_CACHE_SPEC and expert_parallel's hand-written shard_map specs were."""
    config = Grok1Config(model=SMALL).replace(engine={"max_slots": 2, "max_len": 16})
    state = jax.eval_shape(functools.partial(init_state, config))
    specs = state_specs(state)
    assert specs.cache.k == specs.cache.v == P(None, "ep", None, "tp", None)
    assert all(spec == P() for spec in jax.tree.leaves(dataclasses.replace(specs, cache=None),
                                                       is_leaf=lambda x: isinstance(x, P)))
    for groups in (1, 8):
        layer = jax.tree.map(lambda x: x[0], random_params(SMALL, scale_groups={"ffn_out": groups}
                                                           if groups > 1 else None)["layers"])
        weights = {name: layer[name] for name in MOE_PARAMS}
        for forced in (False, True):
            in_specs, out_specs = shard_map_specs(weights, forced)
            assert in_specs[:2 + forced] == (P("ep", None), P("ep"), *[P("ep", None)] * forced)
            assert out_specs == (P("ep", None), P("ep", None))
            gate, gelu, value, out = in_specs[2 + forced:]
            assert _padded(gate, 2) == P(None, None)
            assert gelu == value == QuantizedWeight(P("ep", None, "tp"), P("ep", None, "tp"))
            assert out == QuantizedWeight(P("ep", "tp", None), P("ep", "tp" if groups > 1 else None, None))

# Today's layouts, pinned (what the regex rules of sharding/rules.py gave before the logical-axis table):
# weight specs by parameter, and the scales' specs for G == 1 and G == 8 groups along the input axis.
_ = None
PINNED_SPECS = {
    "embedding": P("tp", _), "final_norm": P(_),
    **{f"layers/{n}": P(_, _) for n in ("pre_attn_norm", "post_attn_norm", "pre_moe_norm", "post_moe_norm")},
    "layers/gate": P(_, _, _),
    **{f"layers/{n}": P(_, _, "tp") for n in ("q_proj", "k_proj", "v_proj")},
    "layers/o_proj": P(_, "tp", _),
    "layers/ffn_gelu_in": P(_, "ep", _, "tp"), "layers/ffn_value_in": P(_, "ep", _, "tp"),
    "layers/ffn_out": P(_, "ep", "tp", _),
}
PINNED_SCALES = {  # (parameter, G) -> spec of its scales [L, ..., G, N]
    **{(f"layers/{n}", g): P(_, _, "tp") for n in ("q_proj", "k_proj", "v_proj") for g in (1, 8)},
    ("layers/o_proj", 1): P(_, _, _), ("layers/o_proj", 8): P(_, "tp", _),
    **{(f"layers/{n}", g): P(_, "ep", _, "tp") for n in ("ffn_gelu_in", "ffn_value_in") for g in (1, 8)},
    ("layers/ffn_out", 1): P(_, "ep", _, _), ("layers/ffn_out", 8): P(_, "ep", "tp", _),
}


def _padded(spec: P, ndim: int) -> P:
    """A spec with its trailing Nones written out: P() and P(None, None) are one layout of a 2-d array."""
    return P(*tuple(spec), *(None,) * (ndim - len(spec)))


def _specs_by_path(params):
    specs = param_specs(params)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
    for path, leaf in flat:
        name = "/".join(key.key for key in path)
        yield name, leaf, functools.reduce(lambda node, key: node[key.key], path, specs)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("dequantized", [False, True])
def test_every_parameter_keeps_the_layout_the_regex_rules_gave(groups, dequantized):
    params = random_params(SMALL, scale_groups={"o_proj": groups, "ffn_out": groups} if groups > 1 else None)
    if dequantized:
        params = jax.tree.map(lambda x: dequantize(x) if isinstance(x, QuantizedWeight) else x, params,
                              is_leaf=lambda x: isinstance(x, QuantizedWeight))
    seen = set()
    for name, leaf, spec in _specs_by_path(params):
        seen.add(name)
        if isinstance(leaf, QuantizedWeight):
            assert _padded(spec.weight, leaf.weight.ndim) == PINNED_SPECS[name], name
            assert _padded(spec.scales, leaf.scales.ndim) == PINNED_SCALES[name, groups], name
        else:
            assert _padded(spec, leaf.ndim) == PINNED_SPECS[name], name
    assert seen == set(PINNED_SPECS)


@pytest.mark.parametrize("ep,tp,message", [
    (3, 1, "ep=3 does not divide model.num_experts"),
    (1, 16, "tp=16 does not divide model.num_kv_heads"),
    (16, 1, "ep=16 does not divide model.num_experts"),
])
def test_mesh_shapes_that_do_not_divide_the_model_are_refused(ep, tp, message):
    with pytest.raises(ConfigError, match=message):
        MeshShape(ep, tp).validate(Grok1Config())


def test_released_model_accepts_the_layouts_it_should():
    for ep, tp in [(1, 8), (8, 1), (2, 4), (4, 2), (8, 8)]:
        MeshShape(ep, tp).validate(Grok1Config())


def test_dispatch_positions_count_each_owner_separately_and_drop_over_capacity():
    owner = jnp.asarray([0, 1, 0, 2, 0, 1, 2])  # 2 = ep: not sent
    pos, kept, dropped = dispatch_positions(owner, ep=2, cap=2)
    assert list(np.asarray(pos)[[0, 2, 4]]) == [0, 1, 2]
    assert list(np.asarray(pos)[[1, 5]]) == [0, 1]
    assert list(np.asarray(kept)) == [True, True, True, False, False, True, False]
    assert list(np.asarray(dropped)) == [False, False, False, False, True, False, False]


def test_dropless_capacity_holds_every_assignment_to_one_owner():
    assert capacity(16, 2, 4, 2, None) == 32
    assert capacity(16, 2, 1, 8, None) == 16  # one expert per rank: a token sends it at most one row
    assert capacity(16, 2, 1, 8, None, distinct_experts=False) == 32
    assert capacity(16, 2, 4, 2, 0.5) == 8


@pytest.mark.slow
def test_sharded_forward_equals_unsharded_on_every_mesh_shape(golden_dir):
    """1x1, 2x1, 1x2, 2x2, 4x1, 8x1 on 8 virtual CPU devices, in a fresh process."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.sharding.sharded_forward_check", str(golden_dir)],
                          cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    shapes = {(m["ep"], m["tp"]) for m in results["meshes"]}
    assert {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (8, 1)} <= shapes
    for m in results["meshes"]:
        label = f"ep={m['ep']} tp={m['tp']} case {m['case']}"
        assert m["rel_to_golden"] <= 0.04, f"{label}: {m['rel_to_golden']:.4f} from the golden logits"
        assert m["rel_to_single"] <= 0.02, f"{label}: {m['rel_to_single']:.4f} from one device"
        assert m["free_rel_to_single"] <= 0.02, label
        assert m["experts_equal"], f"{label}: free routing chose other experts than one device"
    for d in results["drops"]:
        assert d["reported"] == d["expected"], d
    assert any(d["expected"] > 0 for d in results["drops"])
