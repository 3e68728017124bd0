"""Token sampling inside the jitted step: temperature (0 = greedy), top-k, top-p, per-request seeds.

Each slot carries its own settings and PRNG key; the n-th token of a request uses fold_in(key, n), so a seed
gives the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SlotSampling(NamedTuple):
    """Per-slot sampling settings, all [B]: temperature f32 (0 greedy), top_p f32 (1 off),
    top_k int32 (0 off), key uint32 [B, 2] (the request's seed)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    key: jax.Array

    @staticmethod
    def defaults(batch: int) -> "SlotSampling":
        return SlotSampling(jnp.zeros(batch, jnp.float32), jnp.ones(batch, jnp.float32),
                            jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 2), jnp.uint32))

    @staticmethod
    def single(temperature: float, top_p: float, top_k: int, seed: int) -> "SlotSampling":
        return SlotSampling(jnp.asarray([temperature], jnp.float32), jnp.asarray([top_p], jnp.float32),
                            jnp.asarray([top_k], jnp.int32), jax.random.key_data(jax.random.PRNGKey(seed))[None])


def _filter_top_k_top_p(scaled, top_k, top_p):
    """Mask (to -inf) logits outside each row's top-k, then outside its top-p nucleus. scaled [B, V]."""
    vocab = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)  # [B, V]
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)[:, None]
    sorted_desc = jnp.where(rank < k, sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = (rank < k) & (mass_before < top_p[:, None])  # the nucleus includes the token that crosses p
    cutoff = jnp.min(jnp.where(kept, sorted_desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(scaled >= cutoff, scaled, -jnp.inf)


def sample(logits, sampling: SlotSampling, step):
    """Choose one token per row. logits [B, V]; step [B] the index of the token being chosen.

    Returns tokens [B] int32 and their log-probabilities under the model's own distribution [B].
    """
    logits = logits.astype(jnp.float32)
    greedy = sampling.temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, sampling.temperature)[:, None]
    needs_filter = jnp.any(~greedy & ((sampling.top_k > 0) | (sampling.top_p < 1.0)))
    scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda s, k, p: s, scaled, sampling.top_k,
                          sampling.top_p)
    argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(scaled):
        keys = jax.vmap(lambda key, n: jax.random.fold_in(jax.random.wrap_key_data(key), n))(sampling.key, step)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(greedy, argmax, drawn)

    # Drawing costs a random number per vocabulary entry: skip it when every row is greedy.
    tokens = jax.lax.cond(jnp.all(greedy), lambda scaled: argmax, draw, scaled)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - jax.nn.logsumexp(logits, axis=-1)
    return tokens, logprobs
