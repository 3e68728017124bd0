"""A caller's side of the router's subscription (Router.subscribe): every request this process submits to one
router streams its events through one Ray stream.

1. `submit(request)` opens the subscription on first use (its first item, {}, says it is open), registers a
   local `Stream` for the request, and calls `Router.submit`; refusals (InvalidRequest, QueueFull,
   Unavailable) raise there, before any token.
2. One pump task reads the subscription: each item is {request id: events since the last read}, and each
   request's events go to its Stream, read with `next_batch()` as a per-request `generate` stream would be.
3. If the subscription breaks (the router died, or its stream ended), every open Stream fails with the error
   and the next `submit` opens a new subscription. A request whose caller stops reading is `cancel`led.

Why: one Ray streaming item per request per step cost the caller and the router ~1.5 ms of CPU per token
(cluster/streams.py has the measurement); through one subscription it is one item per step for all requests.
A caller uses one RouterChannel per router, from one event loop (an ingress replica's, a load generator's).
"""

from __future__ import annotations

import asyncio
import uuid

from cluster.streams import Stream
from grok1.engine_api import Request, Unavailable

OPEN_TIMEOUT_S = 60.0  # the router answers a subscription at once; past this it is not serving


class RouterChannel:
    def __init__(self, router, open_timeout_s: float = OPEN_TIMEOUT_S):
        self.router = router
        self.open_timeout_s = open_timeout_s
        self.subscriber: str | None = None
        self._streams: dict[str, Stream] = {}
        self._pump: asyncio.Task | None = None
        self._opening: asyncio.Lock | None = None

    async def submit(self, request: Request, timeout_s: float | None = None) -> Stream:
        """Queue `request` on the router; its events arrive in the returned Stream."""
        subscriber = await self._open()
        stream = Stream(asyncio.get_running_loop())
        self._streams[request.request_id] = stream
        try:
            await self.router.submit.remote(request, subscriber, timeout_s)
        except BaseException:
            self._streams.pop(request.request_id, None)
            raise
        return stream

    def cancel(self, request_id: str) -> None:
        """Stop streaming `request_id` here and free its slot there (fire and forget: within one step)."""
        self._streams.pop(request_id, None)
        self.router.cancel.remote(request_id)

    def close(self) -> None:
        """End the subscription: the router cancels whatever of ours is still running."""
        if self._pump is not None:
            self._pump.cancel()

    async def _open(self) -> str:
        if self._pump is not None and not self._pump.done():
            return self.subscriber
        self._opening = self._opening or asyncio.Lock()
        async with self._opening:
            if self._pump is None or self._pump.done():
                subscriber = f"sub-{uuid.uuid4().hex}"
                refs = self.router.subscribe.options(num_returns="streaming").remote(subscriber)
                try:
                    await asyncio.wait_for(self._first(refs), self.open_timeout_s)
                except asyncio.TimeoutError:
                    raise Unavailable(f"the router did not open a subscription within {self.open_timeout_s:g}s") \
                        from None
                self.subscriber = subscriber
                self._pump = asyncio.ensure_future(self._run(refs))
        return self.subscriber

    @staticmethod
    async def _first(refs) -> None:
        await (await refs.__anext__())

    async def _run(self, refs) -> None:
        error: BaseException = Unavailable("the router ended its subscription; retry the request")
        try:
            async for ref in refs:
                for request_id, events in (await ref).items():
                    stream = self._streams.get(request_id)
                    if stream is None:  # cancelled here: its last events are dropped
                        continue
                    stream.add(events)
                    if events[-1].finish_reason is not None:
                        del self._streams[request_id]
        except asyncio.CancelledError:
            error = Unavailable("the subscription to the router was closed")
            raise
        except Exception as err:  # noqa: BLE001 - the router died or failed: every open request gets it
            error = err
        finally:
            streams, self._streams = self._streams, {}
            for stream in streams.values():
                stream.fail(error)
