"""Carries out the scheduler's decisions on an engine: the continuous-batching loop of one replica.

Each `step()`:
1. ends requests past their deadline and frees their slots;
2. prefills queued requests into free slots (their first token comes out of the prefill);
3. runs one decode step for all running slots, while new requests keep joining at step 2;
4. hands every token to the scheduler, which ends a request on EOS, a stop token or max_tokens,
   and releases its slot in the engine at once.

Every event goes to `on_event` as it happens; `on_flush` follows each phase of a step that produced events, so
the router sends a phase's events on in one message rather than one per token (cluster/streams.py).

The engine is anything with `prefill(slot, prompt, sampling)`, `decode()` and `release(slot)` (see
grok1.engine.Engine): the same loop runs on the in-process engine, the sharded one, or a fake in tests.

Paged (the scheduler has a block pool): steps 2 and 3 are one `scheduler.plan()`, carried out by one
`engine.paged_step(plan)` (block copies, the decode tokens, then the prefill chunks, whose last chunks give
first tokens); slots the plan preempted are released first. Not pipelined: the next plan needs this step's
tokens (a decode token's block is keyed by its value).

Pipelined (`pipelined=True`, for engines that also have `decode_start()` / `decode_finish(handle)`): step 3
starts decode step k+1 before it reads step k's tokens, so the device (or the shard workers, over Ray) compute
the next step while the host hands out the last one. The sampled tokens never leave the devices in between;
what the pipeline costs is one wasted token for a request that ends at step k (its slot is released after
step k+1 was started), and that token is dropped: a step's tokens go only to the requests that owned the
slots when the step was started and are still running.

Requests under a grammar (structured output) get a token mask per step (cluster/grammar_slots.py): with the
pipeline, such a slot sits out each step that starts before its last token was read. A token's top logprobs
and a prompt's logprobs (when its sampling asks) ride on its TokenEvent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cluster.grammar_slots import GrammarSlots
from cluster.scheduler import Request, Scheduler, TokenEvent
from grok1.engine_api import PromptLogprobs


@dataclass
class FinishedSequence:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class Driver:
    def __init__(self, engine, scheduler: Scheduler, on_event: Callable[[TokenEvent], None] | None = None, *,
                 pipelined: bool = False, keep_completions: bool = True, on_flush: Callable[[], None] | None = None,
                 on_step: Callable[[str, float], None] | None = None, clock=time.perf_counter):
        """`on_event` gets every event as it happens; `on_flush` is called after each phase that produced events
        (deadlines, prefills, a decode step's hand-out, a cancel, an abort), so that a consumer can send them on
        in one message per phase instead of one per token. `on_step(phase, seconds)` gets each engine step's
        wall time (cluster/step_timings.py says what a pipelined step's is), read from `clock`."""
        self.engine = engine
        self.scheduler = scheduler
        self.on_event = on_event
        self.on_flush = on_flush or (lambda: None)
        self.on_step = on_step or (lambda phase, seconds: None)
        self.clock = clock
        self._last_read = 0.0  # when the last pipelined decode step's tokens were read
        self.pipelined = pipelined
        self.keep_completions = keep_completions  # the router streams events instead
        self.completions: dict[str, FinishedSequence] = {}
        self.expert_counts: np.ndarray | None = None  # cumulative [L, E] tokens per expert
        self._in_flight = None  # (handle, {slot: request_id}, started) of a started, unread decode step
        self.grammars = GrammarSlots()

    @property
    def idle(self) -> bool:
        return self.scheduler.idle and self._in_flight is None

    def submit(self, request: Request) -> None:
        self.scheduler.submit(request)
        if self.keep_completions:
            self.completions[request.request_id] = FinishedSequence(request.request_id)

    def cancel(self, request_id: str) -> None:
        ended = self.scheduler.cancel(request_id)
        if ended is not None:
            self._end(*ended)
            self.on_flush()

    def step(self) -> None:
        for slot, event in self.scheduler.expire():
            self._end(slot, event)
        if self.scheduler.kv is not None:
            self._paged_step()
            self.on_flush()
            return
        admitted = self.scheduler.admit()
        contexts = [self.scheduler.context(slot) for slot, _ in admitted]  # prompt (+ tokens, when resumed)
        masks = [self.grammars.admit(slot, r) for slot, r in admitted]
        extra = {"masks": masks} if any(m is not None for m in masks) else {}  # engines without grammars too
        if any(n for _, n in contexts):
            extra["generated"] = [n for _, n in contexts]  # engines without resume never see it
        if admitted and hasattr(self.engine, "prefill_many"):  # one call for the whole burst
            started = self.clock()
            out = self.engine.prefill_many([slot for slot, _ in admitted], [c for c, _ in contexts],
                                           [r.sampling for _, r in admitted], **extra)
            self.on_step("prefill", self.clock() - started)
            self._count(out.expert_counts)
            for k, (slot, _) in enumerate(admitted):
                self._deliver(slot, out, k)
        else:
            for (slot, request), (context, n) in zip(admitted, contexts):
                started = self.clock()
                out = self.engine.prefill(slot, context, request.sampling, **({"generated": n} if n else {}))
                self.on_step("prefill", self.clock() - started)
                self._count(out.expert_counts)
                self._deliver(slot, out, 0)
        self.on_flush()  # the deadlines and first tokens go out now, not after the decode step below
        running = self.scheduler.running_slots()
        masks, skip = self.grammars.for_step(running)
        running = [slot for slot in running if slot not in skip]
        owners = {slot: self.scheduler.request_in(slot).request_id for slot in running}
        step_args = (masks, skip) if masks or skip else ()
        if not self.pipelined:
            if running:
                began = self.clock()
                out = self.engine.decode(*step_args)
                self.on_step("decode", self.clock() - began)
                self._hand_out(out, owners)
                self.on_flush()
            return
        started = (self.engine.decode_start(*step_args), owners, self.clock()) if running else None
        if self._in_flight is not None:
            handle, previous_owners, began = self._in_flight
            self._in_flight = None
            out = self.engine.decode_finish(handle)
            read = self.clock()
            self.on_step("decode", read - max(began, self._last_read))  # what this step added
            self._last_read = read
            self._hand_out(out, previous_owners)
            self.on_flush()
        self._in_flight = started

    def abort_running(self, message: str) -> list[TokenEvent]:
        """The engine is gone: end running requests with a retriable error and forget the step in flight."""
        self._in_flight = None
        self.grammars = GrammarSlots()
        events = [event for _, event in self.scheduler.abort_running(message)]
        for event in events:
            self._finish(event)
        self.on_flush()
        return events

    def readmit_running(self) -> list[str]:
        """The engine is gone and will be rebuilt: running requests are queued again to resume (see
        Scheduler.readmit_running); the step in flight is forgotten, its tokens never handed out."""
        self._in_flight = None
        return self.scheduler.readmit_running()

    def run_until_idle(self, max_steps: int = 1_000_000) -> dict[str, FinishedSequence]:
        for _ in range(max_steps):
            if self.idle:
                return self.completions
            self.step()
        raise RuntimeError(f"requests still running after {max_steps} steps")

    def generate(self, requests: list[Request]) -> list[FinishedSequence]:
        """Submit requests, run until all finish, return their completions in order."""
        for request in requests:
            self.submit(request)
        self.run_until_idle()
        return [self.completions.pop(r.request_id) for r in requests]

    # ----------------------------------------------------------------------------------------------
    def _paged_step(self) -> None:
        plan = self.scheduler.plan()
        for slot in plan.preempted:
            self.engine.release(slot)
        if plan.empty:
            return
        began = self.clock()
        decoded, prefilled = self.engine.paged_step(plan)
        self.on_step("mixed" if plan.decode and plan.chunks else "decode" if plan.decode else "prefill",
                     self.clock() - began)
        if decoded is not None:
            self._count(decoded.expert_counts)
            for slot in plan.decode:
                self._deliver(slot, decoded, slot)
        if prefilled is not None:
            self._count(prefilled.expert_counts)
            finals = [chunk.slot for chunk in plan.chunks if chunk.final]
            for k, slot in enumerate(finals):
                self._deliver(slot, prefilled, k)

    def _hand_out(self, out, owners: dict[int, str]) -> None:
        self._count(out.expert_counts)
        for slot, request_id in owners.items():
            current = self.scheduler.request_in(slot)
            if current is not None and current.request_id == request_id:  # not ended since the step started
                self._deliver(slot, out, slot)

    def _deliver(self, slot: int, out, row: int) -> None:
        """Row `row` of a step's output is the token of the request in `slot`."""
        sampling = self.scheduler.request_in(slot).sampling
        token = int(out.tokens[row])
        self.grammars.delivered(slot, token)
        k = getattr(sampling, "top_logprobs", 0)
        wanted = k or getattr(sampling, "logprobs", True) is not False  # else the step skipped it: 0 there
        event = self.scheduler.record(slot, token, float(out.logprobs[row]) if wanted else None)
        if k and getattr(out, "top_ids", None) is not None:
            event.top_logprobs = tuple(zip(out.top_ids[row, :k].tolist(), out.top_logprobs[row, :k].tolist()))
        if getattr(out, "prompt_logprobs", None) is not None and isinstance(out.prompt_logprobs[row],
                                                                              PromptLogprobs):
            event.prompt_logprobs = out.prompt_logprobs[row]
        completion = self.completions.get(event.request_id)
        if completion is not None:
            completion.tokens.append(event.token)
            completion.logprobs.append(event.logprob)
        if event.finish_reason:
            self.engine.release(slot)
            self.scheduler.free(slot)
            self.grammars.free(slot)
        self._finish(event)

    def _end(self, slot: int | None, event: TokenEvent) -> None:
        if slot is not None:
            self.grammars.free(slot)
            self.engine.release(slot)
            self.scheduler.free(slot)
        self._finish(event)

    def _finish(self, event: TokenEvent) -> None:
        completion = self.completions.get(event.request_id)
        if completion is not None and event.finish_reason:
            completion.finish_reason = event.finish_reason
        if self.on_event:
            self.on_event(event)

    def _count(self, counts: np.ndarray) -> None:
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
