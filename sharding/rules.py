"""Partition rules as data: one table from logical axis to mesh axis, resolved strictly (MaxText's
`logical_axis_rules`).

The model names each dimension once (grok1.params `LAYER_AXES`/`TOP_AXES` for the params, `KV_CACHE_AXES` in
grok1.model for the cache); `LOGICAL_AXIS_RULES` says which mesh axis splits each name. Every layout derives
from the two: the jit shardings of params and scales, the expert-parallel MoE's shard_map specs, the decode
state's, and the planner's bytes per device. Mesh axes: `ep` splits experts (and, for attention, decode
slots: data parallel), `tp` splits attention heads, the FFN hidden size and the vocabulary.

Resolution is strict; each of these is an error naming the parameter (xai's `apply_rules` only logs and
silently replicates): a parameter with no axis names, or with more or fewer than its dimensions; a name
with no rule or with several; a merged dimension (a tuple, major axis first) split along a minor axis; and
one mesh axis splitting two dimensions of one array.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grok1.model import KV_CACHE_AXES, StackedWeight
from grok1.paged_attention import PAGED_KV_AXES, PagedKV
from grok1.params import QuantizedWeight, param_axes, scale_axes
from sharding.mesh_shape import EP, TP

# (logical axis, the mesh axis that splits it or None). Every name must appear exactly once.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),  # the stacked L axis: layers run one after another (lax.scan)
    ("vocab", TP),  # embedding [V, D]: vocab split, so the output logits are split too
    ("embed", None),
    ("heads", TP),  # q_proj column parallel, o_proj row parallel (partial sums all-reduced): whole heads
    ("kv_heads", TP),  # KV heads are split, never replicated
    ("head_dim", None),
    ("gate_experts", None),  # the gate [D, E]: every rank gates its own tokens over all experts
    ("experts", EP),
    ("ffn", TP),
    ("scale_groups", None),  # a single scale group along K
    ("cache_slots", EP),  # attention runs data parallel over ep
    ("cache_positions", None),
    # The paged pool [L, N, bs, Hkv, K]: blocks split over ep, rank-major, each rank's share holding the
    # sequences of its own slots (cluster/kv_ranks.py, grok1.paged_attention); KV heads over tp.
    ("cache_blocks", EP),
    ("block_positions", None),
    ("moe_tokens", EP),  # inside the expert-parallel MoE, each ep rank gates and sends its share of tokens
    ("moe_choices", None),  # the k experts chosen per token
    # A decode step's unembedding and sampling (grok1.steps.decode_sample): its rows split over ep, as the
    # attention's slots are, so no rank computes another's [V] logits; the vocabulary stays split over tp.
    ("sample_rows", EP),
    ("sample_steps", None),
    ("sampled_rows", None),  # its results, gathered: every rank updates the replicated state with them
    ("setting_entries", None),  # and the rows' sampling settings, replicated: every rank takes the same branches
    ("top_logprobs", None),
    # A decode step's layer results by ep rank (grok1.steps.gathered_forward): each rank's share of the slots'
    # h and its expert counts, then gathered in one collective.
    ("rank_shares", EP),
    ("gathered_shares", None),
    ("share_rows", None),
)


class ShardingRuleError(ValueError):
    pass


def _rule(name: str, what: str, rules) -> str | None:
    found = [mesh_axis for logical, mesh_axis in rules if logical == name]
    if len(found) != 1:
        matches = "no rule" if not found else f"{len(found)} rules"
        raise ShardingRuleError(f"{what}: logical axis {name!r} matches {matches}; every axis must match exactly one")
    return found[0]


def logical_spec(axes: tuple, what: str, rules=LOGICAL_AXIS_RULES) -> P:
    """The PartitionSpec of an array whose dimensions are named `axes` (a tuple entry: a merged dimension)."""
    entries = []
    for dim in axes:
        parts = dim if isinstance(dim, tuple) else (dim,)
        mapped = [_rule(part, what, rules) for part in parts]
        minor = [part for part, mesh_axis in zip(parts[1:], mapped[1:]) if mesh_axis is not None]
        if minor:  # a contiguous split of a merged dimension cuts its major axis only
            raise ShardingRuleError(f"{what}: merged dimension {dim} would be split along its minor axis "
                                    f"{minor[0]!r}; only the major axis {parts[0]!r} may be split")
        entries.append(mapped[0])
    used = [mesh_axis for mesh_axis in entries if mesh_axis is not None]
    if len(used) != len(set(used)):
        raise ShardingRuleError(f"{what}: axes {axes} split two dimensions over one mesh axis ({entries})")
    return P(*entries)


def leaf_spec(axes: tuple, leaf, what: str, rules=LOGICAL_AXIS_RULES) -> P | QuantizedWeight:
    """The spec of one param leaf (QuantizedWeight: specs of its weight and scales) named `axes`."""
    if isinstance(leaf, QuantizedWeight):
        return QuantizedWeight(_array_spec(axes, leaf.weight, f"{what} weight", rules),
                               _array_spec(scale_axes(axes, leaf.scales.shape[-2]), leaf.scales, f"{what} scales",
                                           rules))
    return _array_spec(axes, leaf, what, rules)


def _array_spec(axes: tuple, array, what: str, rules) -> P:
    shape = tuple(array.shape)
    if len(axes) != len(shape):
        raise ShardingRuleError(f"{what} has {len(shape)} dimensions {shape} but {len(axes)} axis names {axes}")
    return logical_spec(axes, what, rules)


def path_name(path) -> str:
    """A pytree path as the rules name params: "layers/q_proj", or "layers/q_proj/weight" below a node."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _param_axes(name: str) -> tuple:
    axes = param_axes(name)
    if axes is None:
        raise ShardingRuleError(f"parameter {name!r} has no logical axes (grok1.params LAYER_AXES, TOP_AXES); "
                                "every parameter must name its dimensions")
    return axes


