"""The scheduler and the driver loop against a fake engine whose tokens can be worked out by hand.

The fake engine is tests/serving/fakes.py's FakeEngine: first token sum(prompt) % 100, then last + 1.

No JAX model is involved: these tests check only the scheduling decisions (admission order, slots, queue
bound, validation, stop conditions, cancellation, deadlines) and the driver carrying them out.
"""

from __future__ import annotations

import pickle
import time

import pytest

from cluster.driver import Driver, FinishedSequence
from cluster.scheduler import InvalidRequest, QueueFull, Request, Scheduler, TokenEvent
from grok1.engine import Sampling
from tests.serving.fakes import EOS, VOCAB, FakeEngine

MAX_LEN = 32


def make(max_slots: int = 4, max_queue: int | None = None, on_event=None) -> tuple[Driver, Scheduler, FakeEngine]:
    engine = FakeEngine(max_slots)
    scheduler = Scheduler(max_slots=max_slots, max_len=MAX_LEN, vocab_size=VOCAB, eos_token=EOS,
                          max_queue=max_queue)
    return Driver(engine, scheduler, on_event), scheduler, engine


def req(request_id: str, prompt: list[int], max_tokens: int = 4, **kwargs) -> Request:
    return Request(request_id, prompt, max_tokens=max_tokens, **kwargs)


# ------------------------------------------------------------------------------------------- admission


def test_fifo_admission_into_lowest_free_slot():
    scheduler = Scheduler(max_slots=3, max_len=MAX_LEN, vocab_size=VOCAB, eos_token=EOS)
    requests = [req(name, [1]) for name in "abcde"]
    for r in requests:
        scheduler.submit(r)
    assert [(slot, r.request_id) for slot, r in scheduler.admit()] == [(0, "a"), (1, "b"), (2, "c")]
    assert scheduler.admit() == []  # no free slot
    assert [r.request_id for r in scheduler.queue] == ["d", "e"]
    assert scheduler.running_slots() == [0, 1, 2]

    scheduler.free(2)
    scheduler.free(1)
    # The oldest queued request gets the lowest free slot.
    assert [(slot, r.request_id) for slot, r in scheduler.admit()] == [(1, "d"), (2, "e")]
    assert scheduler.request_in(1).request_id == "d"
    assert scheduler.request_in(0).request_id == "a"
    assert not scheduler.queue and not scheduler.idle

    for slot in (0, 1, 2):
        scheduler.free(slot)
    assert scheduler.idle and scheduler.request_in(0) is None


def test_driver_reuses_the_freed_slot_in_fifo_order():
    driver, scheduler, engine = make(max_slots=2)
    # "short" ends after 1 token, freeing slot 0 for "c" (queued before "d"); "long" keeps slot 1.
    driver.submit(req("short", [10], max_tokens=1))
    driver.submit(req("long", [20], max_tokens=5))
    driver.submit(req("c", [30], max_tokens=3))
    driver.submit(req("d", [40], max_tokens=2))
    driver.step()
    assert scheduler.running_slots() == [1] and [r.request_id for r in scheduler.queue] == ["c", "d"]
    driver.step()
    assert scheduler.request_in(0).request_id == "c" and [r.request_id for r in scheduler.queue] == ["d"]
    driver.run_until_idle()
    assert [(slot, prompt) for slot, prompt, _ in engine.prefills] == [(0, [10]), (1, [20]), (0, [30]),
                                                                        (0, [40])]
    assert driver.completions["c"].tokens == [30, 31, 32]
    assert driver.completions["d"].tokens == [40, 41]
    assert driver.completions["long"].tokens == [20, 21, 22, 23, 24]


