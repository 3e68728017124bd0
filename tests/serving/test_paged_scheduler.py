"""The paged scheduler (token budget, chunked prefill, block admission, preemption, prefix caching, forks) and
the driver carrying it out, against tests/serving/fakes.py's FakePagedEngine, whose tokens depend on the
context it reads back through the tables (`reference`: the tokens of an uninterrupted run).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.driver import Driver
from cluster.kv_blocks import BlockPool
from cluster.kv_ranks import RankedPools
from cluster.scheduler import InvalidRequest, Request, Scheduler
from grok1.engine_api import Sampling
from tests.serving.fakes import EOS, VOCAB, FakePagedEngine, reference

MAX_LEN = 128


def make(num_blocks=64, block_size=4, max_slots=4, token_budget=None, prefix_caching=True, ranks=1, **kwargs):
    """A driver over the fake engine; `ranks` > 1 splits the pool (num_blocks in all) and slots over ep ranks."""
    if ranks == 1:
        pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
    else:
        pool = RankedPools.split(num_blocks, block_size, ranks, prefix_caching=prefix_caching)
    scheduler = Scheduler(max_slots, MAX_LEN, VOCAB, EOS, kv=pool, token_budget=token_budget, **kwargs)
    engine = FakePagedEngine(num_blocks, block_size, max_slots, ranks)
    return Driver(engine, scheduler), scheduler, engine


def req(name, prompt, max_tokens=8, seed=0, **kwargs):
    return Request(name, list(prompt), max_tokens=max_tokens, sampling=Sampling(seed=seed), ignore_eos=True,
                   **kwargs)


def run_checked(driver, scheduler, max_steps=10_000):
    """run_until_idle, checking the pool's books after every step."""
    for _ in range(max_steps):
        if driver.idle:
            return driver.completions
        driver.step()
        scheduler.kv.check_invariants()
    raise AssertionError("deadlock: requests still running")


# ----------------------------------------------------------------------------------------------- tokens


def test_tokens_equal_an_uninterrupted_run_with_chunks_and_stops():
    driver, scheduler, engine = make(token_budget=12)
    requests = [req(f"r{i}", range(i, i + 3 * i + 1), max_tokens=5 + i, seed=i) for i in range(7)]
    requests.append(Request("eos", [1, 2], max_tokens=30, sampling=Sampling(seed=3)))  # may stop early
    for request in requests:
        driver.submit(request)
    completions = run_checked(driver, scheduler)
    for request in requests:
        assert completions[request.request_id].tokens == reference(request), request.request_id
    assert scheduler.kv.used_blocks == 0  # every finished sequence gave its blocks back


def test_every_step_stays_within_the_budget_and_decodes_first():
    driver, scheduler, engine = make(token_budget=10, max_slots=4)
    driver.submit(req("stream", [5, 6], max_tokens=40))
    driver.step()  # the stream is prefilled
    driver.submit(req("long", range(100), max_tokens=2))
    steps_with_long = 0
    while "long" not in {c.request_id for c in driver.completions.values() if c.finish_reason}:
        before = len(driver.completions["stream"].tokens)
        driver.step()
        assert len(driver.completions["stream"].tokens) == before + 1  # never stalled by the long prefill
        steps_with_long += 1
    for plan in engine.plans:
        assert len(plan.decode) + sum(len(c.tokens) for c in plan.chunks) <= 10
    chunks = [c for p in engine.plans for c in p.chunks if c.slot == 1]
    assert [len(c.tokens) for c in chunks] == [9] * 11 + [1]  # 100 tokens in chunks of budget - 1 decode
    assert [c.start for c in chunks] == list(range(0, 100, 9))
    run_checked(driver, scheduler)
    assert driver.completions["long"].tokens == reference(req("long", range(100), max_tokens=2))


# ------------------------------------------------------------------------------------------- preemption


def test_preempted_sequences_resume_with_exactly_their_tokens():
    """12 blocks of 4 tokens; four sequences growing to 30 tokens each cannot all fit: the newest ones are
    preempted and recomputed, and every request still gets the uninterrupted tokens."""
    driver, scheduler, engine = make(num_blocks=12, block_size=4, token_budget=8)
    requests = [req(f"r{i}", [i + 1] * 6, max_tokens=24, seed=10 + i) for i in range(4)]
    for request in requests:
        driver.submit(request)
    completions = run_checked(driver, scheduler)
    assert scheduler.preemptions > 0
    for request in requests:
        assert completions[request.request_id].tokens == reference(request)
        assert completions[request.request_id].finish_reason == "length"
    replays = [c for p in engine.plans for c in p.chunks if c.final and c.generated]
    assert replays and all(len(c.tokens) for c in replays)  # resumed: prefilled prompt + generated again