def spec_for(name: str, rules=LOGICAL_AXIS_RULES) -> P:
    """The spec of the param at `name` ("embedding", "layers/q_proj"; for a quantised one, of its weight)."""
    return logical_spec(_param_axes(name), f"parameter {name!r}", rules)


def param_specs(params, rules=LOGICAL_AXIS_RULES):
    """A pytree of PartitionSpecs matching `params` (QuantizedWeight nodes get weight and scales specs)."""

    def one(path, leaf):
        name = path_name(path)
        return leaf_spec(_param_axes(name), leaf, f"parameter {name!r}", rules)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))


def layer_specs(layer: dict, rules=LOGICAL_AXIS_RULES) -> dict:
    """Specs of one decoder layer's params, {name: leaf} without the stacked L axis (as lax.scan sees them); a
    grok1.model.StackedWeight keeps the L axis (its stacked array) and its layer index is replicated."""
    def one(name, leaf):
        what = f"parameter 'layers/{name}'"
        if isinstance(leaf, StackedWeight):
            return StackedWeight(leaf_spec(_param_axes(f"layers/{name}"), leaf.stacked, what, rules), P())
        return leaf_spec(_param_axes(f"layers/{name}")[1:], leaf, what, rules)
    return {name: one(name, leaf) for name, leaf in layer.items()}


def named_shardings(specs, mesh):
    """A pytree of PartitionSpecs as NamedShardings on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params, mesh, rules=LOGICAL_AXIS_RULES):
    return named_shardings(param_specs(params, rules), mesh)


def kv_cache_spec(rules=LOGICAL_AXIS_RULES) -> P:
    """[L, B, S, Hkv, K]: slots split over ep (attention runs data parallel), KV heads over tp."""
    return logical_spec(KV_CACHE_AXES, "the KV cache", rules)


def state_specs(state, rules=LOGICAL_AXIS_RULES):
    """Specs of a grok1.steps.DecodeState: the KV cache by `kv_cache_spec` (a paged pool by PAGED_KV_AXES),
    the rest (lengths, sampling settings, the [B, V] token counts of the penalties) replicated."""
    if isinstance(state.cache, PagedKV):
        cache = logical_spec(PAGED_KV_AXES, "the paged KV pool", rules)
    else:
        cache = kv_cache_spec(rules)
    specs = jax.tree.map(lambda _: P(), state)
    return dataclasses.replace(specs, cache=type(state.cache)(cache, cache))
