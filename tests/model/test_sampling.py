"""grok1.sampling.sample: greedy, temperature, top-k, top-p (nucleus), per-row seeds and settings,
presence/frequency penalties and logit_bias (against a numpy reference); and the engine's host conversion of a
request's settings, which must not raise whatever the request holds.

Everything runs on small hand-made vocabularies; many draws are taken at once as rows of one batch (each row
its own key and step), so a whole distribution costs a single call of the jitted sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.engine import Sampling
from grok1.sampling import (
    MAX_LOGIT_BIAS,
    LogitPenalties,
    SlotSampling,
    argmax_chunk,
    first_argmax,
    logsumexp_given_max,
    max_and_first_argmax,
    sample,
    sample_scored,
    seed_key_data,
)
from grok1.slot_settings import slot_sampling

_sample = jax.jit(sample)

PROBS = np.array([0.5, 0.3, 0.15, 0.05])  # the hand-made distribution of the top-p tests
DRAWS = 4000


def settings(rows: int, temperature=0.0, top_p=1.0, top_k=0, seed=0) -> SlotSampling:
    """SlotSampling for `rows` rows; each field a scalar (all rows) or one value per row."""
    seeds = jnp.broadcast_to(jnp.asarray(seed, jnp.uint32), (rows,))
    keys = jax.vmap(lambda s: jax.random.key_data(jax.random.PRNGKey(s)))(seeds)
    return SlotSampling(jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (rows,)),
                        jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (rows,)),
                        jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (rows,)), keys)


def stack(*rows: SlotSampling) -> SlotSampling:
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *rows)


def draw(logits_row, rows: int = DRAWS, seed: int = 0, **kwargs) -> np.ndarray:
    """`rows` draws from one distribution: the same logits and seed, steps 0..rows-1."""
    logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (rows, len(logits_row)))
    tokens, _ = _sample(logits, settings(rows, seed=seed, **kwargs), jnp.arange(rows, dtype=jnp.int32))
    return np.asarray(tokens)


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def chi_square(tokens: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(tokens, minlength=len(probs))
    expected = len(tokens) * np.asarray(probs)
    return float(np.sum((counts - expected) ** 2 / expected))


# 3 degrees of freedom (4 tokens): P(chi2 > 25) is about 1.6e-5, and the draws are deterministic anyway;
# a wrong distribution (e.g. temperature ignored) gives values in the hundreds.
CHI2_BOUND_4_TOKENS = 25.0


@pytest.fixture(scope="module")
def random_logits() -> np.ndarray:
    """[8, 50] float32 logits with distinct values in each row (no ties at the top)."""
    return np.random.default_rng(0).normal(0.0, 3.0, size=(8, 50)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- greedy


def test_first_argmax_equals_jnp_argmax_on_ties_nan_and_infinities():
    rows = np.random.default_rng(1).integers(-3, 3, size=(12, 40)).astype(np.float32)  # many ties
    rows[1, [7, 20]] = np.nan  # NaN counts as the maximum: its first index
    rows[2, :] = -np.inf
    rows[3, [5, 9]] = np.inf
    rows[4, :] = 0.0
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rows, dtype)
        np.testing.assert_array_equal(jax.jit(first_argmax)(x), jnp.argmax(x, axis=-1))


def test_the_chunked_argmax_equals_jnp_argmax_at_the_vocabulary_size():
    """At Grok-1's vocabulary the index is searched within the first chunk that reaches the maximum: ties in
    other chunks, ties inside the chunk, a NaN after the maximum or in another chunk than it, infinities."""
    vocab = 131072
    assert argmax_chunk(vocab) == 128
    rows = np.random.default_rng(2).normal(size=(10, vocab)).astype(np.float32)
    rows[0, [300, 129, 70000]] = 50.0  # the same maximum in three chunks, the first not the lowest chunk seen
    rows[1, [131, 130]] = 50.0  # a tie inside one chunk
    rows[2, 5] = 50.0
    rows[2, 9000] = np.nan  # NaN after the maximum: the NaN wins
    rows[3, [128 * 7 + 3, 128 * 2 + 127]] = np.nan
    rows[4, :] = -np.inf
    rows[5, [vocab - 1, 4000]] = np.inf
    rows[6, :] = 1.0  # all equal: index 0
    rows[7, vocab - 1] = 50.0  # the last entry
    rows[8, 127], rows[8, 128] = 50.0, 50.0  # across a chunk boundary
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rows, dtype)
        top, index = jax.jit(max_and_first_argmax)(x)
        np.testing.assert_array_equal(index, jnp.argmax(x, axis=-1))
        # numpy's maximum: NaN where the row has one (XLA:CPU's own max reductions drop NaNs)
        np.testing.assert_array_equal(np.asarray(top, np.float32), np.asarray(x, np.float32).max(axis=-1))


@pytest.mark.parametrize("vocab", [40, 50, 127, 1024])
def test_logsumexp_given_the_maximum_equals_jax_nn_logsumexp(vocab):
    rows = np.random.default_rng(vocab).normal(0.0, 5.0, size=(6, vocab)).astype(np.float32)
    rows[1, :] = -np.inf
    rows[2, 3] = np.inf
    rows[3, 7] = np.nan
    rows[4, : vocab // 2] = -np.inf
    x = jnp.asarray(rows)
    got = jax.jit(lambda x: logsumexp_given_max(x, max_and_first_argmax(x)[0]))(x)
    np.testing.assert_array_equal(got, jax.nn.logsumexp(x, axis=-1))


def test_a_plain_greedy_batch_gets_the_bits_of_the_general_sampler():
    """All rows greedy without extras take the plain path; the same rows beside one that wants top logprobs
    (the general path) get the same tokens and logprobs, bit for bit, at Grok-1's vocabulary size."""
    rows, vocab = 6, 131072
    logits = jnp.asarray(np.random.default_rng(4).normal(0.0, 3.0, size=(rows, vocab)), jnp.bfloat16)
    plain = settings(rows)._replace(top_logprobs=jnp.zeros(rows, jnp.int32))
    general = plain._replace(top_logprobs=jnp.zeros(rows, jnp.int32).at[0].set(3))
    steps = jnp.zeros(rows, jnp.int32)
    want = jax.jit(sample_scored)(logits, general, steps)
    got = jax.jit(sample_scored)(logits, plain, steps)
    assert np.asarray(want.top_ids)[0, 0] == int(np.asarray(got.tokens)[0])  # the general path did run
    np.testing.assert_array_equal(got.tokens, jnp.argmax(logits, axis=-1))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logprobs, want.logprobs)
    expected = log_softmax(np.asarray(logits, np.float32))[np.arange(rows), np.asarray(got.tokens)]
    np.testing.assert_allclose(got.logprobs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.top_ids, 0)


