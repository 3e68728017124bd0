"""The paged pool split over the expert axis (cluster/kv_ranks.py): each rank's pool holds only the sequences of
its own slots, and the scheduler places, forks, reuses prefixes and preempts within a rank. The fake engine
(tests/serving/fakes.py) fails any step whose tables or copies cross ranks."""

from __future__ import annotations

import pytest

from cluster.kv_blocks import OutOfBlocks
from cluster.kv_ranks import RankedPools
from cluster.scheduler import InvalidRequest
from tests.serving.fakes import reference
from tests.serving.test_paged_scheduler import make, req, run_checked


def test_block_ids_are_global_and_rank_major():
    pools = RankedPools.split(8, 4, ranks=2)
    assert (pools.per_rank, pools.num_blocks) == (4, 8)
    first = pools.allocate("a", list(range(9)), rank=0)
    second = pools.allocate("b", list(range(9)), rank=1)
    assert set(first.blocks) <= {0, 1, 2, 3} and set(second.blocks) <= {4, 5, 6, 7}
    assert pools.block_table("b") == list(second.blocks)
    pools.fork("b", "b2")
    assert pools.rank_of("b2") == 1 and pools.block_table("b2") == pools.block_table("b")
    copies = pools.extend("b2", [5])  # the shared partial block is copied within rank 1
    assert copies and all(4 <= block < 8 for copy in copies for block in copy)
    with pytest.raises(OutOfBlocks):  # rank 0 has one free block, whatever rank 1 has
        pools.allocate("c", list(range(50, 59)), rank=0)
    assert pools.free_on(0) == 1 and "c" not in pools.sequences
    pools.check_invariants()
    for seq in ("a", "b", "b2"):
        pools.release(seq)
    assert pools.used_blocks == 0 and not pools.sequences
    pools.check_invariants()


def test_a_cached_prefix_is_looked_at_without_counting_a_query():
    pools = RankedPools.split(16, 4, ranks=2)
    prompt = list(range(1, 14))
    pools.allocate("a", prompt, rank=1)
    queries = pools.prefix_queries
    assert pools.cached_prefix(prompt) == [0, 3]
    assert pools.prefix_queries == queries


def test_sequences_spread_over_ranks_and_a_prefix_goes_where_it_is_cached():
    driver, scheduler, engine = make(num_blocks=32, block_size=4, max_slots=4, ranks=2)
    shared = list(range(1, 17))  # four full blocks
    driver.submit(req("a", shared + [20], max_tokens=4))
    driver.submit(req("b", [7, 8, 9], max_tokens=4))
    driver.step()
    assert scheduler.kv.rank_of("a") == 0 and scheduler.kv.rank_of("b") == 1  # b: rank 1 has more free blocks
    run_checked(driver, scheduler)
    # Rank 1 is now emptier than rank 0 (which keeps a's cached blocks), yet the prefix's rank is chosen.
    engine.plans.clear()
    repeat = req("again", shared + [30, 31], max_tokens=5, seed=3)
    driver.submit(repeat)
    driver.step()
    assert scheduler.kv.rank_of("again") == 0 and scheduler.slots_per_rank == 2
    [chunk] = engine.plans[0].chunks
    assert chunk.slot < 2 and chunk.start == 16  # only the uncached suffix ran, on rank 0's slots
    assert run_checked(driver, scheduler)["again"].tokens == reference(repeat)


def test_n_choices_fork_on_their_parents_rank():
    driver, scheduler, engine = make(num_blocks=32, block_size=4, max_slots=4, ranks=2)
    prompt = list(range(1, 11))
    choices = [req(f"c{i}", prompt, max_tokens=5, seed=i) for i in range(2)]
    for choice in choices:
        driver.submit(choice)
    driver.step()
    assert scheduler.kv.rank_of("c0") == scheduler.kv.rank_of("c1")
    assert [len(c.tokens) for c in engine.plans[0].chunks] == [10, 1]  # the second choice forked
    completions = run_checked(driver, scheduler)
    for choice in choices:
        assert completions[choice.request_id].tokens == reference(choice)


def test_a_full_rank_preempts_its_own_newest_sequence_only():
    """Rank 0 holds 6 blocks of 4 tokens: two sequences growing to 20 tokens each cannot both fit there, so
    its newest is preempted; rank 1's sequence, admitted after both, is never touched."""
    driver, scheduler, engine = make(num_blocks=12, block_size=4, max_slots=4, token_budget=16, ranks=2)
    driver.submit(req("old", [1] * 4, max_tokens=16))
    driver.submit(req("other", [3] * 4, max_tokens=16, seed=2))
    driver.submit(req("new", [2] * 4, max_tokens=16, seed=1))
    driver.step()
    assert [scheduler.kv.rank_of(s) for s in ("old", "other", "new")] == [0, 1, 0]
    preempted = []
    while not driver.idle:
        driver.step()
        preempted += [plan_slot for plan_slot in engine.plans[-1].preempted]
        scheduler.kv.check_invariants()
    assert scheduler.preemptions > 0 and all(slot < 2 for slot in preempted)
    for name, tokens, seed in (("old", [1] * 4, 0), ("other", [3] * 4, 2), ("new", [2] * 4, 1)):
        assert driver.completions[name].tokens == reference(req(name, tokens, max_tokens=16, seed=seed))


def test_a_request_larger_than_one_ranks_pool_is_refused_naming_the_split():
    driver, scheduler, engine = make(num_blocks=16, block_size=4, max_slots=4, ranks=2)
    with pytest.raises(InvalidRequest, match="2 expert-parallel ranks, whose pools have 8 each") as info:
        driver.submit(req("long-output", range(20), max_tokens=20))  # 10 blocks: fits the whole pool, no rank
    assert info.value.field == "max_tokens"
    fits = req("fits", range(20), max_tokens=12)  # exactly one rank's pool
    driver.submit(fits)
    assert run_checked(driver, scheduler)["fits"].tokens == reference(fits)
