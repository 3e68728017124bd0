"""grok1/token_scores.py against numpy references: top-k logprobs, prompt logprobs, the grammar's bitmask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import grammar, token_scores


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_top_logprobs_are_the_k_largest_sorted_and_skipped_when_unwanted():
    logits = jax.random.normal(jax.random.PRNGKey(0), (3, 50)) * 3
    total = jax.nn.logsumexp(logits, axis=-1)
    ids, values = jax.jit(token_scores.top_logprobs, static_argnums=3)(logits, total, jnp.asarray([5, 0, 20]), 20)
    ids, values = np.asarray(ids), np.asarray(values)
    reference = log_softmax(np.asarray(logits))
    for row in range(3):
        order = np.argsort(-reference[row], kind="stable")[:20]
        assert list(ids[row]) == list(order)
        np.testing.assert_allclose(values[row], reference[row][order], atol=1e-5)
        assert np.all(np.diff(values[row]) <= 0)
    ids, values = token_scores.top_logprobs(logits, total, jnp.zeros(3, jnp.int32), 20)
    assert not np.any(np.asarray(ids)) and not np.any(np.asarray(values))


def test_prompt_logprobs_are_a_log_softmax_of_the_previous_position():
    logits = jax.random.normal(jax.random.PRNGKey(1), (2, 6, 40)) * 2
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 6), 0, 40)
    chosen, ids, values = token_scores.prompt_logprobs(logits, tokens, 4)
    reference = log_softmax(np.asarray(logits))
    t = np.asarray(tokens)
    expected = np.stack([[0.0] + [reference[b, p - 1, t[b, p]] for p in range(1, 6)] for b in range(2)])
    np.testing.assert_allclose(np.asarray(chosen), expected, atol=1e-5)
    assert np.asarray(ids).shape == (2, 6, 4) and not np.any(np.asarray(values)[:, 0])
    np.testing.assert_allclose(np.asarray(values)[:, 1:, 0], reference[:, :-1].max(-1), atol=1e-5)


def test_mask_unpacking_matches_the_host_layout():
    rng = np.random.default_rng(0)
    vocab = 70  # not a multiple of 32: the last word is partly padding
    allowed = rng.random((3, vocab)) < 0.3
    words = np.zeros((3, grammar.mask_words(vocab)), np.uint32)
    for row in range(3):
        for token in np.flatnonzero(allowed[row]):
            words[row, token // 32] |= np.uint32(1 << (token % 32))
        assert np.array_equal(grammar.unpack_mask(words[row], vocab), allowed[row])
    assert np.array_equal(np.asarray(token_scores.unpack_mask(jnp.asarray(words), vocab)), allowed)


def test_token_mask_forbids_outside_and_leaves_rows_without_a_grammar_alone():
    logits = jax.random.normal(jax.random.PRNGKey(3), (2, 64))
    words = jnp.asarray([[0b101, 0], [0xFFFFFFFF, 0]], jnp.uint32)  # row 0 allows tokens 0 and 2
    out = np.asarray(jax.jit(token_scores.apply_token_mask)(logits, words, jnp.asarray([True, False])))
    assert np.all(np.isinf(np.delete(out[0], [0, 2]))) and np.array_equal(out[0, [0, 2]], np.asarray(logits)[0, [0, 2]])
    assert np.array_equal(out[1], np.asarray(logits)[1])  # bit for bit
    same = token_scores.apply_token_mask(logits, words, jnp.asarray([False, False]))
    assert np.array_equal(np.asarray(same), np.asarray(logits))
