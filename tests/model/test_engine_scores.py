"""The engine's logprobs and grammar masks on the golden model: prompt logprobs at prefill equal a log-softmax
of the full forward (prompts in several buckets), top logprobs are the step's most likely tokens, a masked
slot generates only what its mask allows while its neighbours are untouched, and a skipped slot sits the
step out without changing its sequence.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from grok1 import model
from grok1.engine import Engine, Sampling
from grok1.grammar import mask_words

pytestmark = pytest.mark.slow

ENGINE = {"max_slots": 4, "max_len": 128, "prefill_buckets": [16, 32, 64], "moe_block_size": 8}
LOGPROB_ATOL = 0.1  # bf16 activations (tests/test_engine.py's bound)


@pytest.fixture(scope="module")
def engine(golden) -> Engine:
    return Engine(golden.config.replace(engine=ENGINE), golden.params)


@pytest.fixture(autouse=True)
def _release_all(engine):
    yield
    for slot in range(ENGINE["max_slots"]):
        engine.release(slot)


def full_logprobs(golden, tokens) -> np.ndarray:
    logits = model.full_forward(golden.params, golden.config.model, np.asarray([tokens], np.int32),
                                block=ENGINE["moe_block_size"]).logits[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(np.float32), axis=-1))


def test_prompt_logprobs_equal_the_full_forward_in_every_bucket(engine, golden):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 30000, size=n).tolist() for n in (7, 20, 45)]  # buckets 16, 32, 64
    out = engine.prefill_many([0, 1, 2], prompts, [Sampling(top_logprobs=3, prompt_logprobs=True)] * 3)
    for row, prompt in enumerate(prompts):
        scored = out.prompt_logprobs[row]
        reference = full_logprobs(golden, prompt)
        assert scored.logprobs[0] is None and len(scored.logprobs) == len(prompt)
        expected = [reference[t - 1, prompt[t]] for t in range(1, len(prompt))]
        np.testing.assert_allclose(scored.logprobs[1:], expected, rtol=0, atol=LOGPROB_ATOL)
        for t in range(1, len(prompt)):
            ids = [i for i, _ in scored.top[t]]
            assert len(ids) == 3 and abs(scored.top[t][0][1] - reference[t - 1].max()) < LOGPROB_ATOL
        # the first generated token, greedy, is the full forward's argmax at the last position (or tied)
        assert reference[-1][out.tokens[row]] > reference[-1].max() - 0.25
        assert out.top_ids[row, 0] == out.tokens[row]


def test_masked_slot_follows_its_mask_and_skipped_slot_keeps_its_sequence(engine):
    words = mask_words(engine.config.model.vocab_size)
    allowed = [1000, 2000, 3000]
    bits = np.zeros(words, np.uint32)
    for token in allowed:
        bits[token // 32] |= np.uint32(1 << (token % 32))
    free = engine.prefill_many([1], [[5, 6, 7]], [Sampling()]).tokens.tolist()
    for _ in range(4):
        free.append(int(engine.decode().tokens[1]))
    engine.release(1)

    first = engine.prefill_many([0, 1], [[9, 9, 9], [5, 6, 7]], [Sampling(temperature=1.0, seed=3), Sampling()],
                                masks=[bits, None])
    assert first.tokens[0] in allowed and first.tokens[1] == free[0]
    got = [int(first.tokens[1])]
    for step in range(4):
        skip = [1] if step == 1 else []
        out = engine.decode({0: bits}, skip)
        assert out.tokens[0] in allowed
        if skip:
            assert out.tokens[1] == -1
        else:
            got.append(int(out.tokens[1]))
    got.append(int(engine.decode().tokens[1]))
    assert got == free  # masks elsewhere and a skipped step leave the free slot's sequence as it was alone
