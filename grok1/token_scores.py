"""In-jit log-probabilities beyond the sampled token's, and the grammar's token mask: pure functions over logits.

- `top_logprobs`: the k most likely tokens of each row (k static, MAX_TOP_LOGPROBS for every slot: one shape),
  skipped by `lax.cond` when no row asks for any.
- `prompt_logprobs`: for echo, the log-probability of every prompt token given the ones before it (a
  log-softmax of the full forward's logits), with the top k at each position.
- `apply_token_mask`: the grammar's allowed tokens (a bitmask per row, grok1/grammar.py's layout) as -inf
  elsewhere; rows without a grammar pass unchanged, and the whole step is skipped when no row has one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from grok1.grammar import MASK_WORD_BITS
from grok1.limits import MAX_TOP_LOGPROBS


def top_logprobs(scores, total, wanted, k: int = MAX_TOP_LOGPROBS, asked=None):
    """ids int32 [B, k] and logprobs f32 [B, k] of each row's k most likely tokens (largest first), where a
    token's logprob is scores [B, V] - total [B] (total: the row's logsumexp, so no [B, V] log-softmax is
    built); zeros when no row wants any (wanted [B] int32: each row's k, 0 none; asked: whether some row does,
    when the caller has decided it already, see grok1.sampling.Branches)."""
    def compute(scores, total):
        values, ids = jax.lax.top_k(scores, min(k, scores.shape[-1]))  # a vocabulary under k: padded
        pad = ((0, 0), (0, k - ids.shape[-1]))
        return (jnp.pad(ids.astype(jnp.int32), pad),
                jnp.pad((values - total[:, None]).astype(jnp.float32), pad, constant_values=-jnp.inf))

    def skip(scores, total):
        rows = scores.shape[0]
        return jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k), jnp.float32)

    return jax.lax.cond(jnp.any(wanted > 0) if asked is None else asked, compute, skip, scores, total)


def prompt_logprobs(logits, tokens, k: int = MAX_TOP_LOGPROBS):
    """logits [n, T, V] of a forward over tokens [n, T]. Returns, per position t >= 1, the log-probability of
    tokens[:, t] under the logits at t - 1 ([n, T] f32; position 0 has no context and is 0), and the top k
    there (ids int32 [n, T, k], values f32 [n, T, k]; position 0 zeros)."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [n, T-1, V]
    chosen = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]  # [n, T-1]
    values, ids = jax.lax.top_k(lp, k)  # [n, T-1, k]
    pad = ((0, 0), (1, 0))
    return (jnp.pad(chosen, pad), jnp.pad(ids.astype(jnp.int32), pad + ((0, 0),)),
            jnp.pad(values, pad + ((0, 0),)))


def unpack_mask(words, vocab: int):
    """bool [B, V] from uint32 words [B, ceil(V / 32)]: bit t % 32 of word t // 32 is token t."""
    shifts = jnp.arange(MASK_WORD_BITS, dtype=jnp.uint32)
    bits = (words[:, :, None] >> shifts[None, None, :]) & jnp.uint32(1)  # [B, W, 32]
    return bits.reshape(words.shape[0], -1)[:, :vocab].astype(bool)


def apply_token_mask(logits, words, has_mask):
    """logits [B, V] with -inf where a row's grammar forbids the token; has_mask [B] bool (rows without a
    grammar are untouched, bit for bit); the unpacking is skipped when no row has a grammar."""
    def masked(x):
        allowed = unpack_mask(words, x.shape[-1]) | ~has_mask[:, None]
        return jnp.where(allowed, x, -jnp.inf)

    return jax.lax.cond(jnp.any(has_mask), masked, lambda x: x, logits)
