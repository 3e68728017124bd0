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

4. A `Channel` carries the events of every request of one caller (an ingress replica: `Router.subscribe`) as
   one message per step for all of them, {request id: its events since the last read}: the caller's process
   pays for one Ray streaming item per step instead of one per request per step (measured on 2 cores:
   2,048 events to 32 requests cost 3.3 CPU-seconds as 2,048 items and 0.3 as 64).

Why: the router's cost per step was one Ray streaming item per token (serialising it, reporting it to the
caller, the caller's own handling) plus a wake-up of the event loop per token; both now scale with the
messages, and the messages with the steps.
"""

from __future__ import annotations

import asyncio

from grok1.engine_api import TokenEvent


def _through_finish(events: list[TokenEvent]) -> list[TokenEvent]:
    """The events up to and with the first finishing one: nothing of a request follows its finish."""
    for k, event in enumerate(events):
        if event.finish_reason is not None:
            return events[: k + 1]
    return events


class Stream:
    """One request's events on its caller's event loop (filled by `add`, emptied by `next_batch`). The router
    keeps one per `generate` call; a subscriber (cluster/channel.py) keeps one per request it submitted, and
    `fail`s them when its subscription breaks."""

    __slots__ = ("loop", "events", "ready", "error")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: list[TokenEvent] = []
        self.ready = asyncio.Event()
        self.error: BaseException | None = None

    def add(self, events: list[TokenEvent]) -> None:
        self.events.extend(events)
        self.ready.set()

    def fail(self, error: BaseException) -> None:
        """No more events will come: `next_batch` raises `error` once the ones already here are read."""
        self.error = error
        self.ready.set()

    async def next_batch(self) -> list[TokenEvent]:
        """Every event since the last call (at least one), cut after a finish: nothing follows it."""
        while not self.events:
            if self.error is not None:
                raise self.error
            self.ready.clear()
            await self.ready.wait()
        batch, self.events = self.events, []
        return _through_finish(batch)


class Channel:
    """One subscriber's events (Router.subscribe) on the router's loop: {request id: events} of every request
    it submitted, since its last read. `requests` are those not finished yet: the subscription's end cancels
    them."""

    __slots__ = ("loop", "pending", "ready", "requests")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: dict[str, list[TokenEvent]] = {}
        self.ready = asyncio.Event()
        self.requests: set[str] = set()

    def entry(self, request_id: str) -> "_ChannelEntry":
        """What the router's stream table holds for a request of this subscriber."""
        self.requests.add(request_id)
        return _ChannelEntry(self, request_id)

    async def next_batch(self) -> dict[str, list[TokenEvent]]:
        """Every request's events since the last call (at least one event); a request that finished is cut after
        its finish and leaves `requests`."""
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        batch, self.pending = self.pending, {}
        for request_id, events in batch.items():
            batch[request_id] = events = _through_finish(events)
            if events[-1].finish_reason is not None:
                self.requests.discard(request_id)
        return batch


class _ChannelEntry:
    __slots__ = ("channel", "request_id", "loop")

    def __init__(self, channel: Channel, request_id: str):
        self.channel, self.request_id, self.loop = channel, request_id, channel.loop

    def add(self, events: list[TokenEvent]) -> None:
        pending = self.channel.pending.get(self.request_id)
        if pending is None:
            self.channel.pending[self.request_id] = list(events)
        else:
            pending.extend(events)
        self.channel.ready.set()


def _deliver(deliveries: list[tuple[Stream | _ChannelEntry, list[TokenEvent]]]) -> None:
    for stream, events in deliveries:
        stream.add(events)


class Outbox:
    """The step thread's side: each request's events until the next flush. `streams` (request id -> a Stream, or
    a subscriber's entry) is the router's table, written by the callers' loops; a request without a stream (its
    caller went away) is dropped at the flush."""

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
