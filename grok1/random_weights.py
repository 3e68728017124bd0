"""Random Grok-1 weights in our stacked params pytree, quantised like the release (for tests and benchmarks).

Public API: `random_params`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_dtypes
import numpy as np

from grok1.config import ModelConfig
from grok1.params import QuantizedWeight, is_quantised, layer_shapes

_NORM_JITTER = 0.1  # norm scales are 1 +- this, as in the golden set (the reference initialises them to 0)
_TARGET_LOGIT_STD = 3.0  # final norm is chosen so logits are peaked but finite (golden set: about 2.6)
_EMBEDDING_CHUNK_ROWS = 8192


def _validated_scale_groups(config: ModelConfig, scale_groups: dict[str, int] | None) -> dict[str, int]:
    shapes = layer_shapes(config)
    groups = {name: 1 for name in shapes if is_quantised(name)}
    for name, count in (scale_groups or {}).items():
        if name not in groups:
            raise ValueError(f"scale_groups: {name!r} is not a quantised param (one of {sorted(groups)})")
        k = shapes[name][-2]
        if not isinstance(count, int) or count <= 0 or k % count:
            raise ValueError(f"scale_groups[{name!r}] = {count!r} must be a positive divisor of K={k}")
        groups[name] = count
    return groups


def _random_quantised(rng: np.random.Generator, shape: tuple[int, ...], groups: int):
    """int8 uniform in [-127, 127] with per-output-channel scales so that x @ w keeps x's scale."""
    *lead, k, n = shape
    weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
    # Uniform ints in [-127, 127] have std 127/sqrt(3); dividing by that and sqrt(K) gives unit gain.
    base = math.sqrt(3.0) / (127.0 * math.sqrt(k))
    jitter = rng.uniform(0.9, 1.1, size=(*lead, groups, n)).astype(np.float32)
    return weight, (base * jitter).astype(ml_dtypes.bfloat16)


def _random_layer_leaf(rng: np.random.Generator, name: str, shape: tuple[int, ...], config: ModelConfig):
    if name == "gate":
        return (rng.standard_normal(shape, dtype=np.float32) / math.sqrt(config.emb_size)).astype(np.float32)
    return (1.0 + _NORM_JITTER * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def _random_embedding(rng: np.random.Generator, config: ModelConfig) -> np.ndarray:
    """N(0, 1) * init scale / embedding multiplier, so the model's scaled input has unit scale."""
    std = config.embedding_init_scale / config.embedding_multiplier_scale
    embedding = np.empty((config.vocab_size, config.emb_size), ml_dtypes.bfloat16)
    for start in range(0, config.vocab_size, _EMBEDDING_CHUNK_ROWS):  # chunks: no full float32 copy
        rows = min(_EMBEDDING_CHUNK_ROWS, config.vocab_size - start)
        chunk = rng.standard_normal((rows, config.emb_size), dtype=np.float32) * np.float32(std)
        embedding[start:start + rows] = chunk.astype(ml_dtypes.bfloat16)
    return embedding


def _final_norm_scale(config: ModelConfig) -> float:
    """Logit std = scale * embedding std * sqrt(D) * output multiplier; pick the scale for the target."""
    embedding_std = config.embedding_init_scale / config.embedding_multiplier_scale
    return _TARGET_LOGIT_STD / (embedding_std * math.sqrt(config.emb_size) * config.output_multiplier_scale)


def random_params(config: ModelConfig, seed: int = 0, *,
                  scale_groups: dict[str, int] | None = None) -> dict[str, Any]:
    """Random weights in our stacked pytree (numpy), quantised like the release and in its dtypes (bfloat16
    embedding and scales, float32 norms and gate), which `save_checkpoint` writes unchanged.

    `scale_groups` maps a quantised param (e.g. "ffn_out", "o_proj") to its number of scale groups G > 1.
    """
    groups = _validated_scale_groups(config, scale_groups)
    rng = np.random.default_rng(seed)
    shapes = layer_shapes(config)
    num_layers = config.num_layers
    layers: dict[str, Any] = {}
    for name, shape in shapes.items():
        if is_quantised(name):
            scales_shape = (*shape[:-2], groups[name], shape[-1])
            layers[name] = QuantizedWeight(np.empty((num_layers, *shape), np.int8),
                                           np.empty((num_layers, *scales_shape), ml_dtypes.bfloat16))
        else:
            layers[name] = np.empty((num_layers, *shape), np.float32)
    for layer in range(num_layers):  # one layer at a time: no temporaries larger than a layer
        for name, shape in shapes.items():
            if is_quantised(name):
                layers[name].weight[layer], layers[name].scales[layer] = _random_quantised(rng, shape,
                                                                                           groups[name])
            else:
                layers[name][layer] = _random_layer_leaf(rng, name, shape, config)
    embedding = _random_embedding(rng, config)
    final_norm = (_final_norm_scale(config)
                  * (1.0 + 0.01 * rng.standard_normal(config.emb_size, dtype=np.float32))).astype(np.float32)
    return {"embedding": embedding, "final_norm": final_norm, "layers": layers}
