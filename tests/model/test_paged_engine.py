"""The paged engine (grok1/paged_engine.py) on the golden model, driven by the paged scheduler and the driver.

Its tokens are compared with the contiguous engine's (grok1.engine.Engine, same prompts, same settings) and
with themselves under chunking, preemption, prefix hits and forks: each of those must give exactly the tokens
and logprobs of the plain run. Blocks of 8 positions, so the golden prompts span several blocks.
"""

from __future__ import annotations

import numpy as np
import pytest

from cluster.driver import Driver
from cluster.kv_blocks import BlockPool
from cluster.scheduler import Request, Scheduler
from grok1.engine import Engine, Sampling
from grok1.paged_engine import PagedEngine

pytestmark = pytest.mark.slow

ENGINE = {"max_slots": 4, "max_len": 64, "prefill_buckets": [16, 32], "moe_block_size": 8}
PAGED = {**ENGINE, "kv_blocks": 40, "kv_block_size": 8}
TOKENS = 8
GREEDY = Sampling()
SEEDED = Sampling(temperature=0.8, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def engines(golden):
    contiguous = Engine(golden.config.replace(engine=ENGINE), golden.params)
    paged = PagedEngine(golden.config.replace(engine=PAGED), golden.params)
    return contiguous, paged


@pytest.fixture(scope="module")
def prompts(golden):
    return [list(map(int, p)) for p in golden.cases["prompt_ids"]][:3]


def paged_driver(engine: PagedEngine, num_blocks: int | None = None, token_budget: int | None = None,
                 prefix_caching: bool = True, on_event=None):
    config = engine.config
    pool = BlockPool(num_blocks or config.engine.kv_blocks, config.engine.kv_block_size,
                     prefix_caching=prefix_caching)
    scheduler = Scheduler(config.engine.max_slots, config.engine.max_len, config.model.vocab_size,
                          config.model.eos_token, kv=pool, token_budget=token_budget)
    return Driver(engine, scheduler, on_event), scheduler


def requests(prompts, sampling=GREEDY, tokens=TOKENS):
    return [Request(f"r{k}", p, tokens, sampling, ignore_eos=True) for k, p in enumerate(prompts)]


def assert_same_runs(got, want):
    """Exactly the same tokens; logprobs to float32 rounding (a recomputed token's logits come from a prefill
    of its context, not from the decode step that first sampled it)."""
    assert [tokens for tokens, _ in got] == [tokens for tokens, _ in want]
    for (_, logprobs), (_, expected) in zip(got, want):
        np.testing.assert_allclose(logprobs, expected, rtol=0, atol=1e-4)


def run(driver, reqs):
    return [(c.tokens, c.logprobs) for c in driver.generate(reqs)]


@pytest.fixture(scope="module")
def plain(engines, prompts):
    """The paged engine's greedy and seeded runs with a pool large enough for everything, all at once."""
    _, paged = engines
    return {s: run(paged_driver(paged, prefix_caching=False)[0], requests(prompts, s)) for s in (Sampling(), SEEDED)}


def test_prompts_span_several_blocks(prompts):
    assert max(len(p) for p in prompts) > 2 * PAGED["kv_block_size"]


def test_greedy_tokens_equal_the_contiguous_engine(engines, prompts, plain):
    contiguous, _ = engines
    scheduler = Scheduler(ENGINE["max_slots"], ENGINE["max_len"], contiguous.config.model.vocab_size,
                          contiguous.config.model.eos_token)
    expected = run(Driver(contiguous, scheduler), requests(prompts))
    for (tokens, logprobs), (want, want_logprobs) in zip(plain[Sampling()], expected):
        assert tokens == want
        np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-5)


def test_seeded_tokens_equal_the_contiguous_engine(engines, prompts, plain):
    contiguous, _ = engines
    scheduler = Scheduler(ENGINE["max_slots"], ENGINE["max_len"], contiguous.config.model.vocab_size,
                          contiguous.config.model.eos_token)
    expected = run(Driver(contiguous, scheduler), requests(prompts, SEEDED))
    assert [tokens for tokens, _ in plain[SEEDED]] == [tokens for tokens, _ in expected]


def top_logprobs_of(driver_of, prompts, k=3) -> list[list[tuple]]:
    """Per request, the top logprobs its events carry, in order (the first: the prefill's token). driver_of:
    on_event -> a Driver."""
    events = {}
    driver = driver_of(lambda event: events.setdefault(event.request_id, []).append(event.top_logprobs))
    driver.generate(requests(prompts, Sampling(top_logprobs=k), tokens=3))
    return [events[f"r{n}"] for n in range(len(prompts))]


def test_every_token_carries_the_top_logprobs_the_contiguous_engine_reports(engines, prompts):
    """The first token too: it comes from the paged engine's prefill, which sampled it without them."""
    contiguous, paged = engines
    scheduler = Scheduler(ENGINE["max_slots"], ENGINE["max_len"], contiguous.config.model.vocab_size,
                          contiguous.config.model.eos_token)
    want = top_logprobs_of(lambda on_event: Driver(contiguous, scheduler, on_event), prompts)
    got = top_logprobs_of(lambda on_event: paged_driver(paged, on_event=on_event)[0], prompts)
    for request, expected in zip(got, want):
        assert [len(top) for top in request] == [3] * len(expected)
        for top, expected_top in zip(request, expected):
            assert [i for i, _ in top] == [i for i, _ in expected_top]
            np.testing.assert_allclose([v for _, v in top], [v for _, v in expected_top], atol=1e-4)