def test_queue_bound_raises_queue_full_and_recovers():
    """max_queue counts requests waiting beyond the free slots: with 1 slot and max_queue 2, three fit."""
    driver, scheduler, engine = make(max_slots=1, max_queue=2)
    driver.submit(req("a", [1], max_tokens=3))  # takes the free slot at the next step
    driver.submit(req("b", [2], max_tokens=2))
    driver.submit(req("c", [3], max_tokens=2))
    with pytest.raises(QueueFull) as info:
        driver.submit(req("d", [4], max_tokens=2))
    assert info.value.retriable is True and QueueFull.retriable is True
    assert isinstance(info.value, RuntimeError) and not isinstance(info.value, InvalidRequest)
    assert "d" not in driver.completions and len(scheduler.queue) == 3

    driver.step()  # "a" is admitted and keeps the slot: still two waiting, still full
    with pytest.raises(QueueFull):
        driver.submit(req("d", [4], max_tokens=2))
    driver.step()  # "a" finishes (3 tokens) and frees its slot: one place frees up
    driver.submit(req("d", [4], max_tokens=2))
    driver.run_until_idle()
    assert {rid: c.tokens for rid, c in driver.completions.items()} == {
        "a": [1, 2, 3], "b": [2, 3], "c": [3, 4], "d": [4, 5]}
    assert all(c.finish_reason == "length" for c in driver.completions.values())
    assert scheduler.idle


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1, VOCAB]), "token ids"),
    (dict(prompt=[1, -1]), "token ids"),
    (dict(prompt=[1], max_tokens=0), "max_tokens"),
    (dict(prompt=[1], max_tokens=-3), "max_tokens"),
    (dict(prompt=[1] * 20, max_tokens=MAX_LEN - 19), "exceeds"),
    (dict(prompt=[1] * MAX_LEN, max_tokens=1), "exceeds"),
    (dict(prompt=[1], sampling=Sampling(temperature=-0.1)), "temperature"),
    (dict(prompt=[1], sampling=Sampling(temperature=1.0, top_p=0.0)), "top_p"),
    (dict(prompt=[1], sampling=Sampling(temperature=1.0, top_p=1.5)), "top_p"),
    (dict(prompt=[1], sampling=Sampling(temperature=1.0, top_p=-0.5)), "top_p"),
    (dict(prompt=[1], sampling=Sampling(top_k=-1)), "top_k"),
    (dict(prompt=[1], sampling=Sampling(logprobs=1)), "logprobs"),
    # What the engine cannot represent stops here, before any shard worker sees it (issue: one request
    # crashing the whole shard group).
    (dict(prompt=[1], sampling=Sampling(top_k=2 ** 31)), "top_k"),
    (dict(prompt=[1], sampling=Sampling(seed=2 ** 63)), "seed"),
    (dict(prompt=[1], sampling=Sampling(seed=-(2 ** 63) - 1)), "seed"),
    (dict(prompt=[1], sampling=Sampling(temperature=float("nan"))), "temperature"),
    (dict(prompt=[1], sampling=Sampling(temperature=float("inf"))), "temperature"),
    (dict(prompt=[1], sampling=Sampling(temperature=1.0, top_p=float("nan"))), "top_p"),
    (dict(prompt=[1], sampling=Sampling(temperature="1")), "temperature"),
    (dict(prompt=[1], sampling=Sampling(top_k=2.0)), "top_k"),
    (dict(prompt=[1], sampling=Sampling(seed=True)), "seed"),
    (dict(prompt=[1], sampling=Sampling(presence_penalty=float("nan"))), "presence_penalty"),
    (dict(prompt=[1], sampling=Sampling(frequency_penalty=2.5)), "frequency_penalty"),
    (dict(prompt=[1], sampling=Sampling(logit_bias=((VOCAB, 1.0),))), "logit_bias"),
    (dict(prompt=[1], sampling=Sampling(logit_bias=((3, 101.0),))), "logit_bias"),
    (dict(prompt=[1], sampling=Sampling(logit_bias=((3, 1.0), (3, 2.0)))), "logit_bias"),
    (dict(prompt=[1], sampling=Sampling(logit_bias=tuple((i, 1.0) for i in range(301)))), "logit_bias"),
    (dict(prompt=[1.5]), "token ids"),
    (dict(prompt="abc"), "token ids"),
    (dict(prompt=[1], max_tokens=2.0), "max_tokens"),
    (dict(prompt=[1], stop_token_ids=(VOCAB,)), "stop token ids"),
], ids=["empty", "id-vocab", "id-negative", "max_tokens-0", "max_tokens-negative", "prompt+max_tokens",
        "prompt-max_len", "temperature", "top_p-0", "top_p-above-1", "top_p-negative", "top_k",
        "top_k-int32", "seed-2**63", "seed-below-int64", "temperature-nan", "temperature-inf", "top_p-nan",
        "temperature-str", "top_k-float", "seed-bool", "presence-nan", "frequency-range", "bias-id", "bias-value",
        "bias-twice", "bias-count", "prompt-float", "prompt-str", "max_tokens-float", "stop-id", "logprobs-int"])