def test_preempted_request_can_be_cancelled_or_expire_while_queued():
    driver, scheduler, engine = make(num_blocks=6, block_size=4, token_budget=8)
    driver.submit(req("old", [1] * 4, max_tokens=16))
    driver.submit(req("new", [2] * 4, max_tokens=16))
    while not scheduler.preemptions:
        driver.step()
    assert [r.request_id for r in scheduler.queue] == ["new"] and "new" in scheduler.resume
    driver.cancel("new")
    assert not scheduler.resume and driver.completions["new"].finish_reason == "cancelled"
    run_checked(driver, scheduler)
    assert driver.completions["old"].tokens == reference(req("old", [1] * 4, max_tokens=16))


def test_a_rebuilt_engine_replays_preempted_requests_on_an_empty_pool():
    driver, scheduler, engine = make(num_blocks=6, block_size=4, token_budget=8)
    driver.submit(req("old", [1] * 4, max_tokens=16))
    driver.submit(req("new", [2] * 4, max_tokens=16, seed=4))
    while not scheduler.preemptions:
        driver.step()
    driver.abort_running("injected")
    assert driver.completions["old"].finish_reason == "error"
    assert scheduler.kv.used_blocks == 0 and not scheduler.kv.cached
    driver.engine = FakePagedEngine(6, 4, 4)  # the group is rebuilt: its device pool is empty
    run_checked(driver, scheduler)
    assert driver.completions["new"].tokens == reference(req("new", [2] * 4, max_tokens=16, seed=4))


# ------------------------------------------------------------------------------------------ out of memory


def test_a_request_larger_than_the_pool_is_refused_and_nothing_else_fails():
    driver, scheduler, engine = make(num_blocks=8, block_size=4)
    with pytest.raises(InvalidRequest, match="needs 11 KV blocks of 4 tokens; the whole pool has 8") as info:
        driver.submit(req("huge", range(40), max_tokens=1))
    assert info.value.field == "prompt"
    with pytest.raises(InvalidRequest, match="the whole pool has 8") as info:
        driver.submit(req("long-output", range(20), max_tokens=20))
    assert info.value.field == "max_tokens"
    driver.submit(req("fits", range(20), max_tokens=12))  # exactly the whole pool
    assert run_checked(driver, scheduler)["fits"].tokens == reference(req("fits", range(20), max_tokens=12))


# ------------------------------------------------------------------------------------------ prefix caching


def test_a_prefix_hit_prefills_only_the_uncached_suffix_and_gives_cold_tokens():
    driver, scheduler, engine = make(num_blocks=64, block_size=8)
    shared = list(range(1, 33))  # four full blocks
    first = req("first", shared + [40, 41, 42], max_tokens=4)
    driver.submit(first)
    run_checked(driver, scheduler)
    engine.plans.clear()
    second = req("second", shared + [50, 51], max_tokens=6, seed=2)
    driver.submit(second)
    run_checked(driver, scheduler)
    [chunk] = [c for p in engine.plans for c in p.chunks]
    assert (chunk.start, chunk.tokens) == (32, (50, 51))  # only the suffix ran
    assert scheduler.cached_tokens == 32
    assert driver.completions["second"].tokens == reference(second)
    cold, _, _ = make(num_blocks=64, block_size=8, prefix_caching=False)
    assert cold.generate([second])[0].tokens == reference(second)


def test_a_chat_turn_reuses_the_previous_turn_including_its_generated_tokens():
    driver, scheduler, engine = make(num_blocks=64, block_size=4)
    turn1 = req("t1", range(1, 11), max_tokens=10)
    out = driver.generate([turn1])[0].tokens
    turn2 = req("t2", list(range(1, 11)) + out + [60, 61], max_tokens=3)
    assert driver.generate([turn2])[0].tokens == reference(turn2)
    assert scheduler.cached_tokens >= 16  # the prompt and the generated tokens' full blocks


