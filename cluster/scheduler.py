"""Continuous-batching decisions, with no JAX and no Ray: a bounded FIFO queue and a slot table.

The scheduler says what to do next (which queued requests to prefill into which free slots) and, given the
tokens an engine produced, what each request receives and which ones are finished. Whoever owns an engine
(cluster/driver.py in one process, the router actor across the cluster) carries those decisions out.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

from grok1.engine import Sampling


class QueueFull(RuntimeError):
    """The request queue is at capacity; retry later."""

    retriable = True


class InvalidRequest(ValueError):
    """The request can never be served as asked (empty prompt, too long, bad settings); `field` names the
    setting at fault when there is one."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # Ray pickles it back to the caller: keep the field
        return type(self), (self.args[0], self.field)


# What the engine can represent (grok1.engine converts these to int32 / float32 / threefry keys on the host,
# inside every shard worker: a value outside these ranges must stop here, not fail the whole shard group).
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)
TOP_K_MAX = 2 ** 31 - 1
TEMPERATURE_MAX = 100.0
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 300
MAX_TIMEOUT_S = 86_400.0  # a request's deadline is at most a day away


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite_in(value, lo: float, hi: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and lo <= value <= hi)


@dataclass
class Request:
    request_id: str
    prompt: list[int]
    max_tokens: int = 16
    sampling: Sampling = field(default_factory=Sampling)
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    deadline: float | None = None  # time.monotonic() after which the request is ended


@dataclass
class TokenEvent:
    request_id: str
    token: int | None  # None when the request ends without a new token (cancelled, deadline)
    logprob: float | None
    finish_reason: str | None  # None while running; "stop", "length", "cancelled", "deadline", "error"
    error: str | None = None  # with "error": what failed; the request may be retried from its prompt


@dataclass
class _Running:
    request: Request
    generated: int = 0


class Scheduler:
    def __init__(self, max_slots: int, max_len: int, vocab_size: int, eos_token: int, max_queue: int = 256):
        self.max_slots = max_slots
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.max_queue = max_queue
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: list[_Running | None] = [None] * max_slots

    # ------------------------------------------------------------------------------------------ intake
    def validate(self, request: Request) -> None:
        """Every field against what the engine can represent: one request's bad value ends that request only."""
        prompt = request.prompt
        if not isinstance(request.request_id, str) or not request.request_id:
            raise InvalidRequest("the request id must be a non-empty string", "request_id")
        if not isinstance(prompt, list) or not all(_is_int(t) for t in prompt):
            raise InvalidRequest("the prompt must be a list of token ids", "prompt")
        if not prompt:
            raise InvalidRequest("the prompt is empty", "prompt")
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequest(f"token ids must be in [0, {self.vocab_size})", "prompt")
        if not _is_int(request.max_tokens) or request.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be at least 1, got {request.max_tokens!r}", "max_tokens")
        if len(prompt) + request.max_tokens > self.max_len:
            raise InvalidRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({request.max_tokens}) exceeds "
                                 f"the context of {self.max_len} tokens", "max_tokens")
        if not all(_is_int(t) and 0 <= t < self.vocab_size for t in request.stop_token_ids):
            raise InvalidRequest(f"stop token ids must be in [0, {self.vocab_size})", "stop_token_ids")
        s = request.sampling
        if not _finite_in(s.temperature, 0.0, TEMPERATURE_MAX):
            raise InvalidRequest(f"temperature must be in [0, {TEMPERATURE_MAX:g}], got {s.temperature!r}",
                                 "temperature")
        if not _finite_in(s.top_p, 0.0, 1.0) or s.top_p == 0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {s.top_p!r}", "top_p")
        if not _is_int(s.top_k) or not 0 <= s.top_k <= TOP_K_MAX:
            raise InvalidRequest(f"top_k must be an integer in [0, {TOP_K_MAX}], got {s.top_k!r}", "top_k")
        if not _is_int(s.seed) or not SEED_RANGE[0] <= s.seed <= SEED_RANGE[1]:
            raise InvalidRequest(f"seed must be a 64-bit signed integer, got {s.seed!r}", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(s, name, 0.0)
            if not _finite_in(value, *PENALTY_RANGE):
                raise InvalidRequest(f"{name} must be in [{PENALTY_RANGE[0]:g}, {PENALTY_RANGE[1]:g}], "
                                     f"got {value!r}", name)
        bias = getattr(s, "logit_bias", ())
        if not isinstance(bias, tuple) or len(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries", "logit_bias")
        for entry in bias:
            if not (isinstance(entry, tuple) and len(entry) == 2 and _is_int(entry[0])
                    and 0 <= entry[0] < self.vocab_size and _finite_in(entry[1], *LOGIT_BIAS_RANGE)):
                raise InvalidRequest(f"logit_bias entries must be (token id in [0, {self.vocab_size}), bias in "
                                     f"[{LOGIT_BIAS_RANGE[0]:g}, {LOGIT_BIAS_RANGE[1]:g}]), got {entry!r:.60}",
                                     "logit_bias")
        if len({token for token, _ in bias}) != len(bias):
            raise InvalidRequest("logit_bias names a token id twice", "logit_bias")

    def submit(self, request: Request) -> None:
        self.validate(request)
        free_slots = sum(running is None for running in self.slots)  # these requests are admitted at once
        if len(self.queue) - free_slots >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.queue.append(request)

    # ------------------------------------------------------------------------------------------ decisions
    def admit(self) -> list[tuple[int, Request]]:
        """Queued requests to prefill now, each with the free slot it gets (FIFO, lowest slot first)."""
        admitted = []
        for slot, running in enumerate(self.slots):
            if running is None and self.queue:
                request = self.queue.popleft()
                self.slots[slot] = _Running(request)
                admitted.append((slot, request))
        return admitted

    def record(self, slot: int, token: int, logprob: float) -> TokenEvent:
        """A token produced for `slot`; says whether its request is now finished."""
        running = self.slots[slot]
        request = running.request
        running.generated += 1
        reason = None
        if (token == self.eos_token and not request.ignore_eos) or token in request.stop_token_ids:
            reason = "stop"
        elif running.generated >= request.max_tokens:
            reason = "length"
        return TokenEvent(request.request_id, int(token), float(logprob), reason)

    def expire(self, now: float | None = None) -> list[tuple[int | None, TokenEvent]]:
        """Requests past their deadline, queued (slot None) or running."""
        now = time.monotonic() if now is None else now
        ended = []
        for request in [r for r in self.queue if r.deadline is not None and r.deadline <= now]:
            self.queue.remove(request)
            ended.append((None, TokenEvent(request.request_id, None, None, "deadline")))
        for slot, running in enumerate(self.slots):
            if running and running.request.deadline is not None and running.request.deadline <= now:
                ended.append((slot, TokenEvent(running.request.request_id, None, None, "deadline")))
        return ended

    def cancel(self, request_id: str) -> tuple[int | None, TokenEvent] | None:
        for request in self.queue:
            if request.request_id == request_id:
                self.queue.remove(request)
                return None, TokenEvent(request_id, None, None, "cancelled")
        for slot, running in enumerate(self.slots):
            if running and running.request.request_id == request_id:
                return slot, TokenEvent(request_id, None, None, "cancelled")
        return None

    def abort_running(self, message: str) -> list[tuple[int, TokenEvent]]:
        """End every running request with a retriable error (its shard group failed); queued ones stay."""
        ended = []
        for slot, running in enumerate(self.slots):
            if running is not None:
                ended.append((slot, TokenEvent(running.request.request_id, None, None, "error", message)))
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