def test_rows_that_want_no_logprob_get_zero_and_change_nothing_else():
    """top_logprobs -1 (a request that asked for no logprobs): the sampled logprob is 0, skipped where no row
    wants one; the tokens, and every other row's logprobs, are those of a batch that wants them all."""
    rows, vocab = 4, 1024
    logits = jnp.asarray(np.random.default_rng(5).normal(0.0, 3.0, size=(rows, vocab)), jnp.float32)
    steps = jnp.arange(rows, dtype=jnp.int32)
    run = jax.jit(sample_scored)
    for temperature in (0.0, np.asarray([0.0, 0.8, 0.0, 1.3], np.float32)):  # the plain path, the general one
        base = settings(rows, temperature=temperature, seed=np.arange(rows))
        want = run(logits, base._replace(top_logprobs=jnp.zeros(rows, jnp.int32)), steps)
        for wanted in ([-1, 0, -1, 0], [-1, -1, -1, -1]):
            wanted = jnp.asarray(wanted, jnp.int32)
            got = run(logits, base._replace(top_logprobs=wanted), steps)
            np.testing.assert_array_equal(got.tokens, want.tokens)
            np.testing.assert_array_equal(got.logprobs, jnp.where(wanted >= 0, want.logprobs, 0.0))
            assert np.all(np.asarray(want.logprobs) < 0)


def test_seeded_draws_equal_jax_random_categorical(random_logits):
    """The draw is jax.random.categorical's, bit for bit: a seed gives the same tokens as before first_argmax."""
    rows = random_logits.shape[0]
    temperature = np.linspace(0.3, 2.0, rows).astype(np.float32)
    seeds = np.arange(rows) * 7919
    sampling = SlotSampling(jnp.asarray(temperature), jnp.ones(rows), jnp.zeros(rows, jnp.int32),
                            jnp.stack([jnp.asarray(seed_key_data(int(seed))) for seed in seeds]))
    for step in (0, 1, 5):
        steps = jnp.full(rows, step, jnp.int32)
        tokens, _ = _sample(random_logits, sampling, steps)
        keys = jax.vmap(lambda key, n: jax.random.fold_in(jax.random.wrap_key_data(key), n))(sampling.key, steps)
        expected = jax.vmap(jax.random.categorical)(keys, jnp.asarray(random_logits) / temperature[:, None])
        np.testing.assert_array_equal(tokens, expected)


