"""Token streams from the router's step thread to its callers: one message per request per step, or fewer.

1. The step thread `put`s every TokenEvent into the `Outbox` as the driver produces it, and `flush`es after
   each phase of a step that produced events (the prefills, a decode step's hand-out, cancels, expiries):
   one call into each caller event loop per flush, whatever the number of requests and tokens in it.
2. On the loop, each request's `Stream` collects its events; `next_batch()` waits for at least one and returns
   everything accumulated since the caller last read, in order, ending with the finishing event if there is
   one. The router yields that list as one Ray streaming item.
3. The router's `generate` runs with Ray's generator backpressure of one item: it yields the next batch only
   after the caller has read the previous one, so a caller that falls behind (or a busy router) gets its
   tokens in fewer, larger messages instead of a backlog of one item per token.

Why: the router's cost per step was one Ray streaming item per token (serialising it, reporting it to the
caller, the caller's own handling) plus a wake-up of the event loop per token; both now scale with the
messages, and the messages with the steps.
"""

from __future__ import annotations

import asyncio

from grok1.engine_api import TokenEvent


class Stream:
    """One request's events on its caller's event loop (filled by `Outbox.flush`, emptied by `next_batch`)."""

    __slots__ = ("loop", "events", "ready")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: list[TokenEvent] = []
        self.ready = asyncio.Event()

    async def next_batch(self) -> list[TokenEvent]:
        """Every event since the last call (at least one), cut after a finish: nothing follows it."""
        while not self.events:
            self.ready.clear()
            await self.ready.wait()
        batch, self.events = self.events, []
        for k, event in enumerate(batch):
            if event.finish_reason is not None:
                return batch[: k + 1]
        return batch


def _deliver(deliveries: list[tuple[Stream, list[TokenEvent]]]) -> None:
    for stream, events in deliveries:
        stream.events.extend(events)
        stream.ready.set()


class Outbox:
    """The step thread's side: each request's events until the next flush. `streams` (request id -> Stream) is
    the router's table, written by the callers' loops; a request without a stream (its caller went away) is
    dropped at the flush."""

    def __init__(self, streams: dict[str, Stream]):
        self.streams = streams
        self.pending: dict[str, list[TokenEvent]] = {}
        self.flushes = 0  # calls into the callers' loops, for the stats

    def put(self, event: TokenEvent) -> None:
        events = self.pending.get(event.request_id)
        if events is None:
            self.pending[event.request_id] = [event]
        else:
            events.append(event)

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, {}
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, events in pending.items():
            stream = self.streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, events))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, deliveries)
                self.flushes += 1
            except RuntimeError:  # that caller's loop is closed: no one is left to read
                pass