def test_invalid_requests_are_rejected_with_a_message(kwargs, message):
    driver, scheduler, engine = make()
    kwargs = {"max_tokens": 4, **kwargs}
    with pytest.raises(InvalidRequest, match=message) as info:
        driver.submit(Request("bad", **kwargs))
    assert isinstance(info.value, ValueError) and info.value.field
    assert pickle.loads(pickle.dumps(info.value)).field == info.value.field  # it crosses Ray intact
    assert not getattr(info.value, "retriable", False)
    assert not scheduler.queue and "bad" not in driver.completions
    # The scheduler keeps serving after a rejection.
    assert driver.generate([req("ok", [5], max_tokens=2)])[0].tokens == [5, 6]


def test_boundary_requests_are_accepted():
    driver, scheduler, engine = make()
    [full] = driver.generate([
        req("full", [1] * 20, max_tokens=MAX_LEN - 20,  # prompt + max_tokens == max_len exactly
            sampling=Sampling(temperature=0.0, top_p=1.0, top_k=0), ignore_eos=True)])
    assert full.tokens == [(20 + i) % VOCAB for i in range(MAX_LEN - 20)]
    assert full.finish_reason == "length"
    for sampling in (Sampling(temperature=2.0, top_p=1e-6, top_k=1), Sampling(top_k=VOCAB * 10),
                     Sampling(top_k=2 ** 31 - 1, seed=2 ** 63 - 1), Sampling(seed=-(2 ** 63))):
        driver.submit(req("edge", [0, VOCAB - 1], max_tokens=1, sampling=sampling))
        driver.run_until_idle()
        assert driver.completions.pop("edge").tokens == [VOCAB - 1]
    # The request's sampling settings reach the engine unchanged.
    assert engine.prefills[-3][2] == Sampling(top_k=VOCAB * 10)


# ------------------------------------------------------------------------------------- stop conditions


def test_eos_stops_unless_ignored():
    driver, scheduler, engine = make()
    stopped, ignored = driver.generate([req("eos", [3, 2], max_tokens=8),
                                        req("ignore", [3, 2], max_tokens=5, ignore_eos=True)])
    assert (stopped.tokens, stopped.finish_reason) == ([5, 6, 7], "stop")
    assert (ignored.tokens, ignored.finish_reason) == ([5, 6, 7, 8, 9], "length")
    assert stopped.logprobs == [-0.5, -0.25, -0.25]


def test_eos_as_first_token_and_as_last_allowed_token():
    driver, scheduler, engine = make()
    first, last = driver.generate([req("first", [3, 4], max_tokens=5),  # prefill gives 7 = EOS
                                   req("last", [5], max_tokens=3)])  # 5, 6, 7: EOS on the last allowed step
    assert (first.tokens, first.finish_reason) == ([7], "stop")
    assert (last.tokens, last.finish_reason) == ([5, 6, 7], "stop")  # "stop" wins over "length"
    assert engine.decodes == 2  # "first" never reached a decode step
    assert sorted(engine.releases) == [0, 1]


def test_stop_token_ids():
    driver, scheduler, engine = make()
    a, b, c = driver.generate([
        req("a", [10], max_tokens=10, stop_token_ids=(12, 50)),
        req("b", [40], max_tokens=10, stop_token_ids=(40,)),  # stops on the prefill token
        req("c", [97], max_tokens=10, stop_token_ids=(1,), ignore_eos=True),  # 97, 98, 99, 0, 1
    ])
    assert (a.tokens, a.finish_reason) == ([10, 11, 12], "stop")
    assert (b.tokens, b.finish_reason) == ([40], "stop")
    assert (c.tokens, c.finish_reason) == ([97, 98, 99, 0, 1], "stop")


def test_max_tokens_gives_length():
    driver, scheduler, engine = make()
    one, three = driver.generate([req("one", [50], max_tokens=1), req("three", [50], max_tokens=3)])
    assert (one.tokens, one.finish_reason) == ([50], "length")
    assert (three.tokens, three.finish_reason) == ([50, 51, 52], "length")


# ---------------------------------------------------------------------------------------- cancellation


