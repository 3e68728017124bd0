"""Token sampling inside the jitted step: temperature (0 = greedy), top-k, top-p, per-request seeds, and
OpenAI's presence/frequency penalties and logit_bias.

Each slot carries its own settings and PRNG key; the n-th token of a request uses fold_in(key, n), so a seed
gives the same tokens whatever else shares the batch.

Order of the steps, as vLLM does it: penalties and bias change the logits first (both the greedy argmax and the
draw see them), then temperature, the grammar's token mask, top-k, top-p, and the draw. Every costly step is
skipped by `lax.cond` when no row of the batch asks for it, and every argmax is `first_argmax` (see there why).

Logprobs (the sampled token's and the top k) are a log-softmax of the logits after penalties, bias and
temperature (greedy rows: temperature 1), before the mask and the top-k / top-p filters: the distribution
that was sampled, as OpenAI reports it, and finite for every token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok1.limits import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS
from grok1.token_scores import apply_token_mask, top_logprobs


def seed_key_data(seed: int) -> np.ndarray:
    """uint32 [2]: `jax.random.key_data(jax.random.PRNGKey(seed))` (threefry), for any Python int.

    PRNGKey raises outside int64 (so would one request's seed, inside every shard worker); this is total and
    equal to it wherever PRNGKey accepts the seed. Without x64 (this project's setting) JAX first wraps the seed
    to 32 bits, so the key is [0, seed mod 2**32]; with x64 it is seed mod 2**64 as [high 32 bits, low 32 bits].
    """
    if jax.config.jax_enable_x64:
        wrapped = int(seed) % 2**64
        return np.asarray([wrapped >> 32, wrapped & 0xFFFFFFFF], np.uint32)
    return np.asarray([0, int(seed) % 2**32], np.uint32)


class LogitPenalties(NamedTuple):
    """Per-slot OpenAI penalties: presence f32 [B], frequency f32 [B] (0 off), and the sparse logit_bias as
    ids int32 [B, MAX_LOGIT_BIAS] and values f32 [B, MAX_LOGIT_BIAS] (padding entries: id 0, value 0)."""

    presence: jax.Array
    frequency: jax.Array
    bias_ids: jax.Array
    bias_values: jax.Array

    @staticmethod
    def defaults(batch: int) -> "LogitPenalties":
        return LogitPenalties(jnp.zeros(batch, jnp.float32), jnp.zeros(batch, jnp.float32),
                              jnp.zeros((batch, MAX_LOGIT_BIAS), jnp.int32),
                              jnp.zeros((batch, MAX_LOGIT_BIAS), jnp.float32))


class SlotSampling(NamedTuple):
    """Per-slot sampling settings, all [B]: temperature f32 (0 greedy), top_p f32 (1 off),
    top_k int32 (0 off), key uint32 [B, 2] (the request's seed); penalties None means none (a static choice:
    the engine's state always has them, hand-made settings in tests may leave them out); top_logprobs int32
    [B]: how many of the most likely tokens each row reports (None: none, likewise static)."""

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    key: jax.Array
    penalties: LogitPenalties | None = None
    top_logprobs: jax.Array | None = None

    @staticmethod
    def defaults(batch: int) -> "SlotSampling":
        return SlotSampling(jnp.zeros(batch, jnp.float32), jnp.ones(batch, jnp.float32),
                            jnp.zeros(batch, jnp.int32), jnp.zeros((batch, 2), jnp.uint32),
                            LogitPenalties.defaults(batch), jnp.zeros(batch, jnp.int32))

    @staticmethod
    def single(temperature: float, top_p: float, top_k: int, seed: int) -> "SlotSampling":
        return SlotSampling(jnp.asarray([temperature], jnp.float32), jnp.asarray([top_p], jnp.float32),
                            jnp.asarray([top_k], jnp.int32), jnp.asarray(seed_key_data(seed))[None])


def apply_penalties(logits, penalties: LogitPenalties, counts):
    """OpenAI's penalties as vLLM applies them, then the logit bias. logits [B, V] f32; counts [B, V] int32:
    how often each token was generated so far by the row's request (None: nothing yet, as at prefill).

        logits[t] - frequency * count[t] - presence * (count[t] > 0) + bias[t]

    A row with zero penalties and no bias comes out bit for bit unchanged (x - 0 = x, x + 0 = x).
    """
    if counts is not None:
        logits = logits - penalties.frequency[:, None] * counts.astype(jnp.float32)
        logits = logits - penalties.presence[:, None] * (counts > 0).astype(jnp.float32)
    rows = jnp.arange(logits.shape[0])[:, None]  # [B, 1]
    # Padding entries add 0 to token 0; ids are in [0, V) (the host drops others), "drop" is a second guard.
    return logits.at[rows, penalties.bias_ids].add(penalties.bias_values, mode="drop")


def first_argmax(x):
    """`jnp.argmax(x, axis=-1)` as int32, equal to it on every input (first index of the maximum; a NaN counts as
    the maximum), computed as two plain reductions: a max, then the smallest index that reaches it.

    Why: XLA:CPU runs argmax's (value, index) pair reduction unvectorised, ~30x slower than a max (measured,
    [32, 131072] float32: 44 ms vs 2.6 ms for this); it was most of a greedy decode step's sampling. The
    indices are float32 (exact below 2**24): with int32 ones XLA:CPU makes the same slow reduction again.
    """
    vocab = x.shape[-1]
    assert vocab <= 2**24, "float32 indices are exact only up to 2**24"
    top = jnp.max(x, axis=-1, keepdims=True)  # NaN if the row has one
    hit = (x == top) | jnp.isnan(x)
    index = jnp.where(hit, jnp.arange(vocab, dtype=jnp.float32), float(vocab))
    return jnp.min(index, axis=-1).astype(jnp.int32)


def categorical(key, logits):
    """`jax.random.categorical(key, logits)` for one row [V], bit for bit (it is argmax(gumbel + logits) there),
    with `first_argmax` for the argmax."""
    return first_argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits)


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


class Sampled(NamedTuple):
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] f32, of the sampled tokens
    top_ids: jax.Array  # [B, MAX_TOP_LOGPROBS] int32, most likely first (zeros when no row asks)
    top_logprobs: jax.Array  # [B, MAX_TOP_LOGPROBS] f32


def sample(logits, sampling: SlotSampling, step, counts=None):
    """`sample_scored` without the top logprobs: tokens [B] int32 and their logprobs [B]."""
    out = sample_scored(logits, sampling, step, counts)
    return out.tokens, out.logprobs


def sample_scored(logits, sampling: SlotSampling, step, counts=None, mask=None) -> Sampled:
    """Choose one token per row. logits [B, V]; step [B] the index of the token being chosen; counts [B, V]
    int32 the row's generated-token counts for the penalties (None: nothing generated yet), or a function of no
    arguments returning them, called only where some row has penalties (so that a step whose rows have none
    does not gather the [B, V] counts: 16 MB for 32 rows of Grok-1's vocabulary, every step); mask (words
    uint32 [B, ceil(V / 32)], has bool [B]) the grammar's allowed tokens (None: no row has a grammar).

    The logprobs are under the distribution that was sampled (see the module's docstring).
    """
    logits = logits.astype(jnp.float32)
    greedy = sampling.temperature <= 0
    divisor = jnp.where(greedy, 1.0, sampling.temperature)[:, None]  # [B, 1]

    def argmax_and(adjusted):  # [B] int32, [B, V]
        return first_argmax(adjusted), adjusted

    if sampling.penalties is None:
        argmax, adjusted = argmax_and(logits)
    else:
        penalties = sampling.penalties
        in_use = (jnp.any(penalties.presence != 0) | jnp.any(penalties.frequency != 0)
                  | jnp.any(penalties.bias_values != 0))
        # Reading every count costs a pass over [B, V]: skip it when no row has penalties or a bias.
        def penalised(x):
            return argmax_and(apply_penalties(x, penalties, counts() if callable(counts) else counts))

        argmax, adjusted = jax.lax.cond(in_use, penalised, argmax_and, logits)
    # Scaled outside the branches: the logprobs below read it, and a row without penalties must get the very
    # bits it gets from a sampler without the penalty step.
    scaled = adjusted / divisor
    tempered = scaled  # what the logprobs are of
    if mask is not None:
        words, has = mask

        def constrain(argmax, scaled):
            masked = apply_token_mask(scaled, words, has)
            return jnp.where(has, first_argmax(masked), argmax), masked

        argmax, scaled = jax.lax.cond(jnp.any(has), constrain, lambda a, s: (a, s), argmax, scaled)
    needs_filter = jnp.any(~greedy & ((sampling.top_k > 0) | (sampling.top_p < 1.0)))

    def draw(scaled):
        # The top-k/top-p filter only shapes the draw, so it sits inside it: a greedy step runs neither, and
        # does not copy [B, V] through the filter's pass-through branch (XLA:CPU copies a cond's operand out).
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda s, k, p: s, scaled, sampling.top_k,
                              sampling.top_p)
        keys = jax.vmap(lambda key, n: jax.random.fold_in(jax.random.wrap_key_data(key), n))(sampling.key, step)
        drawn = jax.vmap(categorical)(keys, scaled)
        return jnp.where(greedy, argmax, drawn)

    # Drawing costs a random number per vocabulary entry: skip it when every row is greedy.
    tokens = jax.lax.cond(jnp.all(greedy), lambda scaled: argmax, draw, scaled)
    total = jax.nn.logsumexp(tempered, axis=-1)  # [B]
    logprobs = jnp.take_along_axis(tempered, tokens[:, None], axis=-1)[:, 0] - total
    wanted = jnp.zeros_like(tokens) if sampling.top_logprobs is None else sampling.top_logprobs
    top_ids, top_values = top_logprobs(tempered, total, wanted, MAX_TOP_LOGPROBS)
    return Sampled(tokens, logprobs, top_ids, top_values)
