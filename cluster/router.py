"""The router: one model replica's request queue, continuous batching, and the loop that drives its shards.

Data flow, from request to last token:
1. A Ray caller calls `Router.generate(request)` as a Ray streaming generator (one stream per request); an
   ingress replica instead opens one `subscribe(subscriber)` stream and `submit`s each request to it
   (cluster/channel.py), which is the same but one message per step for all its requests. The router
   checks it is serving (else `Unavailable`, retriable) and hands the request to the step thread through an
   inbox; the scheduler validates it (`InvalidRequest`) and queues it (`QueueFull` when the bounded queue is
   full, retriable). Both errors reach the caller before any token: at its first read of `generate`, or
   raised by `submit`.
2. The step thread (one per router; the asyncio loop stays free for callers) runs `Driver.step()` while any
   request is queued or running: requests past their deadline end; queued requests are prefilled into free
   decode slots (their first token comes from the prefill); then one decode step for all running slots.
3. Every step is one fan-out call to the shard group (workers/group.py): each Ray shard worker runs the same
   jitted step on its part of the mesh, and the top-2 expert dispatch/combine crosses workers inside the step
   over the collectives (gloo / NCCL) — Ray carries one call per step, never per layer.
4. Pipelining: decode step k+1 is started before step k's tokens are read, so the workers compute while the
   tokens of step k travel back and are handed out. Sampled tokens stay on the devices between steps.
5. Each token becomes a `TokenEvent` in its request's outbox (cluster/streams.py); after each phase of a step
   the outbox is handed to the callers' event loop in one call, and `generate` yields everything its request
   got since the caller last read as one list: one Ray streaming item per request per step at most, fewer when
   the caller falls behind (Ray's generator backpressure holds the next item until the last one is read);
   `subscribe` yields {request id: that list} for all of the subscriber's requests as one item.
   A request ends on EOS, a stop token, max_tokens, its deadline, or cancellation; its slot is released at
   once and the next queued request takes it at the next step. A caller that goes away cancels its request.
6. Faults: a worker that dies or stops answering fails the step (`GroupFailure`); the whole group is torn
   down and rebuilt from the checkpoint. Running requests are not ended: they go back to the front of the
   queue with the tokens they have sent, and after the rebuild each is prefilled with prompt + those tokens,
   its sampling continuing at the same index of its random stream (fold_in(seed, n)) and its penalty counts
   restored, so the caller's stream only pauses and then goes on with exactly the tokens of an uninterrupted
   run. While rebuilding (in a helper thread) the step thread keeps taking requests (the queue bound refuses
   at once) and ends those past their deadline, or waiting longer than resume_timeout_s, with "deadline" /
   the retriable "error"; if the group cannot be rebuilt (REBUILD_ATTEMPTS) every request ends with the
   error. While idle the router pings the workers every few seconds, so a loss is noticed without traffic.

Where things live: the request types and errors are the engine API's (grok1/engine_api.py, no JAX: this actor
never loads the model); the decisions are cluster/scheduler.py's, the step loop cluster/driver.py's; the fan-out
to the workers is workers/group.py (`call(verb)` -> each `ShardWorker.execute(verb)`), and the expert
all-to-all is sharding/expert_parallel.py, inside the jitted step.

Why a thread: steps are blocking calls (to Ray or to JAX), and the callers' streams must keep flowing while
one runs; the scheduler and driver are touched only by that thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
import traceback

import numpy as np
import ray

from cluster.driver import Driver
from cluster.ray_context import this_actor, this_node_id
from cluster.replica_config import ReplicaConfig
from cluster.request_stats import RequestStats
from cluster.scheduler import Scheduler
from cluster.streams import Channel, Outbox, Stream
from grok1.config import Grok1Config
from grok1.engine_api import FinishReason, InvalidRequest, Request, TokenEvent, Unavailable, valid_timeout
from workers.allocator import allocator_actor_options
from workers.group import GroupEngine, GroupFailure, GroupSpec, LocalShardGroup, RayShardGroup

IDLE_PING_S = 2.0  # how often an idle router checks that its workers are alive
REBUILD_ATTEMPTS = 5  # consecutive failed rebuilds before the router gives up (state "failed")


class Router:
    def __init__(self, spec: GroupSpec, settings: ReplicaConfig, *, group_factory=None):
        """`spec` from `settings.group_spec(...)`; `group_factory(spec)` makes the shard group (default by
        `settings.backend`: Ray workers, or this process)."""
        factories = {"ray": RayShardGroup, "local": LocalShardGroup.from_spec}
        self.spec = spec
        self.settings = settings
        self.backend = settings.backend
        self.group_factory = group_factory or factories[settings.backend]
        self.max_queue = settings.max_queue
        self.pipelined = settings.pipelined
        config: Grok1Config = spec.config
        # A paged pool is split over the mesh's ep as the workers' engines split it (grok1/paged_engine.py).
        self.scheduler = Scheduler.for_config(config, max_queue=settings.max_queue, kv_ranks=spec.mesh.ep)
        self._stats = RequestStats()  # tokens, finishes, TTFT / TPOT, queue and step times, for /metrics
        self.scheduler.on_admit = self._stats.step_timings.admitted
        self._loading: dict[int, tuple[int, int]] = {}  # shard process -> (tensors loaded, tensors) while building
        self.state = "loading"
        self.error: str | None = None
        self.restarts = 0
        self._outage_since = 0.0  # when the group last failed
        self._draining = False  # shutting down: no new requests
        self.group = None
        self.driver: Driver | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, Stream] = {}  # request id -> its Stream (generate) or its subscriber's entry
        self._channels: dict[str, Channel] = {}  # subscriber id -> its open subscription
        self._outbox = Outbox(self._streams)  # the step thread's; flushed once per phase of a step
        self._items = 0  # streaming items yielded to the callers
        self._expert_counts = np.zeros((config.model.num_layers, config.model.num_experts), np.int64)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="router-steps", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------ the callers' side
    # One unread item per stream at most: the router yields the next batch once the caller has read the last.
    @ray.method(_generator_backpressure_num_objects=1)
    async def generate(self, request: Request, timeout_s: float | None = None):
        """Stream the request's TokenEvents in lists (each one: all the events since the caller's last read, in
        order); the last event of the last list has a finish_reason."""
        self._admissible(request, timeout_s)
        stream = Stream(asyncio.get_running_loop())
        self._streams[request.request_id] = stream
        accepted = concurrent.futures.Future()
        self._inbox.put(("submit", request, accepted))
        finished = False
        try:
            await self._accepted(accepted)
            while not finished:
                batch = await stream.next_batch()
                finished = batch[-1].finish_reason is not None
                self._items += 1
                yield batch
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:  # the caller went away (or cancelled): free its slot
                self._inbox.put(("cancel", request.request_id, None))

    @ray.method(_generator_backpressure_num_objects=1)
    async def subscribe(self, subscriber: str):
        """One stream for all the requests a caller submits with `submit(request, subscriber)`: each item is
        {request id: its TokenEvents since the caller's last read} (a request's last list ends with its
        finish), one item per step at most whatever the number of requests. The first item is {}: the
        subscription is open. When the caller goes away, its unfinished requests are cancelled."""
        if subscriber in self._channels:
            raise InvalidRequest(f"subscriber id {subscriber!r} is already in use")
        channel = Channel(asyncio.get_running_loop())
        self._channels[subscriber] = channel
        try:
            yield {}
            while True:
                batch = await channel.next_batch()
                for request_id, events in batch.items():
                    if events[-1].finish_reason is not None:
                        self._streams.pop(request_id, None)
                self._items += 1
                yield batch
        finally:
            self._channels.pop(subscriber, None)
            for request_id in channel.requests:
                self._streams.pop(request_id, None)
                self._inbox.put(("cancel", request_id, None))

    async def submit(self, request: Request, subscriber: str, timeout_s: float | None = None) -> None:
        """Queue `request`; its events go to the open subscription `subscriber`. Returns once the step thread has
        taken it; refusals raise here, as `generate` raises them at its first read."""
        channel = self._channels.get(subscriber)
        if channel is None:
            raise Unavailable(f"no open subscription {subscriber!r} on this router; subscribe again")
        self._admissible(request, timeout_s)
        self._streams[request.request_id] = channel.entry(request.request_id)
        accepted = concurrent.futures.Future()
        self._inbox.put(("submit", request, accepted))
        try:
            await self._accepted(accepted)
        except BaseException:  # refused (a cancel of it is a no-op), or the caller went away while it waited
            self._streams.pop(request.request_id, None)
            channel.requests.discard(request.request_id)
            self._inbox.put(("cancel", request.request_id, None))
            raise

    def _admissible(self, request: Request, timeout_s: float | None) -> None:
        """The checks before a request reaches the step thread (which validates the rest); sets its deadline."""
        if self._draining:
            raise Unavailable("the replica is shutting down (draining); retry on another replica")
        if self.state not in ("ready", "recovering"):  # while recovering it queues (bounded) and waits
            raise Unavailable(f"the replica is {self.state}" + (f": {self.error}" if self.error else ""))
        if request.request_id in self._streams:
            raise InvalidRequest(f"request id {request.request_id!r} is already in use")
        if timeout_s is not None:
            request.deadline = time.monotonic() + valid_timeout(timeout_s)

    async def _accepted(self, accepted: concurrent.futures.Future) -> None:
        """Wait for the step thread to take the request; it may be rebuilding the group (minutes), but if it
        has stopped for good no one will answer, so that is checked every second."""
        waiting = asyncio.wrap_future(accepted)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), 1.0)
            except asyncio.TimeoutError:
                if self.state in ("failed", "stopped"):
                    detail = f": {self.error}" if self.error else ""
                    raise Unavailable(f"the replica is {self.state}{detail}") from None

    async def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id, None))

    async def wait_ready(self, timeout_s: float = 600) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.state == "ready":
                return True
            if self.state == "failed":
                raise Unavailable(f"the replica failed to start: {self.error}")
            if self.state == "stopped":
                raise Unavailable("the router has been shut down")
            await asyncio.sleep(0.05)
        raise Unavailable(f"the replica is still {self.state} after {timeout_s:.0f}s")

    async def health(self, probe: bool = True) -> dict:
        """ok when the group is up and (with probe) a 1-token greedy generation completes."""
        if self.state != "ready" or self._draining:
            return {"ok": False, "state": self.state, "detail": "draining" if self._draining else
                    self.error or self.state}
        if not probe:
            return {"ok": True, "state": self.state, "detail": "serving"}
        request = Request(f"health-{time.monotonic_ns()}", [self.spec.config.model.eos_token], max_tokens=1,
                          ignore_eos=True)
        try:
            events = [event async for batch in self.generate(request, timeout_s=self.settings.health_timeout_s)
                      for event in batch]
        except Exception as err:  # noqa: BLE001 - any failure means unhealthy; say which
            return {"ok": False, "state": self.state, "detail": f"probe failed: {err!r}"}
        last = events[-1]
        ok = last.finish_reason == FinishReason.LENGTH and last.token is not None
        return {"ok": ok, "state": self.state, "detail": "probe generated 1 token" if ok else f"probe {last}"}

    async def load_progress(self, process: int, done: int, total: int) -> None:
        """A shard worker's loading progress (sent by the worker while its group is built)."""
        self._loading[process] = (done, total)

    async def stats(self) -> dict:
        running = len(self.scheduler.running_slots())
        workers = self.group.members() if self.group is not None else []
        return {
            "state": self.state, "error": self.error, "restarts": self.restarts,
            "queue_length": len(self.scheduler.queue), "running": running,
            "slots_total": self.scheduler.max_slots, "slots_used": running, "max_queue": self.max_queue,
            **self._stats.snapshot(),
            "stream_items_total": self._items, "stream_flushes_total": self._outbox.flushes,
            "expert_token_counts": self._expert_counts.tolist(),
            "workers": workers, "node_ids": [worker["node_id"] for worker in workers],
            "router_node_id": this_node_id(), "router_pid": os.getpid(),
            **self.scheduler.kv_stats(),  # paged KV cache: blocks used / total, prefix hits, preemptions
            "worker_timings": group.timings() if (group := self.group) is not None else None,
            "loading": {"processes": self.spec.num_processes, "tensors": dict(self._loading)},
        }

    async def drain(self, grace_s: float | None = None) -> dict:
        """Stop admitting (new requests get Unavailable: 503), let queued and running requests finish within
        `grace_s` (default drain_grace_s), then end the rest with the retriable error. Returns the counts."""
        self._draining = True
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self._streams)
        if left:
            self._inbox.put(("abort", f"the replica is shutting down and the request did not finish within its "
                                      f"{grace:g}s grace period; it can be retried", None))
            ended_by = time.monotonic() + 10
            while self._streams and time.monotonic() < ended_by:
                await asyncio.sleep(0.05)
        return {"ended_with_error": left}

    async def shutdown(self) -> None:
        self._stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)

    # ------------------------------------------------------------------------------ the step thread
    def _run(self) -> None:
        attempts = 0
        while not self._stop.is_set():
            if self.group is None:
                try:
                    self._build()
                    attempts = 0
                except Exception as err:  # noqa: BLE001 - reported through state/error, retried or final
                    attempts += 1
                    self.error = f"{type(err).__name__}: {err}"
                    first_start = self.restarts == 0
                    if first_start or attempts >= REBUILD_ATTEMPTS:
                        self.state = "failed"
                        self._fail_queued(self.error)
                        return
                    retry_at = time.monotonic() + min(2.0 ** attempts, 30)
                    while time.monotonic() < retry_at and not self._stop.is_set():
                        self._tend_queue()  # deadlines and the resume bound hold between attempts too
                        time.sleep(0.05)
                    continue
            try:
                self._drain_inbox(block=self.driver.idle)  # a cancel flushes its event
                if not self.driver.idle:
                    self.driver.step()  # flushes after its prefills and after its hand-out
            except GroupFailure as err:
                self._recover(err)
            except Exception:  # noqa: BLE001 - a bug must not hang callers: fail the running ones, rebuild
                self._recover(GroupFailure(traceback.format_exc(limit=3)))
            self._flush()
        if self.driver is not None:
            self.driver.abort_running("the router is shutting down")
        self._fail_queued("the router is shutting down")
        group, self.group = self.group, None
        if group is not None:
            try:
                group.shutdown()  # the workers and their placement group go with the router
            except Exception:  # noqa: BLE001 - best effort: the router is going away
                traceback.print_exc()
        self.state = "stopped"

    def _build(self) -> None:
        """Make the group in a helper thread; meanwhile this thread keeps taking requests (queue bound) and
        ending those past their deadline or the resume bound, so no caller waits on a rebuild unbounded."""
        self.state = "loading" if self.restarts == 0 else "recovering"
        self._loading = {}
        made: concurrent.futures.Future = concurrent.futures.Future()
        spec = dataclasses.replace(self.spec, progress_to=this_actor())  # the workers report loading to us

        def make() -> None:
            try:
                made.set_result(self.group_factory(spec))
            except BaseException as err:  # noqa: BLE001 - handed to the step thread
                made.set_exception(err)

        threading.Thread(target=make, name="router-build", daemon=True).start()
        while not made.done():
            if self.state == "recovering":
                self._tend_queue()
            time.sleep(0.05)
        self.group = made.result()
        self.driver = Driver(GroupEngine(self.group), self.scheduler, self._on_event, pipelined=self.pipelined,
                             keep_completions=False, on_flush=self._flush, on_step=self._stats.step_timings.step)
        self.error = None
        self.state = "ready"
        self._last_ping = time.monotonic()

    def _recover(self, err: Exception) -> None:
        """Running requests are re-admitted (they resume from prompt + tokens once the group is rebuilt; their
        callers' streams just pause); the group is torn down for `_run` to rebuild."""
        self.restarts += 1
        self.state = "recovering"
        self.error = f"shard group failed ({err}); rebuilding"
        self._outage_since = time.monotonic()
        self.driver.readmit_running()
        group, self.group = self.group, None
        try:
            group.shutdown()
        except Exception:  # noqa: BLE001 - it is being discarded anyway
            pass

    def _tend_queue(self) -> None:
        """While the group is being rebuilt: take requests (or refuse them: queue bound), end those past their
        deadline, and end with the retriable error those that waited resume_timeout_s for the group."""
        self._drain_inbox(block=False)
        for _, event in self.scheduler.expire():
            self._on_event(event)
        now = time.monotonic()
        for request in list(self.scheduler.queue):
            since = max(self._outage_since, self._stats.submitted_at(request.request_id))
            if now - since > self.settings.resume_timeout_s:
                self.scheduler.drop_queued(request)
                self._on_event(TokenEvent(request.request_id, None, None, FinishReason.ERROR,
                                          f"the shard group was not rebuilt within {self.settings.resume_timeout_s:g}s "
                                          f"({self.error}); the request can be retried"))
        self._flush()

    def _fail_queued(self, message: str) -> None:
        while self.scheduler.queue:
            request = self.scheduler.queue[0]
            self.scheduler.drop_queued(request)
            self._on_event(TokenEvent(request.request_id, None, None, FinishReason.ERROR, message))
        self._drain_inbox(block=False, refuse=message)
        self._flush()

    def _drain_inbox(self, block: bool, refuse: str | None = None) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            if block and time.monotonic() - self._last_ping > IDLE_PING_S:
                self._last_ping = time.monotonic()
                self.driver.engine.ping()  # raises GroupFailure when a worker is gone
            return
        while True:
            kind, payload, reply = item
            if kind == "submit":
                try:
                    if refuse:
                        raise Unavailable(refuse)
                    self.scheduler.submit(payload)  # what Driver.submit does without completions
                    self._stats.submitted(payload)
                    reply.set_result(None)
                except Exception as err:  # noqa: BLE001 - InvalidRequest / QueueFull go back to the caller
                    reply.set_exception(err)
            elif kind == "abort":
                if self.driver is not None:
                    self.driver.abort_running(payload)
                self._fail_queued(payload)
            elif kind == "cancel" and self.driver is not None and self.group is not None:
                self.driver.cancel(payload)
            elif kind == "cancel":  # no group: the request can only be queued
                ended = self.scheduler.cancel(payload)
                if ended is not None:
                    self._on_event(ended[1])
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _on_event(self, event: TokenEvent) -> None:
        self._stats.on_event(event)
        self._outbox.put(event)

    def _flush(self) -> None:
        """Hand the events out (once per phase of a step, not per token) and take the step's expert counts."""
        if self.driver is not None and self.driver.expert_counts is not None:
            self._expert_counts = self.driver.expert_counts.astype(np.int64)
        self._outbox.flush()


