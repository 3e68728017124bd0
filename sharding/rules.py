"""Partition rules as data: one table from parameter path to layout, resolved strictly.

Mesh axes: `ep` splits experts (and, for attention, decode slots: data parallel), `tp` splits attention heads
and the FFN hidden size. Every parameter must match exactly one rule: none or several is an error naming the
parameter (xai's `apply_rules` only logs and silently replicates).

Rules name the layout of a weight; the scales of a quantised weight follow it, except along their group axis
G (the weight's input axis K cut into G blocks), which is split only when the weight's K is split and G > 1.
"""

from __future__ import annotations

import re

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grok1.params import QuantizedWeight
from sharding.mesh_shape import EP, TP

# (regex on the parameter path, spec of the weight). Stacked layer params carry a leading L axis.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    (r"^embedding$", P(TP, None)),  # [V, D]: vocab split, so the output logits are split too
    (r"^final_norm$", P()),
    (r"^layers/(pre|post)_(attn|moe)_norm$", P()),  # [L, D]
    (r"^layers/[qkv]_proj$", P(None, None, TP)),  # [L, D, heads*K]: column parallel, whole heads
    (r"^layers/o_proj$", P(None, TP, None)),  # [L, H*K, D]: row parallel, partial sums all-reduced
    (r"^layers/gate$", P()),  # [L, D, E]: every rank gates its own tokens
    (r"^layers/ffn_(gelu|value)_in$", P(None, EP, None, TP)),  # [L, E, D, F]
    (r"^layers/ffn_out$", P(None, EP, TP, None)),  # [L, E, F, D]
)

# The KV cache [L, B, S, Hkv, K]: slots split over ep (attention runs data parallel), KV heads over tp.
KV_CACHE_SPEC = P(None, EP, None, TP, None)


class ShardingRuleError(ValueError):
    pass


def _path_name(path) -> str:
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def spec_for(name: str, rules=PARTITION_RULES) -> P:
    matches = [spec for pattern, spec in rules if re.search(pattern, name)]
    if len(matches) != 1:
        what = "no rule" if not matches else f"{len(matches)} rules"
        raise ShardingRuleError(f"parameter {name!r} matches {what}; every parameter must match exactly one")
    return matches[0]


def _scales_spec(weight_spec: P, groups: int) -> P:
    *lead, k_axis, n_axis = tuple(weight_spec)
    return P(*lead, k_axis if groups > 1 else None, n_axis)


def param_specs(params, rules=PARTITION_RULES):
    """A pytree of PartitionSpecs matching `params` (QuantizedWeight nodes get weight and scales specs)."""

    def one(path, leaf):
        name = _path_name(path)
        spec = spec_for(name, rules)
        if isinstance(leaf, QuantizedWeight):
            padded = P(*(tuple(spec) + (None,) * (leaf.weight.ndim - len(spec))))
            return QuantizedWeight(padded, _scales_spec(padded, leaf.scales.shape[-2]))
        return spec

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def param_shardings(params, mesh, rules=PARTITION_RULES):
    specs = param_specs(params, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))