def test_n_choices_fork_the_prompt_and_copy_the_shared_last_block_on_write():
    driver, scheduler, engine = make(num_blocks=64, block_size=4)
    prompt = list(range(1, 11))  # 2 full blocks and a partial one
    choices = [req(f"c{i}", prompt, max_tokens=6, seed=i) for i in range(3)]
    completions = driver.generate(choices)
    for choice, completion in zip(choices, completions):
        assert completion.tokens == reference(choice)
    first = engine.plans[0]
    assert [len(c.tokens) for c in first.chunks] == [10, 1, 1]  # the forks recompute only their last token
    assert [c.write_from for c in first.chunks][1:] == [10, 10]
    assert scheduler.cached_tokens == 18
    assert len(engine.plans[1].copies) == 2  # the first two writers copy the shared partial block


# ---------------------------------------------------------------------------------------- random workloads


workload = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 24), st.integers(0, 3), st.booleans()),
                    min_size=1, max_size=10)


@settings(max_examples=80, deadline=None)
@given(workload, st.integers(4, 24), st.sampled_from([2, 4, 8]), st.sampled_from([None, 6, 13]),
       st.integers(0, 5), st.sampled_from([1, 2]))
def test_random_workloads_finish_with_uninterrupted_tokens(specs, num_blocks, block_size, budget, cancel_at,
                                                           ranks):
    """Random prompts (often sharing prefixes), outputs, pool sizes and budgets, the pool whole or split over
    two ranks (num_blocks each): every request that fits a rank's pool ends with exactly its uninterrupted
    tokens, one is cancelled on the way, no block leaks, and no slot's table leaves its rank (the fake fails)."""
    driver, scheduler, engine = make(num_blocks=num_blocks * ranks, block_size=block_size,
                                     max_slots=3 if ranks == 1 else 4, token_budget=budget, ranks=ranks)
    accepted = []
    for i, (length, max_tokens, family, stop) in enumerate(specs):
        prompt = [family + 1] * (length // 2) + list(range(length - length // 2))
        request = Request(f"r{i}", prompt, max_tokens=max_tokens, sampling=Sampling(seed=family),
                          ignore_eos=not stop)
        try:
            driver.submit(request)
            accepted.append(request)
        except InvalidRequest as err:
            assert scheduler.kv.blocks_for(length + max_tokens) > num_blocks, err
    for _ in range(cancel_at):
        if not driver.idle:
            driver.step()
    if accepted:
        driver.cancel(accepted[-1].request_id)
    completions = run_checked(driver, scheduler)
    for request in accepted:
        completion = completions[request.request_id]
        expected = reference(request)
        if completion.finish_reason == "cancelled":
            assert completion.tokens == expected[: len(completion.tokens)]
        else:
            assert completion.tokens == expected
    assert scheduler.kv.used_blocks == 0
    stats = scheduler.kv_stats()
    assert stats["kv_blocks_used"] == 0 and stats["running_sequences"] == stats["waiting_sequences"] == 0


def test_kv_stats_of_a_contiguous_scheduler_are_zeros_and_admit_is_refused_when_paged():
    assert Scheduler(2, MAX_LEN, VOCAB, EOS).kv_stats()["kv_blocks_total"] == 0
    _, scheduler, _ = make()
    with pytest.raises(RuntimeError, match="plan"):
        scheduler.admit()
    with pytest.raises(ValueError, match="token_budget"):
        Scheduler(4, MAX_LEN, VOCAB, EOS, kv=BlockPool(8, 4), token_budget=4)


def test_what_the_paged_engine_cannot_do_yet_is_refused_by_field():
    """Structured output and prompt logprobs run only in the contiguous engine: refused, not silently ignored."""
    scheduler = Scheduler(4, 64, 128, 0, kv=BlockPool(16, 4))

    class Grammar:
        vocab_size = 128

        def matcher(self):
            raise AssertionError("never used")

    with pytest.raises(InvalidRequest) as refused:
        scheduler.submit(Request("g", [1, 2], 4, grammar=Grammar()))
    assert refused.value.field == "response_format"
    with pytest.raises(InvalidRequest) as refused:
        scheduler.submit(Request("e", [1, 2], 4, sampling=Sampling(prompt_logprobs=True)))
    assert refused.value.field == "echo"