@pytest.mark.parametrize("sampling", [Sampling(), SEEDED], ids=["greedy", "seeded"])
def test_chunked_prefill_gives_the_same_tokens_and_logprobs(engines, prompts, plain, sampling):
    _, paged = engines
    driver, scheduler = paged_driver(paged, token_budget=PAGED["max_slots"] + 3)  # chunks of <= 7 tokens
    assert run(driver, requests(prompts, sampling)) == plain[sampling]
    assert scheduler.prefill_tokens >= sum(len(p) for p in prompts)


def test_a_step_that_decodes_and_prefills_is_one_forward_pass(engines, prompts, plain, monkeypatch):
    """Under a token budget the later prompts' chunks share steps with the earlier prompts' decode tokens: each
    such step is one forward pass over both (mixed_step: the experts' weights read once), not a decode pass
    and then a prefill pass, and the tokens and logprobs stay the plain run's."""
    _, paged = engines
    passes = []
    def recorder(name):
        call = getattr(paged, name)

        def recording(*args, **kwargs):
            passes.append(name)
            return call(*args, **kwargs)
        return recording

    for name in ("_decode_forward", "_prefill", "_mixed"):
        monkeypatch.setattr(paged, name, recorder(name))
    mixed_steps = []
    step = paged.paged_step

    def recording_step(plan):
        passes.clear()
        out = step(plan)
        if plan.decode and plan.chunks:
            mixed_steps.append(list(passes))
        return out

    monkeypatch.setattr(paged, "paged_step", recording_step)
    driver, _ = paged_driver(paged, token_budget=PAGED["max_slots"] + 3)
    assert run(driver, requests(prompts)) == plain[Sampling()]
    assert mixed_steps and all(made == ["_mixed"] for made in mixed_steps), mixed_steps


@pytest.mark.parametrize("sampling", [Sampling(), SEEDED], ids=["greedy", "seeded"])
def test_preempted_sequences_give_the_uninterrupted_tokens(engines, prompts, plain, sampling):
    _, paged = engines
    def blocks(n):
        return -(-n // PAGED["kv_block_size"])

    # Room for every prompt at admission, not for all of them grown by TOKENS: someone must be preempted.
    at_admission = sum(blocks(len(p)) for p in prompts)
    assert sum(blocks(len(p) + TOKENS) for p in prompts) > at_admission
    need = max(blocks(len(p) + TOKENS) for p in prompts)
    driver, scheduler = paged_driver(paged, num_blocks=max(need, at_admission), prefix_caching=False)
    assert_same_runs(run(driver, requests(prompts, sampling)), plain[sampling])
    assert scheduler.preemptions > 0


def test_prefix_hits_and_forks_give_cold_tokens(engines, prompts, plain):
    _, paged = engines
    driver, scheduler = paged_driver(paged)
    first = run(driver, requests(prompts[:1]))
    again = run(driver, [Request("again", prompts[0], TOKENS, ignore_eos=True)])
    assert again == first == plain[Sampling()][:1]
    assert scheduler.cached_tokens == (len(prompts[0]) - 1) // PAGED["kv_block_size"] * PAGED["kv_block_size"]
    # Three choices of one prompt in one step: the first prefills it, the others fork it.
    choices = [Request(f"c{k}", prompts[1], TOKENS, SEEDED, ignore_eos=True) for k in range(3)]
    outs = run(driver, choices)
    assert all(out == plain[SEEDED][1] for out in outs)  # same seed: the same tokens as the lone run


def test_a_prefix_hit_prefills_only_its_suffix_at_the_suffixs_width(engines, prompts, monkeypatch):
    """The hit's one prefill call runs its uncached tokens padded to their own power of two (not to the
    shortest prompt bucket, 16 here), attending over a bucket of its live length (not max_len)."""
    _, paged = engines
    calls = []
    prefill = paged._prefill

    def recording(params, state, tables, tokens, *args, kv_len):
        calls.append((tokens.shape, kv_len))
        return prefill(params, state, tables, tokens, *args, kv_len=kv_len)

    monkeypatch.setattr(paged, "_prefill", recording)
    driver, scheduler = paged_driver(paged)
    prompt = prompts[2]
    size = PAGED["kv_block_size"]
    run(driver, [Request("cold", prompt, 1, ignore_eos=True)])
    calls.clear()
    run(driver, [Request("hit", prompt, 1, ignore_eos=True)])
    suffix = len(prompt) - (len(prompt) - 1) // size * size
    assert scheduler.cached_tokens == len(prompt) - suffix and suffix <= size
    assert calls == [((1, size), paged.kv_len_for(len(prompt)))]
    assert paged.kv_len_for(len(prompt)) < PAGED["max_len"]


def test_host_params_are_put_on_the_device_once(golden):
    """numpy params given to an engine are device arrays inside it: a numpy leaf passed to a jitted step is
    copied to the device on every call (a whole model's read per step)."""
    import jax

    host = jax.tree.map(np.asarray, golden.params)
    engine = PagedEngine(golden.config.replace(engine=PAGED), host)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(engine.params))
