"""Carries out the scheduler's decisions on an engine: the continuous-batching loop of one replica.

Each `step()`:
1. ends requests past their deadline and frees their slots;
2. prefills queued requests into free slots (their first token comes out of the prefill);
3. runs one decode step for all running slots, while new requests keep joining at step 2;
4. hands every token to the scheduler, which ends a request on EOS, a stop token or max_tokens,
   and releases its slot in the engine at once.

The engine is anything with `prefill(slot, prompt, sampling)`, `decode()` and `release(slot)` (see
grok1.engine.Engine): the same loop runs on the in-process engine, the sharded one, or a fake in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from cluster.scheduler import Request, Scheduler, TokenEvent


@dataclass
class Completion:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None


class Driver:
    def __init__(self, engine, scheduler: Scheduler, on_event: Callable[[TokenEvent], None] | None = None):
        self.engine = engine
        self.scheduler = scheduler
        self.on_event = on_event
        self.completions: dict[str, Completion] = {}
        self.expert_counts: np.ndarray | None = None  # cumulative [L, E] tokens per expert

    def submit(self, request: Request) -> None:
        self.scheduler.submit(request)
        self.completions[request.request_id] = Completion(request.request_id)

    def cancel(self, request_id: str) -> None:
        ended = self.scheduler.cancel(request_id)
        if ended is not None:
            self._end(*ended)

    def step(self) -> None:
        for slot, event in self.scheduler.expire():
            self._end(slot, event)
        for slot, request in self.scheduler.admit():
            out = self.engine.prefill(slot, request.prompt, request.sampling)
            self._count(out.expert_counts)
            self._deliver(slot, out.tokens[0], out.logprobs[0])
        if self.scheduler.running_slots():
            out = self.engine.decode()
            self._count(out.expert_counts)
            for slot in self.scheduler.running_slots():
                self._deliver(slot, out.tokens[slot], out.logprobs[slot])

    def run_until_idle(self, max_steps: int = 1_000_000) -> dict[str, Completion]:
        for _ in range(max_steps):
            if self.scheduler.idle:
                return self.completions
            self.step()
        raise RuntimeError(f"requests still running after {max_steps} steps")

    def generate(self, requests: list[Request]) -> list[Completion]:
        """Submit requests, run until all finish, return their completions in order."""
        for request in requests:
            self.submit(request)
        self.run_until_idle()
        return [self.completions.pop(r.request_id) for r in requests]

    # ----------------------------------------------------------------------------------------------
    def _deliver(self, slot: int, token, logprob) -> None:
        event = self.scheduler.record(slot, int(token), float(logprob))
        completion = self.completions[event.request_id]
        completion.tokens.append(event.token)
        completion.logprobs.append(event.logprob)
        if event.finish_reason:
            completion.finish_reason = event.finish_reason
            self.engine.release(slot)
            self.scheduler.free(slot)
        if self.on_event:
            self.on_event(event)

    def _end(self, slot: int | None, event: TokenEvent) -> None:
        if slot is not None:
            self.engine.release(slot)
            self.scheduler.free(slot)
        self.completions[event.request_id].finish_reason = event.finish_reason
        if self.on_event:
            self.on_event(event)

    def _count(self, counts: np.ndarray) -> None:
        self.expert_counts = counts if self.expert_counts is None else self.expert_counts + counts