def test_cancel_queued_request():
    events = []
    driver, scheduler, engine = make(max_slots=1, on_event=events.append)
    driver.submit(req("running", [20], max_tokens=4))
    driver.submit(req("queued", [30], max_tokens=4))
    driver.step()
    driver.cancel("queued")
    assert not scheduler.queue
    assert driver.completions["queued"].finish_reason == "cancelled"
    assert driver.completions["queued"].tokens == []
    assert events[-1] == TokenEvent("queued", None, None, "cancelled")
    assert engine.releases == []  # it never had a slot
    driver.run_until_idle()
    assert driver.completions["running"].tokens == [20, 21, 22, 23]
    assert [prompt for _, prompt, _ in engine.prefills] == [[20]]  # the cancelled one was never prefilled


def test_cancel_running_request_frees_its_slot():
    events = []
    driver, scheduler, engine = make(max_slots=2, on_event=events.append)
    driver.submit(req("a", [10], max_tokens=6))
    driver.submit(req("b", [20], max_tokens=6))
    driver.submit(req("c", [30], max_tokens=2))
    driver.step()  # a, b: prefill + one decode token each
    assert scheduler.running_slots() == [0, 1]
    driver.cancel("a")
    assert scheduler.running_slots() == [1]
    assert engine.releases == [0] and not engine.active[0]
    assert driver.completions["a"].finish_reason == "cancelled"
    assert driver.completions["a"].tokens == [10, 11]  # what it had before the cancel
    assert events[-1] == TokenEvent("a", None, None, "cancelled")
    driver.cancel("a")  # already ended: nothing happens
    driver.cancel("no-such-request")
    assert engine.releases == [0]
    driver.run_until_idle()
    assert engine.slots_of([30]) == [0]  # the queued request took the freed slot
    assert driver.completions["b"].tokens == [20, 21, 22, 23, 24, 25]
    assert driver.completions["c"].tokens == [30, 31]
    assert scheduler.cancel("b") is None


# ------------------------------------------------------------------------------------------- deadlines


def test_scheduler_expire_with_explicit_clock():
    scheduler = Scheduler(max_slots=1, max_len=MAX_LEN, vocab_size=VOCAB, eos_token=EOS)
    scheduler.submit(req("running", [1], deadline=100.0))
    scheduler.submit(req("queued-late", [1], deadline=50.0))
    scheduler.submit(req("queued-none", [1]))
    scheduler.admit()
    assert scheduler.expire(now=49.0) == []
    assert scheduler.expire(now=50.0) == [(None, TokenEvent("queued-late", None, None, "deadline"))]
    assert [r.request_id for r in scheduler.queue] == ["queued-none"]
    assert scheduler.expire(now=100.0) == [(0, TokenEvent("running", None, None, "deadline"))]
    # expire only reports a running request; the slot is freed by whoever releases the engine slot.
    assert scheduler.running_slots() == [0]


def test_deadline_of_queued_request():
    driver, scheduler, engine = make(max_slots=1)
    driver.submit(req("ok", [5], max_tokens=3))
    driver.submit(req("late", [6], max_tokens=3, deadline=time.monotonic() - 1.0))
    driver.submit(req("later", [8], max_tokens=2, deadline=time.monotonic() + 3600.0))
    driver.run_until_idle()
    assert driver.completions["late"].finish_reason == "deadline"
    assert driver.completions["late"].tokens == []
    assert driver.completions["ok"].tokens == [5, 6, 7]
    assert driver.completions["later"].tokens == [8, 9]
    assert [prompt for _, prompt, _ in engine.prefills] == [[5], [8]]


def test_deadline_of_running_request():
    events = []
    driver, scheduler, engine = make(max_slots=2, on_event=events.append)
    slow = req("slow", [10], max_tokens=20, deadline=time.monotonic() + 3600.0)
    driver.submit(slow)
    driver.submit(req("other", [50], max_tokens=5))
    driver.step()
    driver.step()
    slow.deadline = time.monotonic() - 1.0  # it passes while running
    driver.step()
    assert driver.completions["slow"].finish_reason == "deadline"
    assert driver.completions["slow"].tokens == [10, 11, 12]
    assert events[-2] == TokenEvent("slow", None, None, "deadline")  # then the decode step's token for "other"
    assert 0 not in scheduler.running_slots() and engine.releases == [0] and not engine.active[0]
    driver.run_until_idle()
    assert driver.completions["other"].tokens == [50, 51, 52, 53, 54]


# ---------------------------------------------------------------------------------------- whole runs


