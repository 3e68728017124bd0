"""grok1.sampling.sample: greedy, temperature, top-k, top-p (nucleus), per-row seeds and settings.

Everything runs on small hand-made vocabularies; many draws are taken at once as rows of one batch (each row
its own key and step), so a whole distribution costs a single call of the jitted sampler.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1.sampling import SlotSampling, sample

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
    for got, want in zip(one, batch):
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


def test_sampled_logprobs_are_under_the_models_own_distribution():
    logits = np.log(PROBS).astype(np.float32)
    tokens, logprobs = _sample(jnp.broadcast_to(jnp.asarray(logits), (256, 4)),
                               settings(256, temperature=2.0, top_k=2, seed=1), jnp.arange(256, dtype=jnp.int32))
    tokens = np.asarray(tokens)
    assert set(tokens.tolist()) == {0, 1}
    # Not the tempered or filtered distribution: log_softmax of the logits as given.
    np.testing.assert_allclose(np.asarray(logprobs), np.log(PROBS)[tokens], rtol=1e-5, atol=1e-5)


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
