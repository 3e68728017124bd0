"""The parameter pytree, and its mapping to the leaves of xAI's released checkpoint.

Our pytree stacks the 64 decoder layers along a leading axis L so the model can `lax.scan` over them:

    {"embedding": [V, D], "final_norm": [D],
     "layers": {"pre_attn_norm": [L, D], ..., "q_proj": QuantizedWeight([L, D, Hq*K]), ...}}

`LAYER_PARAMS` and `TOP_PARAMS` say, as data, which released leaf each of ours comes from; `LAYER_AXES` and
`TOP_AXES` name each one's dimensions (the shapes follow from them, the sharding rules lay them out). Large
matrices are `QuantizedWeight` (int8 `weight` + `scales` with G groups along the input axis K: `[..., G, N]`),
or plain bfloat16 arrays when dequantised at load time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np

from grok1.config import ModelConfig

# Dimension letters used in shape comments throughout the model:
#   V vocab, D embedding, L layers, H query heads, Hkv key/value heads, K key size, F FFN size, E experts,
#   G scale groups along a matmul's input axis, B batch (slots), T tokens, S cached positions.


@jax.tree_util.register_dataclass
@dataclass
class QuantizedWeight:
    """An int8 matrix with bfloat16 scales, as `QuantizedWeight8bit` in the release.

    weight: int8 [..., K, N]; scales: [..., G, N], where G divides K (scale group g covers rows
    g*K/G ... (g+1)*K/G - 1).
    """

    weight: Any
    scales: Any

    @property
    def shape(self):
        return self.weight.shape


class LeafSpec(NamedTuple):
    reference_path: str  # path below params/ in the release; "{layer}" is the decoder layer index
    quantised: bool


TOP_PARAMS: dict[str, LeafSpec] = {
    "embedding": LeafSpec("language_model/in_out_embed/embeddings", False),
    "final_norm": LeafSpec("language_model/rms_norm/scale", False),
}

_LAYER = "transformer/decoder_layer_{layer}/"
LAYER_PARAMS: dict[str, LeafSpec] = {
    "pre_attn_norm": LeafSpec(_LAYER + "rms_norm/scale", False),
    "post_attn_norm": LeafSpec(_LAYER + "rms_norm_1/scale", False),
    "pre_moe_norm": LeafSpec(_LAYER + "rms_norm_2/scale", False),
    "post_moe_norm": LeafSpec(_LAYER + "rms_norm_3/scale", False),
    "q_proj": LeafSpec(_LAYER + "multi_head_attention/query/w", True),
    "k_proj": LeafSpec(_LAYER + "multi_head_attention/key/w", True),
    "v_proj": LeafSpec(_LAYER + "multi_head_attention/value/w", True),
    "o_proj": LeafSpec(_LAYER + "multi_head_attention/linear/w", True),
    "gate": LeafSpec(_LAYER + "router/w", False),  # the MoE gate; the release calls it "router"
    "ffn_gelu_in": LeafSpec(_LAYER + "moe/linear/w", True),  # gelu(x @ w) ...
    "ffn_value_in": LeafSpec(_LAYER + "moe/linear_v/w", True),  # ... * (x @ w_v) ...
    "ffn_out": LeafSpec(_LAYER + "moe/linear_1/w", True),  # ... @ w_1
}


# Logical axis names of every parameter's dimensions, in shape order (MaxText's logical axes): the shapes
# below are read from them, and sharding/rules.py maps them to mesh axes. A tuple names a merged dimension,
# major axis first: q_proj's output [Hq*K] is ("heads", "head_dim"). The gate's output has its own name
# ("gate_experts", one score per expert), since it is laid out unlike the experts' stacked weights.
TOP_AXES: dict[str, tuple] = {"embedding": ("vocab", "embed"), "final_norm": ("embed",)}
LAYER_AXES: dict[str, tuple] = {  # without the stacked L axis ("layers")
    "pre_attn_norm": ("embed",), "post_attn_norm": ("embed",), "pre_moe_norm": ("embed",),
    "post_moe_norm": ("embed",),
    "q_proj": ("embed", ("heads", "head_dim")),  # [D, H*K]
    "k_proj": ("embed", ("kv_heads", "head_dim")),  # [D, Hkv*K]
    "v_proj": ("embed", ("kv_heads", "head_dim")),
    "o_proj": (("heads", "head_dim"), "embed"),  # [H*K, D]
    "gate": ("embed", "gate_experts"),  # [D, E]
    "ffn_gelu_in": ("experts", "embed", "ffn"),  # [E, D, F]
    "ffn_value_in": ("experts", "embed", "ffn"),
    "ffn_out": ("experts", "ffn", "embed"),  # [E, F, D]
}
# The scales [..., G, N] of a quantised weight [..., K, N] with G > 1 groups along K are named as K (a group
# is a block of K's rows, so they split as K does); a single group has its own name.
SCALE_GROUPS = "scale_groups"


def param_axes(path: str) -> tuple | None:
    """Logical axes of a param by its path in the pytree ("embedding", "layers/q_proj"); None if unknown."""
    top, _, layer_name = path.partition("/")
    if top == "layers" and layer_name in LAYER_AXES:
        return ("layers", *LAYER_AXES[layer_name])
    return TOP_AXES.get(path)


def scale_axes(weight_axes: tuple, groups: int) -> tuple:
    """Logical axes of the scales [..., G, N] of a quantised weight whose axes are `weight_axes` [..., K, N]."""
    *lead, k_axis, n_axis = weight_axes
    return (*lead, k_axis if groups > 1 else SCALE_GROUPS, n_axis)


def axis_sizes(config: ModelConfig) -> dict[str, int]:
    """The size of each logical axis of the params."""
    return {"layers": config.num_layers, "vocab": config.vocab_size, "embed": config.emb_size,
            "heads": config.num_q_heads, "kv_heads": config.num_kv_heads, "head_dim": config.key_size,
            "experts": config.num_experts, "gate_experts": config.num_experts, "ffn": config.ffn_size}


def _shape(axes: tuple, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(math.prod(sizes[a] for a in axis) if isinstance(axis, tuple) else sizes[axis] for axis in axes)


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer parameter (without the stacked L axis); for quantised ones, the int8 weight."""
    sizes = axis_sizes(config)
    return {name: _shape(axes, sizes) for name, axes in LAYER_AXES.items()}