def placement_name(router_name: str) -> str:
    """The placement group of the router named `router_name`."""
    return f"{router_name}-shards"


def start_router(config: Grok1Config, settings: ReplicaConfig | None = None, *, checkpoint: str,
                 name: str | None = None, env: dict[str, str] | None = None, group_name: str | None = None,
                 **overrides):
    """Create the router as a Ray actor; its shard group starts loading at once (see `wait_ready`).

    `settings` (default: ReplicaConfig's defaults) with `overrides` (ReplicaConfig fields) applied; `env` is
    extra environment for the shard workers. Bad settings, or a mesh the model does not allow, raise here.
    A named router names its placement group `group_name` (default `placement_name(name)`); a stale group of
    that name (the replica's last router died) is removed when the new one builds its group."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    settings = ReplicaConfig.from_overrides(overrides, base=settings)
    spec = settings.group_spec(config, checkpoint, env, group_name or (placement_name(name) if name else None))
    # The router sits next to its caller (the head node or the ingress replica), not on a shard's node: it has
    # to outlive the loss of any shard's node to rebuild the group.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # With backend local the engine runs in the router's process: XLA:CPU's buffers (workers/allocator.py).
    options = allocator_actor_options(env) if settings.backend == "local" else {}
    actor = ray.remote(Router).options(name=name, num_cpus=0, max_concurrency=1000, max_restarts=0,
                                       scheduling_strategy=here, **options)
    return actor.remote(spec, settings)
