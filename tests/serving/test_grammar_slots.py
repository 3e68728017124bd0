"""The driver under grammars (cluster/grammar_slots.py) with a fake engine and a fake grammar: each constrained
step gets the mask of the slot's current state, a slot whose last token is still in flight sits the step out
(pipelined) while other slots decode every step, and top / prompt logprobs ride on the token events."""

from __future__ import annotations

import numpy as np

from cluster.driver import Driver
from cluster.scheduler import Request, Scheduler
from grok1.engine_api import InvalidRequest, PromptLogprobs, Sampling, StepOutput

SLOTS, VOCAB, EOS = 4, 64, 7


class CountingMatcher:
    """Allows exactly one token: the number of tokens taken so far + 10 (as a one-word mask)."""

    def __init__(self):
        self.taken = []

    def mask(self):
        return np.asarray([len(self.taken) + 10], np.uint32)

    def advance(self, token):
        self.taken.append(token)


class FakeGrammar:
    vocab_size = VOCAB

    def __init__(self):
        self.matchers = []

    def matcher(self):
        self.matchers.append(CountingMatcher())
        return self.matchers[-1]


class MaskedEngine:
    """Next token = the one the mask allows (word value), or last + 1 without a mask; top ids = [token, 0]."""

    def __init__(self):
        self.last = np.zeros(SLOTS, np.int64)
        self.active = np.zeros(SLOTS, bool)
        self.steps = []  # (masks, skip) per decode step

    def _out(self, tokens, prompt=None):
        top_ids = np.stack([tokens, np.zeros_like(tokens)], axis=1).astype(np.int32)
        return StepOutput(tokens.astype(np.int32), np.full(len(tokens), -0.5, np.float32), np.zeros((1, 8), int),
                          top_ids, np.full(top_ids.shape, -1.0, np.float32), prompt)

    def prefill_many(self, slots, prompts, samplings, masks=None):
        masks = masks or [None] * len(slots)
        tokens = np.asarray([int(m[0]) if m is not None else sum(p) % VOCAB for p, m in zip(prompts, masks)])
        for slot, token in zip(slots, tokens):
            self.last[slot], self.active[slot] = token, True
        scores = [PromptLogprobs([None] + [-1.0] * (len(p) - 1), [()] * len(p)) if s.prompt_logprobs else None
                  for p, s in zip(prompts, samplings)]
        return self._out(tokens, scores)

    def decode_start(self, masks=None, skip=()):
        self.steps.append((dict(masks or {}), list(skip)))
        going = self.active.copy()
        going[list(skip)] = False
        tokens = np.where(going, (self.last + 1) % VOCAB, -1)
        for slot, words in (masks or {}).items():
            tokens[slot] = int(words[0])
        self.last = np.where(going, tokens, self.last)
        return self._out(tokens)

    def decode_finish(self, handle):
        return handle

    def decode(self, masks=None, skip=()):
        return self.decode_start(masks, skip)

    def release(self, slot):
        self.active[slot] = False


def run(pipelined: bool):
    engine, events = MaskedEngine(), []
    scheduler = Scheduler(max_slots=SLOTS, max_len=64, vocab_size=VOCAB, eos_token=EOS)
    driver = Driver(engine, scheduler, events.append, pipelined=pipelined, keep_completions=True)
    grammar = FakeGrammar()
    done = driver.generate([Request("g", [1, 2], 5, Sampling(top_logprobs=2, prompt_logprobs=True), grammar=grammar),
                            Request("free", [20], 12)])
    return engine, events, grammar, {c.request_id: c for c in done}


def test_constrained_tokens_follow_their_masks_and_free_slots_keep_decoding():
    for pipelined in (False, True):
        engine, events, grammar, done = run(pipelined)
        assert done["g"].tokens == [10, 11, 12, 13, 14]  # each the one token its state allowed
        assert grammar.matchers[0].taken == [10, 11, 12, 13, 14]
        assert done["free"].tokens == [20 + k for k in range(12)]
        skipped = [step for step in engine.steps if 0 in step[1]]
        if pipelined:  # the constrained slot decodes every other step; the free one every step
            assert skipped and len(engine.steps) >= 11
            assert all(0 not in masks for masks, skip in engine.steps if 0 in skip)
        else:
            assert not skipped


def test_top_and_prompt_logprobs_ride_on_the_events():
    _, events, _, _ = run(pipelined=True)
    first = [e for e in events if e.request_id == "g"][0]
    assert first.prompt_logprobs.logprobs == [None, -1.0]
    assert all(e.top_logprobs == ((e.token, -1.0), (0, -1.0)) for e in events if e.request_id == "g")
    assert all(e.top_logprobs == () and e.prompt_logprobs is None for e in events if e.request_id == "free")


def test_the_scheduler_refuses_a_grammar_that_is_not_compiled_for_its_vocabulary():
    scheduler = Scheduler(max_slots=SLOTS, max_len=64, vocab_size=VOCAB, eos_token=EOS)
    for grammar in ("a+", type("Other", (FakeGrammar,), {"vocab_size": VOCAB + 1})()):
        try:
            scheduler.submit(Request("x", [1], 2, grammar=grammar))
        except InvalidRequest as err:
            assert err.field == "grammar"
        else:
            raise AssertionError("accepted")
