"""The parameter pytree, and its mapping to the leaves of xAI's released checkpoint.

Our pytree stacks the 64 decoder layers along a leading axis L so the model can `lax.scan` over them:

    {"embedding": [V, D], "final_norm": [D],
     "layers": {"pre_attn_norm": [L, D], ..., "q_proj": QuantizedWeight([L, D, Hq*K]), ...}}

`LAYER_PARAMS` and `TOP_PARAMS` say, as data, which released leaf each of ours comes from. Large matrices are
`QuantizedWeight` (int8 `weight` + `scales` with G groups along the input axis K: `[..., G, N]`), or plain
bfloat16 arrays when dequantised at load time.
"""

from __future__ import annotations

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


def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each per-layer parameter (without the stacked L axis); for quantised ones, the int8 weight."""
    d, k, f, e = config.emb_size, config.key_size, config.ffn_size, config.num_experts
    return {
        "pre_attn_norm": (d,), "post_attn_norm": (d,), "pre_moe_norm": (d,), "post_moe_norm": (d,),
        "q_proj": (d, config.num_q_heads * k),
        "k_proj": (d, config.num_kv_heads * k),
        "v_proj": (d, config.num_kv_heads * k),
        "o_proj": (config.num_q_heads * k, d),
        "gate": (d, e),
        "ffn_gelu_in": (e, d, f),
        "ffn_value_in": (e, d, f),
        "ffn_out": (e, f, d),
    }


def top_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {"embedding": (config.vocab_size, config.emb_size), "final_norm": (config.emb_size,)}


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