def test_temperature_zero_is_argmax_with_log_softmax_logprobs(random_logits):
    rows = random_logits.shape[0]
    tokens, logprobs = _sample(jnp.asarray(random_logits), settings(rows, seed=np.arange(rows)),
                               jnp.arange(rows, dtype=jnp.int32))
    tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, random_logits.argmax(-1))
    expected = log_softmax(random_logits)[np.arange(rows), tokens]
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)


def test_greedy_ignores_top_k_top_p_and_keys(random_logits):
    rows = random_logits.shape[0]
    sampling = settings(rows, temperature=0.0, top_p=0.01, top_k=3, seed=np.arange(rows) + 7)
    for step in (0, 5, 1000):
        tokens, _ = _sample(jnp.asarray(random_logits), sampling, jnp.full(rows, step, jnp.int32))
        np.testing.assert_array_equal(np.asarray(tokens), random_logits.argmax(-1))


def test_bfloat16_logits(random_logits):
    logits = jnp.asarray(random_logits, jnp.bfloat16)
    rows = logits.shape[0]
    tokens, logprobs = _sample(logits, settings(rows), jnp.zeros(rows, jnp.int32))
    as_f32 = np.asarray(logits.astype(jnp.float32))
    np.testing.assert_array_equal(np.asarray(tokens), as_f32.argmax(-1))
    np.testing.assert_allclose(np.asarray(logprobs), log_softmax(as_f32)[np.arange(rows), np.asarray(tokens)],
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- top-k


def test_top_k_1_is_argmax(random_logits):
    rows = random_logits.shape[0]
    for step in range(0, 200, 37):
        tokens, _ = _sample(jnp.asarray(random_logits), settings(rows, temperature=1.0, top_k=1,
                                                                 seed=np.arange(rows) + step),
                            jnp.full(rows, step, jnp.int32))
        np.testing.assert_array_equal(np.asarray(tokens), random_logits.argmax(-1))


@pytest.mark.parametrize("k", [2, 5])
def test_top_k_stays_within_the_k_largest(random_logits, k):
    row = random_logits[0]
    allowed = set(np.argsort(-row)[:k].tolist())
    # A high temperature flattens the distribution, so that outside tokens would show up without the filter.
    tokens = draw(row, rows=1000, temperature=5.0, top_k=k, seed=3)
    assert set(tokens.tolist()) == allowed
    unfiltered = draw(row, rows=1000, temperature=5.0, seed=3)
    assert not set(unfiltered.tolist()) <= allowed  # the check above is not vacuous


def test_top_k_larger_than_vocab_is_no_filter():
    logits = np.log(PROBS)
    tokens = draw(logits, temperature=1.0, top_k=1000)
    assert chi_square(tokens, PROBS) < CHI2_BOUND_4_TOKENS


# ----------------------------------------------------------------------------------------------- top-p


@pytest.mark.parametrize("top_p, allowed", [
    (0.2, {0}),  # the first token alone already crosses p
    (0.45, {0}),
    (0.55, {0, 1}),  # the nucleus includes the token that crosses p: 0.5 + 0.3 >= 0.55
    (0.6, {0, 1}),
    (0.79, {0, 1}),
    (0.81, {0, 1, 2}),
    (0.96, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_nucleus(top_p, allowed):
    tokens = draw(np.log(PROBS), temperature=1.0, top_p=top_p)
    assert set(tokens.tolist()) == allowed


def test_top_p_renormalises_within_the_nucleus():
    """top_p=0.6 keeps {0, 1}; draws follow 0.5 : 0.3, i.e. 0.625 / 0.375."""
    tokens = draw(np.log(PROBS), temperature=1.0, top_p=0.6, seed=11)
    counts = np.bincount(tokens, minlength=4)
    expected = DRAWS * np.array([0.625, 0.375])
    assert counts[2:].sum() == 0
    assert float(np.sum((counts[:2] - expected) ** 2 / expected)) < 15.0  # 1 degree of freedom


def test_top_p_applies_to_the_tempered_distribution():
    # Temperature 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 -> 0.685, 0.247, ...; the
    # first token then crosses 0.6 alone (at temperature 1 the nucleus would be {0, 1}).
    assert set(draw(np.log(PROBS), temperature=0.5, top_p=0.6).tolist()) == {0}
    # Temperature 2 flattens them: 0.394, 0.305, 0.216, 0.125 -> the nucleus of 0.6 is {0, 1}, of 0.75 {0, 1, 2}.
    assert set(draw(np.log(PROBS), temperature=2.0, top_p=0.75).tolist()) == {0, 1, 2}


def test_top_k_then_top_p_within_the_top_k():
    # top_k=3 leaves 0.5, 0.3, 0.15 -> renormalised 0.526, 0.316, 0.158: the third token starts at 0.842, so
    # top_p=0.83 excludes it (over the full vocabulary it would start at 0.8 and be kept).
    assert set(draw(np.log(PROBS), temperature=1.0, top_k=3, top_p=0.83).tolist()) == {0, 1}
    assert set(draw(np.log(PROBS), temperature=1.0, top_k=3, top_p=0.86).tolist()) == {0, 1, 2}
    assert set(draw(np.log(PROBS), temperature=1.0, top_k=2, top_p=1.0).tolist()) == {0, 1}


# ------------------------------------------------------------------------------- seeds and determinism


def test_same_key_and_step_give_the_same_token(random_logits):
    rows = 64
    logits = jnp.broadcast_to(jnp.asarray(random_logits[1]), (rows, 50))
    sampling = settings(rows, temperature=2.0, seed=42)
    steps = jnp.full(rows, 9, jnp.int32)
    first, _ = _sample(logits, sampling, steps)
    again, _ = _sample(logits, sampling, steps)
    assert len(set(np.asarray(first).tolist())) == 1  # every row: same key, same step
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_different_steps_and_seeds_vary(random_logits):
    row = random_logits[1]
    by_step = draw(row, rows=64, temperature=2.0, seed=42)  # one seed, steps 0..63
    assert len(set(by_step.tolist())) > 5
    logits = jnp.broadcast_to(jnp.asarray(row), (64, 50))
    by_seed, _ = _sample(logits, settings(64, temperature=2.0, seed=np.arange(64)), jnp.zeros(64, jnp.int32))
    assert len(set(np.asarray(by_seed).tolist())) > 5
    # The n-th token of a seed does not depend on the batch row it is drawn in.
    np.testing.assert_array_equal(draw(row, rows=16, temperature=2.0, seed=42), by_step[:16])


def test_single_matches_batch_settings():
    one = SlotSampling.single(0.7, 0.9, 5, 1234)
    batch = settings(1, temperature=0.7, top_p=0.9, top_k=5, seed=1234)
    assert one.penalties is None and batch.penalties is None
    for got, want in zip(one[:4], batch[:4]):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.dtype == want.dtype


# ------------------------------------------------------------------------------------ the distribution


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.7])
def test_frequencies_follow_the_tempered_softmax(temperature):
    logits = np.log(PROBS)
    tokens = draw(logits, temperature=temperature, seed=5)
    target = np.exp(log_softmax(logits / temperature))
    assert chi_square(tokens, target) < CHI2_BOUND_4_TOKENS
    if temperature != 1.0:
        assert chi_square(tokens, PROBS) > 4 * CHI2_BOUND_4_TOKENS  # the temperature is not ignored


def test_sampled_logprobs_are_under_the_tempered_distribution():
    logits = np.log(PROBS).astype(np.float32)
    tokens, logprobs = _sample(jnp.broadcast_to(jnp.asarray(logits), (256, 4)),
                               settings(256, temperature=2.0, top_k=2, seed=1), jnp.arange(256, dtype=jnp.int32))
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) == {0, 1}
    # The distribution that was sampled, after temperature (as OpenAI reports), before the top-k filter: every
    # token's value is finite, and greedy rows (temperature 1 for this) get log_softmax of the logits as given.
    np.testing.assert_allclose(np.asarray(logprobs), log_softmax(logits / 2.0)[tokens], rtol=1e-5, atol=1e-5)
    greedy_tokens, greedy = _sample(jnp.asarray(logits)[None], settings(1), jnp.zeros(1, jnp.int32))
    np.testing.assert_allclose(np.asarray(greedy), np.log(PROBS)[np.asarray(greedy_tokens)], atol=1e-5)


def test_top_logprobs_are_sorted_and_hold_the_sampled_token():
    from grok1.sampling import sample_scored

    rows, vocab = 64, 300
    logits = jax.random.normal(jax.random.PRNGKey(4), (rows, vocab)) * 4
    base = settings(rows, temperature=0.7, seed=2)
    wanted = jnp.asarray([5] * (rows // 2) + [20] * (rows // 2), jnp.int32)
    out = jax.jit(sample_scored)(logits, base._replace(top_logprobs=wanted), jnp.arange(rows, dtype=jnp.int32))
    ids, values = np.asarray(out.top_ids), np.asarray(out.top_logprobs)
    reference = log_softmax(np.asarray(logits) / 0.7)
    assert np.all(np.diff(values, axis=1) <= 0)
    np.testing.assert_allclose(values, np.take_along_axis(reference, ids, axis=1), atol=1e-4)
    np.testing.assert_allclose(np.exp(reference).sum(axis=1), 1.0, atol=1e-5)  # over the whole vocabulary
    for row in range(rows):
        token = int(out.tokens[row])
        np.testing.assert_allclose(float(out.logprobs[row]), reference[row, token], atol=1e-4)
        if reference[row, token] >= values[row, 19]:
            assert token in ids[row].tolist()
    none = jax.jit(sample_scored)(logits, base, jnp.arange(rows, dtype=jnp.int32))
    assert not np.any(np.asarray(none.top_ids)) and np.array_equal(np.asarray(none.tokens), np.asarray(out.tokens))


def test_grammar_mask_constrains_only_its_rows():
    from grok1.sampling import sample_scored

    rows, vocab = 4, 64
    logits = jax.random.normal(jax.random.PRNGKey(5), (rows, vocab))
    words = np.zeros((rows, 2), np.uint32)
    words[:, 1] = 1 << 3  # token 35 only
    has = jnp.asarray([True, False, True, False])
    for temperature in (0.0, 1.0):
        s = settings(rows, temperature=temperature, seed=1)
        free = jax.jit(sample_scored)(logits, s, jnp.zeros(rows, jnp.int32))
        masked = jax.jit(sample_scored)(logits, s, jnp.zeros(rows, jnp.int32), None, (jnp.asarray(words), has))
        tokens = np.asarray(masked.tokens)
        assert tokens[0] == 35 and tokens[2] == 35
        assert np.array_equal(tokens[[1, 3]], np.asarray(free.tokens)[[1, 3]])
        assert np.all(np.isfinite(np.asarray(masked.logprobs)))


# ------------------------------------------------------------------------------------- per-row settings


def test_rows_are_independent(random_logits):
    """A greedy row, a top-k row and an unfiltered sampled row side by side, each as if alone."""
    logits = jnp.asarray(random_logits[:3])
    rows = [settings(1, temperature=0.0, seed=1), settings(1, temperature=1.5, top_k=2, seed=2),
            settings(1, temperature=1.5, seed=3)]
    batch = stack(*rows)
    top2 = set(np.argsort(-random_logits[1])[:2].tolist())
    seen_sampled = set()
    for step in range(25):
        steps = jnp.full(3, step, jnp.int32)
        tokens, logprobs = _sample(logits, batch, steps)
        tokens = np.asarray(tokens)
        assert tokens[0] == random_logits[0].argmax()
        assert tokens[1] in top2
        seen_sampled.add(int(tokens[2]))
        for i, row in enumerate(rows):  # each row alone: the same token and logprob
            alone, alone_logprob = _sample(logits[i:i + 1], row, steps[:1])
            assert int(alone[0]) == tokens[i], (step, i)
            np.testing.assert_allclose(float(alone_logprob[0]), float(logprobs[i]), rtol=1e-6, atol=1e-6)
    assert len(seen_sampled) > 3  # the unfiltered row really samples


def test_unfiltered_row_is_unchanged_by_a_filtered_neighbour(random_logits):
    """Top-k/top-p run for the whole batch when any row asks; a row with them off must not notice."""
    row, neighbour = random_logits[4], random_logits[5]
    alone = draw(row, rows=200, temperature=1.0, seed=8)  # no row filters: the filter is skipped
    # 200 pairs (row at step n, filtered neighbour) in one batch.
    logits = jnp.asarray(np.tile(np.stack([row, neighbour]), (200, 1)))
    mixed = settings(400, temperature=1.0, top_p=np.tile([1.0, 0.3], 200), top_k=np.tile([0, 3], 200),
                     seed=np.tile([8, 9], 200))
    steps = jnp.repeat(jnp.arange(200, dtype=jnp.int32), 2)
    together, _ = _sample(logits, mixed, steps)
    together = np.asarray(together)
    np.testing.assert_array_equal(together[0::2], alone)
    assert set(together[1::2].tolist()) <= set(np.argsort(-neighbour)[:3].tolist())


# --------------------------------------------------------------------- penalties and logit_bias (OpenAI)


def penalties(rows: int, presence=0.0, frequency=0.0, bias: dict | None = None) -> LogitPenalties:
    """LogitPenalties for `rows` rows: scalar penalties for all rows, one bias map for all rows."""
    ids = np.zeros((rows, MAX_LOGIT_BIAS), np.int32)
    values = np.zeros((rows, MAX_LOGIT_BIAS), np.float32)
    for entry, (token, value) in enumerate((bias or {}).items()):
        ids[:, entry], values[:, entry] = token, value
    return LogitPenalties(jnp.broadcast_to(jnp.asarray(presence, jnp.float32), (rows,)),
                          jnp.broadcast_to(jnp.asarray(frequency, jnp.float32), (rows,)),
                          jnp.asarray(ids), jnp.asarray(values))


def reference_penalised(logits, counts, presence, frequency, bias) -> np.ndarray:
    """vLLM's formula, one row at a time in float32 numpy: the slow, obvious version."""
    out = np.array(logits, np.float32)
    for row in range(out.shape[0]):
        out[row] -= np.float32(frequency[row]) * counts[row].astype(np.float32)
        out[row] -= np.float32(presence[row]) * (counts[row] > 0).astype(np.float32)
        for token, value in bias.items():
            out[row, token] += np.float32(value)
    return out


def generate_with_penalties(logits_per_step, sampling: SlotSampling) -> tuple[np.ndarray, np.ndarray]:
    """Tokens [steps, B] and logprobs chosen by `sample` over a sequence, counts kept as the engine keeps them."""
    steps, rows, vocab = logits_per_step.shape
    counts = jnp.zeros((rows, vocab), jnp.int32)
    tokens, logprobs = [], []
    for step in range(steps):
        token, logprob = _sample(jnp.asarray(logits_per_step[step]), sampling, jnp.full(rows, step, jnp.int32),
                                 counts)
        counts = counts.at[jnp.arange(rows), token].add(1)
        tokens.append(np.asarray(token))
        logprobs.append(np.asarray(logprob))
    return np.stack(tokens), np.stack(logprobs)


@pytest.fixture(scope="module")
def logits_sequence() -> np.ndarray:
    """[12 steps, 4 rows, 50] float32: one step's logits varied a little, so the same tokens stay on top and
    penalties decide what comes next."""
    rng = np.random.default_rng(1)
    base = rng.normal(0.0, 2.0, size=(4, 50))
    return (base[None] + rng.normal(0.0, 0.1, size=(12, 4, 50))).astype(np.float32)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_penalties_follow_the_numpy_reference_over_a_sequence(logits_sequence, temperature):
    steps, rows, vocab = logits_sequence.shape
    presence, frequency = np.array([0.0, 0.7, 1.5, -0.5]), np.array([0.0, 0.4, 0.0, 1.2])
    bias = {3: 2.5, 17: -4.0}
    sampling = settings(rows, temperature=temperature, seed=np.arange(rows) + 21)._replace(
        penalties=penalties(rows, presence, frequency, bias))
    tokens, logprobs = generate_with_penalties(logits_sequence, sampling)
    counts = np.zeros((rows, vocab), np.int64)
    plain = settings(rows, temperature=temperature, seed=np.arange(rows) + 21)  # penalties None: skipped
    for step in range(steps):
        expected = reference_penalised(logits_sequence[step], counts, presence, frequency, bias)
        if temperature == 0.0:
            np.testing.assert_array_equal(tokens[step], expected.argmax(-1), err_msg=f"step {step}")
        # Seeded: the draw from the reference's logits with the same key and step (fold_in(key, n)).
        want, _ = _sample(jnp.asarray(expected), plain, jnp.full(rows, step, jnp.int32))
        np.testing.assert_array_equal(tokens[step], np.asarray(want), err_msg=f"step {step}")
        # The logprob is of the distribution sampled: the penalised logits (temperature 0 and 1 both divide by 1).
        np.testing.assert_allclose(logprobs[step], log_softmax(expected)[np.arange(rows), tokens[step]],
                                   rtol=1e-5, atol=1e-5)
        counts[np.arange(rows), tokens[step]] += 1
    # Not vacuous: row 0 (no penalties) repeats its tokens, the penalised rows vary theirs.
    assert len(set(tokens[:, 0].tolist())) <= 3 if temperature == 0.0 else True
    assert all(len(set(tokens[:, row].tolist())) >= 5 for row in (1, 3))


def test_logit_bias_plus_100_forces_and_minus_100_bans(random_logits):
    rows = random_logits.shape[0]
    forced_token, steps = 7, jnp.arange(rows, dtype=jnp.int32)
    for temperature in (0.0, 1.0, 3.0):
        forced = settings(rows, temperature=temperature, seed=np.arange(rows))._replace(
            penalties=penalties(rows, bias={forced_token: 100.0}))
        tokens, logprobs = _sample(jnp.asarray(random_logits), forced, steps)
        np.testing.assert_array_equal(np.asarray(tokens), forced_token)
        # the logprob of the distribution sampled: the forced token has (almost) all of it
        np.testing.assert_allclose(np.asarray(logprobs), 0.0, atol=1e-5)
    best = random_logits.argmax(-1)
    row = 0
    banned = settings(256, temperature=1.0, seed=3)._replace(penalties=penalties(256, bias={int(best[row]): -100.0}))
    logits = jnp.broadcast_to(jnp.asarray(random_logits[row]), (256, 50))
    drawn, _ = _sample(logits, banned, jnp.arange(256, dtype=jnp.int32))
    assert int(best[row]) not in set(np.asarray(drawn).tolist())
    greedy = settings(1)._replace(penalties=penalties(1, bias={int(best[row]): -100.0}))
    token, _ = _sample(logits[:1], greedy, jnp.zeros(1, jnp.int32))
    assert int(token[0]) == np.argsort(-random_logits[row])[1]  # the runner-up


def test_no_penalties_is_bit_identical_to_none(random_logits):
    """Zero penalties and no bias (the engine's default) give exactly the tokens and logprobs of a sampler
    without the penalty step, for greedy, sampled and filtered rows."""
    rows = random_logits.shape[0]
    counts = jnp.asarray(np.random.default_rng(2).integers(0, 5, size=(rows, 50)), jnp.int32)
    steps = jnp.arange(rows, dtype=jnp.int32)
    for kwargs in (dict(), dict(temperature=1.3), dict(temperature=0.9, top_k=np.arange(rows) % 4,
                                                       top_p=np.where(np.arange(rows) % 2, 0.7, 1.0))):
        plain = settings(rows, seed=np.arange(rows) + 5, **kwargs)
        zero = plain._replace(penalties=penalties(rows))
        for step in (0, 3):
            want = _sample(jnp.asarray(random_logits), plain, steps + step)
            got = _sample(jnp.asarray(random_logits), zero, steps + step, counts)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_plain_rows_are_unchanged_by_a_penalised_neighbour(random_logits):
    """The penalty step runs for the whole batch when any row asks; rows without penalties must not notice."""
    rows = random_logits.shape[0]
    counts = jnp.asarray(np.random.default_rng(3).integers(0, 3, size=(rows, 50)), jnp.int32)
    plain = settings(rows, temperature=np.where(np.arange(rows) % 2, 1.0, 0.0), seed=np.arange(rows))
    mixed = plain._replace(penalties=LogitPenalties(
        jnp.asarray([1.0] + [0.0] * (rows - 1), jnp.float32), jnp.asarray([0.0, 1.5] + [0.0] * (rows - 2), jnp.float32),
        jnp.zeros((rows, MAX_LOGIT_BIAS), jnp.int32).at[2, 0].set(int(random_logits[2].argmin())),
        jnp.zeros((rows, MAX_LOGIT_BIAS), jnp.float32).at[2, 0].set(100.0)))
    steps = jnp.arange(rows, dtype=jnp.int32)
    want_tokens, want_logprobs = _sample(jnp.asarray(random_logits), plain, steps)
    tokens, logprobs = _sample(jnp.asarray(random_logits), mixed, steps, counts)
    assert int(tokens[2]) == int(random_logits[2].argmin())  # the biased row did change
    np.testing.assert_array_equal(np.asarray(tokens)[3:], np.asarray(want_tokens)[3:])
    np.testing.assert_array_equal(np.asarray(logprobs)[3:], np.asarray(want_logprobs)[3:])
    # The biased row's logprob is of the distribution it was sampled from: the forced token has almost all of it.
    assert abs(float(logprobs[2])) < 1e-4


# ------------------------------------------------------------- the host conversion cannot raise (engine)

VOCAB = 131072


def convert(samplings):
    return slot_sampling(samplings, VOCAB)


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32 + 5, 2**62 + 3, 2**63 - 1, -1, -5,
                                  -2**31, -2**63])
def test_seed_keys_equal_prng_key_wherever_it_accepts_the_seed(seed):
    want = np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)))
    np.testing.assert_array_equal(seed_key_data(seed), want)
    np.testing.assert_array_equal(np.asarray(convert([Sampling(seed=seed)]).key)[0], want)
    with jax.enable_x64(True):  # JAX keeps all 64 bits of the seed there: [high, low] of seed mod 2**64
        np.testing.assert_array_equal(seed_key_data(seed), np.asarray(jax.random.key_data(jax.random.PRNGKey(seed))))
        np.testing.assert_array_equal(seed_key_data(seed), [(seed % 2**64) >> 32, seed % 2**32])