def top_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    sizes = axis_sizes(config)
    return {name: _shape(axes, sizes) for name, axes in TOP_AXES.items()}


def reference_leaves(config: ModelConfig) -> list[tuple[str, str, int | None]]:
    """(reference path, our name, layer or None) for every leaf, in the release's file order.

    The release's tree is haiku's {module: {param: array}}, flattened with sorted dict keys at each level,
    so modules sort as strings ("decoder_layer_10" before "decoder_layer_2"), then params within a module.
    """
    entries = [(spec.reference_path, name, None) for name, spec in TOP_PARAMS.items()]
    for layer in range(config.num_layers):
        for name, spec in LAYER_PARAMS.items():
            entries.append((spec.reference_path.format(layer=layer), name, layer))

    def sort_key(entry):
        module, _, param = entry[0].rpartition("/")
        return (module, param)

    return [("params/" + path, name, layer) for path, name, layer in sorted(entries, key=sort_key)]


def is_quantised(name: str) -> bool:
    spec = LAYER_PARAMS.get(name) or TOP_PARAMS[name]
    return spec.quantised


def dequantize(w: QuantizedWeight, dtype=np.float32):
    """int8 weight [..., K, N] times scales [..., G, N] (group g scales rows of the g-th K/G block)."""
    weight, scales = w.weight, w.scales
    *lead, k, n = weight.shape
    groups = scales.shape[-2]
    xp = np if isinstance(weight, np.ndarray) else jax.numpy
    grouped = xp.reshape(weight, (*lead, groups, k // groups, n)).astype(scales.dtype) * scales[..., :, None, :]
    return xp.reshape(grouped, (*lead, k, n)).astype(dtype)


def param_bytes(params) -> int:
    """Bytes the arrays of a params pytree occupy (int8 weights and their scales counted as stored)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))