def test_generate_returns_hand_computed_tokens():
    events = []
    driver, scheduler, engine = make(max_slots=3, on_event=events.append)
    requests = [
        req("r0", [1, 2, 3], max_tokens=4),  # 6 7=EOS
        req("r1", [1, 2, 3], max_tokens=4, ignore_eos=True),  # 6 7 8 9
        req("r2", [98], max_tokens=4, ignore_eos=True),  # 98 99 0 1
        req("r3", [30, 30, 30, 30], max_tokens=3),  # 20 21 22 (queued at first)
        req("r4", [55, 45], max_tokens=2, stop_token_ids=(1,)),  # 0 1 (stop)
        req("r5", [12], max_tokens=1),  # 12
    ]
    completions = driver.generate(requests)
    assert [c.request_id for c in completions] == [r.request_id for r in requests]
    assert [(c.tokens, c.finish_reason) for c in completions] == [
        ([6, 7], "stop"),
        ([6, 7, 8, 9], "length"),
        ([98, 99, 0, 1], "length"),
        ([20, 21, 22], "length"),
        ([0, 1], "stop"),
        ([12], "length"),
    ]
    assert all(isinstance(c, FinishedSequence) for c in completions)
    assert all(isinstance(t, int) for c in completions for t in c.tokens)
    assert [c.logprobs[0] for c in completions] == [-0.5] * 6
    assert driver.completions == {}  # generate hands the completions over
    assert scheduler.idle and not engine.active.any()
    assert sorted(engine.releases) == sorted(slot for slot, _, _ in engine.prefills)  # every slot released once
    # Events: one per token, the last of each request carries its finish reason.
    for c in completions:
        mine = [e for e in events if e.request_id == c.request_id]
        assert [e.token for e in mine] == c.tokens
        assert [e.finish_reason for e in mine] == [None] * (len(c.tokens) - 1) + [c.finish_reason]
    # Three slots: r0..r2 first, r3 into slot 0 once r0 ended (step 2), r4 and r5 as slots free up.
    assert [slot for slot, _, _ in engine.prefills[:3]] == [0, 1, 2]
    assert engine.slots_of([30, 30, 30, 30]) == [0]


def test_finished_request_frees_its_slot_at_once():
    prompts = {"a": [1], "b": [2], "c": [3], "d": [4], "e": [5]}
    finished = []

    def on_event(event):
        if event.finish_reason:
            [slot] = engine.slots_of(prompts[event.request_id])
            # By the time its last token is delivered, the request holds no slot, in either place.
            assert slot not in scheduler.running_slots()
            assert engine.releases[-1] == slot and not engine.active[slot]
            finished.append(event.request_id)

    driver, scheduler, engine = make(max_slots=2, on_event=on_event)
    for name, max_tokens in [("a", 1), ("b", 3), ("c", 2), ("d", 1), ("e", 2)]:
        driver.submit(req(name, prompts[name], max_tokens=max_tokens))
    driver.step()  # a (slot 0) ends at its prefill; b (slot 1) gets 2 tokens
    assert finished == ["a"] and scheduler.running_slots() == [1]
    driver.step()  # c into slot 0 (2 tokens: done); b's 3rd token: done
    assert finished == ["a", "c", "b"] and scheduler.running_slots() == []
    driver.run_until_idle()  # d into slot 0 (1 token), e into slot 1
    assert finished == ["a", "c", "b", "d", "e"]
    assert [(slot, prompt) for slot, prompt, _ in engine.prefills] == [(0, [1]), (1, [2]), (0, [3]), (0, [4]),
                                                                        (1, [5])]
    assert {rid: c.tokens for rid, c in driver.completions.items()} == {
        "a": [1], "b": [2, 3, 4], "c": [3, 4], "d": [4], "e": [5, 6]}


def test_a_request_without_logprobs_gets_none_where_others_get_theirs():
    """Sampling(logprobs=False): the engine may skip the sampled token's logprob, and the events say None rather
    than the 0 the step leaves there; requests that keep the default, or ask for top logprobs, get theirs."""
    events = []
    driver, _, _ = make(on_event=events.append)
    driver.generate([req("none", [1], 3, sampling=Sampling(logprobs=False)), req("plain", [2], 3),
                     req("top", [3], 3, sampling=Sampling(logprobs=False, top_logprobs=1))])
    by_request = {name: [e.logprob for e in events if e.request_id == name] for name in ("none", "plain", "top")}
    assert by_request == {"none": [None] * 3, "plain": [-0.5, -0.25, -0.25], "top": [-0.5, -0.25, -0.25]}