@pytest.mark.parametrize("seed", [2**63, 2**63 + 7, 2**64 + 5, -2**63 - 1, 10**30])
def test_seeds_outside_int64_convert(seed):
    """PRNGKey raises OverflowError for these (e.g. a seed near 2**63 plus the choice index for n > 1)."""
    key = np.asarray(convert([Sampling(temperature=1.0, seed=seed), Sampling()]).key)
    np.testing.assert_array_equal(key[0], [0, seed % 2**32])  # wrapped as JAX wraps the seeds it accepts
    np.testing.assert_array_equal(key[1], [0, 0])


@pytest.mark.parametrize("top_k,expected", [(2**31, VOCAB), (2**31 - 1, VOCAB), (2**40, VOCAB), (10**30, VOCAB),
                                            (-2**31 - 1, 0)])
def test_top_k_is_clamped_into_the_vocabulary(top_k, expected):
    converted = convert([Sampling(temperature=1.0, top_k=top_k), Sampling(top_k=40)])
    np.testing.assert_array_equal(np.asarray(converted.top_k), [expected, 40])
    assert converted.top_k.dtype == np.int32


def test_logit_bias_converts_into_the_sparse_rows():
    many = tuple((token, 1.0) for token in range(MAX_LOGIT_BIAS + 50))
    converted = convert([
        Sampling(logit_bias={"5": -100, 9: 250.0, 5: 3.0, VOCAB: 1.0, -1: 1.0, 2**70: 1.0}),
        Sampling(presence_penalty=float("nan"), frequency_penalty=1e30, logit_bias=many),
        Sampling()])
    penalised = converted.penalties
    assert penalised.bias_ids.shape == (3, MAX_LOGIT_BIAS) and penalised.bias_ids.dtype == np.int32
    # Repeated id: the last bias; out of the vocabulary: dropped; values clipped to [-100, 100].
    np.testing.assert_array_equal(penalised.bias_ids[0, :3], [5, 9, 0])
    np.testing.assert_array_equal(penalised.bias_values[0, :3], [3.0, 100.0, 0.0])
    np.testing.assert_array_equal(penalised.bias_ids[1], np.arange(MAX_LOGIT_BIAS))  # the first 300 kept
    np.testing.assert_array_equal(penalised.presence, [0.0, 0.0, 0.0])  # NaN: off
    np.testing.assert_array_equal(penalised.frequency, [0.0, 2.0, 0.0])  # OpenAI's range
    assert not penalised.bias_values[2].any()


def test_sampling_stays_positional_and_hashable():
    assert Sampling(0.7, 0.9, 5, 42) == Sampling(temperature=0.7, top_p=0.9, top_k=5, seed=42)
    biased = Sampling(0.7, 0.9, 5, 42, logit_bias={7: -100})
    assert biased.logit_bias == ((7, -100.0),)
    assert hash(biased) == hash(Sampling(0.7, 0.9, 5, 42, logit_bias=((7, -100.0),)))
