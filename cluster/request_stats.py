"""What the router counts of its requests for /metrics: tokens, finishes, time to first token, time per output
token, and (cluster/step_timings.py) queue and step time. Fed by the router's step thread; read by `stats()`.
No JAX, no Ray."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

from cluster.step_timings import RouterTimings
from grok1.engine_api import FinishReason, Request, TokenEvent

SAMPLES = 2048  # recent TTFT / TPOT samples kept for the metrics
RATE_WINDOW_S = 10.0  # tokens_per_second: tokens of the last this many seconds


@dataclass
class _Timing:
    submitted: float
    prompt_tokens: int
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0


class RequestStats:
    def __init__(self):
        self.step_timings = RouterTimings()  # queue and step time histograms
        self._timings: dict[str, _Timing] = {}
        self._ttft = collections.deque(maxlen=SAMPLES)
        self._tpot = collections.deque(maxlen=SAMPLES)
        self._token_times = collections.deque(maxlen=100_000)
        self._finished = collections.Counter()
        self._tokens_total = 0
        self._prompt_tokens_total = 0

    def submitted(self, request: Request) -> None:
        self._timings[request.request_id] = _Timing(time.monotonic(), len(request.prompt))
        self.step_timings.arrived(request.request_id)
        self._prompt_tokens_total += len(request.prompt)

    def submitted_at(self, request_id: str) -> float:
        """When the request reached the router (0 if it is not known: it has ended)."""
        timing = self._timings.get(request_id)
        return timing.submitted if timing else 0.0

    def on_event(self, event: TokenEvent) -> None:
        now = time.monotonic()
        timing = self._timings.get(event.request_id)
        if event.token is not None:
            self._tokens_total += 1
            self._token_times.append(now)
            if timing is not None:
                if timing.first_token is None:
                    timing.first_token = now
                    self._ttft.append(now - timing.submitted)
                timing.tokens += 1
                timing.last_token = now
        if event.finish_reason:
            self._finished[FinishReason(event.finish_reason).value] += 1  # plain words: the stats travel to the ingress
            self.step_timings.forget(event.request_id)
            if timing is not None:
                self._timings.pop(event.request_id, None)
                if timing.tokens > 1:
                    self._tpot.append((timing.last_token - timing.first_token) / (timing.tokens - 1))

    def snapshot(self) -> dict:
        now = time.monotonic()
        recent = [t for t in list(self._token_times) if now - t <= RATE_WINDOW_S]
        return {
            "requests_total": dict(self._finished), "tokens_generated_total": self._tokens_total,
            "prompt_tokens_total": self._prompt_tokens_total,
            "ttft_seconds": list(self._ttft), "tpot_seconds": list(self._tpot),
            "tokens_per_second": len(recent) / RATE_WINDOW_S,
            "histograms": self.step_timings.snapshot(),
        }
