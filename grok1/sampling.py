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

import math
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
    [B]: how many of the most likely tokens each row reports, -1 for a row that reports no logprob at all, not
    even its sampled token's (None: every row reports its sampled token's and no more, likewise static). Empty
    slots and padding rows (`defaults`) report none."""

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
                            LogitPenalties.defaults(batch), jnp.full(batch, -1, jnp.int32))

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


def _first_argmax_flat(x):
    """(max [...], the first index reaching it, int32) over the last axis, a NaN counting as the maximum (and
    making it NaN), as plain reductions. XLA:CPU runs argmax's (value, index) pair reduction unvectorised, ~30x
    slower than a max on the processor where this was written; the indices are float32 (exact below 2**24)
    because with int32 ones XLA:CPU makes the same slow reduction again. The NaN test is explicit: XLA:CPU's
    vectorised max reductions drop NaNs (measured, jax 0.10.2, AMD EPYC)."""
    vocab = x.shape[-1]
    assert vocab <= 2**24, "float32 indices are exact only up to 2**24"
    nan = jnp.isnan(x)
    top = jnp.where(jnp.any(nan, axis=-1), jnp.nan, jnp.max(x, axis=-1))
    index = jnp.where((x == top[..., None]) | nan, jnp.arange(vocab, dtype=jnp.float32), float(vocab))
    return top, jnp.min(index, axis=-1).astype(jnp.int32)


def argmax_chunk(vocab: int) -> int:
    """The chunk width `max_and_first_argmax` splits a vocabulary into: the largest power of two up to 128
    dividing it, 1 (no split) when that leaves a single chunk."""
    chunk = math.gcd(vocab, 128)
    return chunk if vocab // chunk > 1 else 1


def max_and_first_argmax(x):
    """(the maximum [...], `jnp.argmax(x, axis=-1)` as int32) of x [..., V] on every input: the maximum is NaN
    where the row has one (as numpy's; XLA:CPU's max reductions drop NaNs), the index the first of the
    maximum, a NaN counting as it.

    Why not jnp.argmax: on XLA:CPU a pass that finds an index over [32, 131072] float32 costs 5-10x a plain max
    (measured 4.7-5.6 ms against 0.5 ms, AMD EPYC, jax 0.10.2), whichever way it is written. So one pass reads
    the whole row: the maximum and the sum of each chunk of `argmax_chunk` entries. The first chunk
    reaching the row's maximum holds its first occurrence, and the index search runs over the chunk maxima and
    that one chunk, each 1/128 of the row. The sums find NaNs, which those max reductions drop (testing for
    NaN inside them costs a pass of its own): a chunk's sum is NaN where it holds a NaN (or both infinities),
    and a batch with such a chunk (never finite logits) is searched whole, row by row.
    """
    vocab = x.shape[-1]
    chunk = argmax_chunk(vocab)
    if chunk == 1:
        return _first_argmax_flat(x)
    chunks = x.reshape(*x.shape[:-1], vocab // chunk, chunk)
    chunk_max = jnp.max(chunks, axis=-1)
    suspect = jnp.any(jnp.isnan(jnp.sum(chunks, axis=-1, dtype=jnp.float32)))
    top, first_chunk = _first_argmax_flat(chunk_max)
    inside = jnp.take_along_axis(chunks, first_chunk[..., None, None], axis=-2)[..., 0, :]  # [..., chunk]
    found = (top, first_chunk * chunk + _first_argmax_flat(inside)[1])
    return jax.lax.cond(suspect, _first_argmax_flat, lambda x: found, x)


def first_argmax(x):
    """`jnp.argmax(x, axis=-1)` as int32, equal to it on every input (see max_and_first_argmax)."""
    return max_and_first_argmax(x)[1]


def logsumexp_given_max(x, top):
    """`jax.nn.logsumexp(x, axis=-1)` given the row's maximum top [...] (from max_and_first_argmax), computed as
    jax.nn.logsumexp computes it, without its own pass for the maximum."""
    shift = jnp.where(jnp.isfinite(top), top, 0.0)
    return jnp.log(jnp.abs(jnp.sum(jnp.exp(x - shift[..., None]), axis=-1))) + shift


def categorical(keys, logits):
    """`jax.vmap(jax.random.categorical)(keys, logits)` for rows [B, V], bit for bit (argmax(gumbel + logits)
    there), with `first_argmax` over the whole batch for the argmax (outside the vmap: under it, its cond for
    rows holding a NaN would become a select that always runs the whole-row search)."""
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(keys)
    return first_argmax(gumbel + logits)


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


def _penalties_in_use(sampling: SlotSampling):
    """Whether some row has a presence or frequency penalty or a logit bias (False when there are none)."""
    penalties = sampling.penalties
    if penalties is None:
        return jnp.asarray(False)
    return (jnp.any(penalties.presence != 0) | jnp.any(penalties.frequency != 0)
            | jnp.any(penalties.bias_values != 0))


def _no_top_logprobs(rows: int, k: int = MAX_TOP_LOGPROBS):
    return jnp.zeros((rows, k), jnp.int32), jnp.zeros((rows, k), jnp.float32)


def _sampled_logprobs(scores, tokens, total, wanted):
    """[B]: each token's score minus its row's log-sum-exp; 0 for rows that want no logprob (wanted -1)."""
    chosen = jnp.take_along_axis(scores, tokens[:, None], axis=-1)[:, 0]
    return jnp.where(wanted >= 0, chosen - total, 0.0)


class Branches(NamedTuple):
    """Which of the sampler's optional passes a batch of rows needs: bool scalars, each a `lax.cond` predicate.
    They are taken once, at the sampler's top level, from the rows' settings. On a mesh that splits the rows
    (grok1.steps.decode_sample), the settings are replicated there, so every rank decides on its own; the same
    reduction inside a branch, over operands laid out like the split logits, was an all-reduce across the group
    per predicate (a round trip over gloo or NCCL each)."""

    penalties: jax.Array  # some row has a presence or frequency penalty or a logit bias
    grammar: jax.Array  # some row has a grammar mask
    filter: jax.Array  # some row that draws has top-k or top-p
    all_greedy: jax.Array  # no row draws
    logprobs: jax.Array  # some row reports its token's logprob
    top_logprobs: jax.Array  # some row reports top logprobs

    @staticmethod
    def of(sampling: SlotSampling, wanted, mask=None) -> "Branches":
        greedy = sampling.temperature <= 0
        return Branches(
            penalties=_penalties_in_use(sampling),
            grammar=jnp.asarray(False) if mask is None else jnp.any(mask[1]),
            filter=jnp.any(~greedy & ((sampling.top_k > 0) | (sampling.top_p < 1.0))),
            all_greedy=jnp.all(greedy), logprobs=jnp.any(wanted >= 0), top_logprobs=jnp.any(wanted > 0))

    @property
    def plain(self):
        """Every row greedy, with no penalty, bias, grammar or top logprobs: `_greedy_plain` serves them."""
        return self.all_greedy & ~self.penalties & ~self.grammar & ~self.top_logprobs


def _greedy_plain(logits, wanted, any_logprobs) -> Sampled:
    """Every row greedy, without penalties, bias, grammar or top logprobs (the common decode step): the argmax
    from one pass over [B, V] for the maximum, and the logprobs from one for the log-sum-exp, skipped when no
    row wants them (a `lax.cond` on float32 logits that the unembedding made: it adds no copy)."""
    logits = logits.astype(jnp.float32)
    top, tokens = max_and_first_argmax(logits)
    total = jax.lax.cond(any_logprobs, logsumexp_given_max, lambda x, top: jnp.zeros_like(top), logits, top)
    return Sampled(tokens, _sampled_logprobs(logits, tokens, total, wanted), *_no_top_logprobs(logits.shape[0]))


def sample_scored(logits, sampling: SlotSampling, step, counts=None, mask=None) -> Sampled:
    """Choose one token per row. logits [B, V]; step [B] the index of the token being chosen; counts [B, V]
    int32 the row's generated-token counts for the penalties (None: nothing generated yet), or a function of no
    arguments returning them, called only where some row has penalties (so that a step whose rows have none
    does not gather the [B, V] counts: 16 MB for 32 rows of Grok-1's vocabulary, every step); mask (words
    uint32 [B, ceil(V / 32)], has bool [B]) the grammar's allowed tokens (None: no row has a grammar).

    The logprobs are under the distribution that was sampled (see the module's docstring).

    A step whose rows are all plain greedy takes `_greedy_plain`, chosen by one `lax.cond` whose branches
    return only [B]-sized results: the general path's conds pass [B, V] operands and results, which XLA:CPU
    copies (measured: the general path took 36 ms over [32, 131072] for what the plain one does in ~6).
    Both give the same bits for a plain greedy row.
    """
    wanted = jnp.zeros(logits.shape[0], jnp.int32) if sampling.top_logprobs is None else sampling.top_logprobs
    branches = Branches.of(sampling, wanted, mask)

    def general(logits):
        return _sample_general(logits.astype(jnp.float32), sampling, step, counts, mask, branches, wanted)

    return jax.lax.cond(branches.plain, lambda logits: _greedy_plain(logits, wanted, branches.logprobs), general,
                        logits)


def _sample_general(logits, sampling: SlotSampling, step, counts, mask, branches: Branches, wanted) -> Sampled:
    """sample_scored for any rows: penalties and bias, temperature, the grammar mask, top-k / top-p and the
    draw, each skipped by `lax.cond` when no row asks for it; the top logprobs when some row wants them."""
    greedy = sampling.temperature <= 0
    divisor = jnp.where(greedy, 1.0, sampling.temperature)[:, None]  # [B, 1]

    def argmax_and(adjusted):  # [B] int32, [B, V]
        return first_argmax(adjusted), adjusted

    if sampling.penalties is None:
        argmax, adjusted = argmax_and(logits)
    else:
        penalties = sampling.penalties
        # Reading every count costs a pass over [B, V]: skip it when no row has penalties or a bias.
        def penalised(x):
            return argmax_and(apply_penalties(x, penalties, counts() if callable(counts) else counts))

        argmax, adjusted = jax.lax.cond(branches.penalties, penalised, argmax_and, logits)
    # Scaled outside the branches: the logprobs below read it, and a row without penalties must get the very
    # bits it gets from a sampler without the penalty step.
    scaled = adjusted / divisor
    tempered = scaled  # what the logprobs are of
    if mask is not None:
        words, has = mask

        def constrain(argmax, scaled):
            masked = apply_token_mask(scaled, words, has)
            return jnp.where(has, first_argmax(masked), argmax), masked

        argmax, scaled = jax.lax.cond(branches.grammar, constrain, lambda a, s: (a, s), argmax, scaled)

    def draw(scaled):
        # The top-k/top-p filter only shapes the draw, so it sits inside it: a greedy step runs neither, and
        # does not copy [B, V] through the filter's pass-through branch (XLA:CPU copies a cond's operand out).
        scaled = jax.lax.cond(branches.filter, _filter_top_k_top_p, lambda s, k, p: s, scaled, sampling.top_k,
                              sampling.top_p)
        keys = jax.vmap(lambda key, n: jax.random.fold_in(jax.random.wrap_key_data(key), n))(sampling.key, step)
        drawn = categorical(keys, scaled)
        return jnp.where(greedy, argmax, drawn)

    # Drawing costs a random number per vocabulary entry: skip it when every row is greedy.
    tokens = jax.lax.cond(branches.all_greedy, lambda scaled: argmax, draw, scaled)
    total = logsumexp_given_max(tempered, jnp.max(tempered, axis=-1))  # [B], as _greedy_plain's
    logprobs = _sampled_logprobs(tempered, tokens, total, wanted)
    top_ids, top_values = top_logprobs(tempered, total, wanted, MAX_TOP_LOGPROBS, asked=branches.top_logprobs)
    return Sampled(tokens, logprobs, top_ids, top_values)
