"""Continuous-batching decisions, with no JAX and no Ray: a bounded FIFO queue and a slot table.

The scheduler says what to do next (which queued requests to prefill into which free slots) and, given the
tokens an engine produced, what each request receives and which ones are finished. Whoever owns an engine
(cluster/driver.py in one process, the router actor across the cluster) carries those decisions out.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from grok1.engine_api import FinishReason, InvalidRequest, QueueFull, Request, TokenEvent, validate_request

# The request types are the engine API's; re-exported for the scheduler's users.
__all__ = ["InvalidRequest", "QueueFull", "Request", "Scheduler", "TokenEvent"]


@dataclass
class _Running:
    request: Request
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # generated so far: what a resume replays


class Scheduler:
    def __init__(self, max_slots: int, max_len: int, vocab_size: int, eos_token: int, max_queue: int | None = None):
        """`max_queue`: requests that may wait beyond the free slots (None: no bound, for offline runs whose
        caller holds every request anyway; a router passes its ReplicaConfig.max_queue)."""
        self.max_slots = max_slots
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.max_queue = max_queue
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: list[_Running | None] = [None] * max_slots
        self.resume: dict[str, list[int]] = {}  # re-admitted requests (queued again): the tokens they generated

    # ------------------------------------------------------------------------------------------ intake
    def validate(self, request: Request) -> None:
        validate_request(request, self.max_len, self.vocab_size)

    def submit(self, request: Request) -> None:
        self.validate(request)
        free_slots = sum(running is None for running in self.slots)  # these requests are admitted at once
        if self.max_queue is not None and len(self.queue) - free_slots >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.queue.append(request)

    # ------------------------------------------------------------------------------------------ decisions
    def admit(self) -> list[tuple[int, Request]]:
        """Queued requests to prefill now, each with the free slot it gets (FIFO, lowest slot first)."""
        admitted = []
        for slot, running in enumerate(self.slots):
            if running is None and self.queue:
                request = self.queue.popleft()
                replay = self.resume.pop(request.request_id, [])
                self.slots[slot] = _Running(request, len(replay), list(replay))
                admitted.append((slot, request))
        return admitted

    def context(self, slot: int) -> tuple[list[int], int]:
        """What the slot's prefill runs: the prompt and the tokens generated before a re-admission, and how
        many of those are generated (the random stream's index of the next token)."""
        running = self.slots[slot]
        return running.request.prompt + running.tokens, len(running.tokens)

    def readmit_running(self) -> list[str]:
        """The engine is gone but will be rebuilt: running requests go back to the front of the queue (in
        slot order), keeping their tokens, to be prefilled with prompt + tokens and continue where they were."""
        readmitted = []
        for slot, running in enumerate(self.slots):
            if running is not None:
                self.resume[running.request.request_id] = running.tokens
                readmitted.append(running.request)
                self.slots[slot] = None
        self.queue.extendleft(reversed(readmitted))
        return [request.request_id for request in readmitted]

    def drop_queued(self, request: Request) -> None:
        """Take a queued request out (the caller ends it)."""
        self.queue.remove(request)
        self.resume.pop(request.request_id, None)

    def record(self, slot: int, token: int, logprob: float) -> TokenEvent:
        """A token produced for `slot`; says whether its request is now finished."""
        running = self.slots[slot]
        request = running.request
        running.generated += 1
        running.tokens.append(int(token))
        reason = None
        if (token == self.eos_token and not request.ignore_eos) or token in request.stop_token_ids:
            reason = FinishReason.STOP
        elif running.generated >= request.max_tokens:
            reason = FinishReason.LENGTH
        return TokenEvent(request.request_id, int(token), float(logprob), reason)

    def expire(self, now: float | None = None) -> list[tuple[int | None, TokenEvent]]:
        """Requests past their deadline, queued (slot None) or running."""
        now = time.monotonic() if now is None else now
        ended = []
        for request in [r for r in self.queue if r.deadline is not None and r.deadline <= now]:
            self.drop_queued(request)
            ended.append((None, TokenEvent(request.request_id, None, None, FinishReason.DEADLINE)))
        for slot, running in enumerate(self.slots):
            if running and running.request.deadline is not None and running.request.deadline <= now:
                ended.append((slot, TokenEvent(running.request.request_id, None, None, FinishReason.DEADLINE)))
        return ended

    def cancel(self, request_id: str) -> tuple[int | None, TokenEvent] | None:
        for request in self.queue:
            if request.request_id == request_id:
                self.drop_queued(request)
                return None, TokenEvent(request_id, None, None, FinishReason.CANCELLED)
        for slot, running in enumerate(self.slots):
            if running and running.request.request_id == request_id:
                return slot, TokenEvent(request_id, None, None, FinishReason.CANCELLED)
        return None

    def abort_running(self, message: str) -> list[tuple[int, TokenEvent]]:
        """End every running request with a retriable error (its shard group failed); queued ones stay."""
        ended = []
        for slot, running in enumerate(self.slots):
            if running is not None:
                ended.append((slot, TokenEvent(running.request.request_id, None, None, FinishReason.ERROR, message)))
                self.slots[slot] = None
        return ended

    def free(self, slot: int) -> None:
        self.slots[slot] = None

    # ------------------------------------------------------------------------------------------ state
    def running_slots(self) -> list[int]:
        return [slot for slot, running in enumerate(self.slots) if running is not None]

    def request_in(self, slot: int) -> Request | None:
        running = self.slots[slot]
        return running.request if running else None

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running_slots()
