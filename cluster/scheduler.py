"""Continuous-batching decisions, with no JAX and no Ray: a bounded FIFO queue, a slot table and, for a paged
engine, the KV blocks and a token budget per step.

The scheduler says what to do next and, given the tokens an engine produced, what each request receives and
which ones are finished. Whoever owns an engine (cluster/driver.py in one process, the router actor across the
cluster) carries those decisions out. One lifecycle (submit, record, expire, cancel, abort), two engines:

- contiguous (no `kv`): `admit()` puts queued requests into free slots, whole prompts (each slot owns
  max_len cache rows);
- paged (`kv`, a cluster.kv_blocks.BlockPool, or cluster.kv_ranks.RankedPools split over the expert axis):
  `plan()` spends each step's token budget: one decode token per
  sequence whose prefill is done, then prefill chunks of partly prefilled sequences (oldest first), then of
  queued requests (FIFO) while the budget, a free slot and free blocks last.

Paged memory: blocks are taken as the tokens that fill them are scheduled (a chunk's blocks when the chunk is,
a decode token's when it is fed), so a prefix-cache key never names a block whose KV is not computed by the
end of the step. When a sequence needs a block and none is free, the newest running sequence is preempted: its
blocks go back, it is queued again at the front and later prefilled again from its prompt and the tokens it had
generated (which it keeps, so its sampling draws continue from token number len(generated)). Every request
fits the pool alone (submit refuses others), so the oldest sequence always progresses: no deadlock.

A pool split over `ranks` (attention data parallel over the expert axis) splits the slots the same way: slot s
is on rank s // (max_slots / ranks), and its sequence's blocks are all in that rank's pool. A queued request
goes to the rank that has its prompt's longest cached prefix, else to the one with the most free blocks; a
fork to its parent's; a sequence short of blocks preempts the newest one on its own rank (only that frees
blocks it can use), so each rank's oldest sequence always progresses.
"""

from __future__ import annotations

import collections
import math
import time
from dataclasses import dataclass, field

import numpy as np

from cluster.kv_blocks import BlockPool, OutOfBlocks
from cluster.kv_ranks import RankedPools
from grok1.engine_api import (
    FinishReason,
    InvalidRequest,
    PrefillChunk,
    QueueFull,
    Request,
    StepPlan,
    TokenEvent,
    validate_request,
)

# The request types are the engine API's; re-exported for the scheduler's users.
__all__ = ["InvalidRequest", "QueueFull", "Request", "Scheduler", "TokenEvent"]


@dataclass
class _Running:
    request: Request
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # generated so far: what a resume or a recompute replays
    context: list[int] = field(default_factory=list)  # paged: what its prefill covers (prompt + replayed tokens)
    prefilled: int = 0  # paged: context tokens scheduled for prefill so far
    order: int = 0  # admission order: the newest running sequence is preempted first


class Scheduler:
    def __init__(self, max_slots: int, max_len: int, vocab_size: int, eos_token: int, max_queue: int | None = None,
                 *, kv: BlockPool | RankedPools | None = None, token_budget: int | None = None):
        """`max_queue`: requests that may wait beyond the free slots (None: no bound, for offline runs whose
        caller holds every request anyway; a router passes its ReplicaConfig.max_queue).

        `kv`: the paged engine's block pool (None: a contiguous engine). `token_budget`: tokens one paged step
        may run, decode and prefill together (None: whole prompts, no chunking); more than max_slots, so that
        every step has room for some prefill. A RankedPools `kv` splits the slots over its ranks."""
        if isinstance(kv, BlockPool):
            kv = RankedPools([kv])
        if kv is not None and max_slots % kv.ranks:
            raise ValueError(f"max_slots ({max_slots}) do not split evenly over the pool's {kv.ranks} ranks")
        if token_budget is not None and (kv is None or token_budget <= max_slots):
            raise ValueError(f"token_budget ({token_budget}) needs a paged engine and must exceed max_slots "
                             f"({max_slots})")
        self.max_slots = max_slots
        self.max_len = max_len
        self.vocab_size = vocab_size
        self.eos_token = eos_token
        self.max_queue = max_queue
        self.kv = kv
        self.slots_per_rank = max_slots if kv is None else max_slots // kv.ranks
        self.token_budget = token_budget
        self.queue: collections.deque[Request] = collections.deque()
        self.slots: list[_Running | None] = [None] * max_slots
        self.resume: dict[str, list[int]] = {}  # resumed or preempted requests (queued again): their tokens
        self.admissions = 0
        self.preemptions = 0
        self.prefill_tokens = 0  # prompt (and replayed) tokens run through a prefill
        self.cached_tokens = 0  # prompt tokens whose prefill a prefix hit or a fork saved
        self.queried_tokens = 0  # paged: context tokens looked up in the prefix cache at admission (vLLM's queries)
        self.on_admit = None  # called with each request as it gets a slot (the router times its wait)

    @classmethod
    def for_config(cls, config, max_queue: int | None = None, kv_ranks: int = 1) -> "Scheduler":
        """The scheduler of an engine made from this grok1.config.Grok1Config: paged when engine.kv_blocks is,
        with the pool split over `kv_ranks` (the mesh's ep: the paged engine's `kv_ranks`)."""
        engine, model = config.engine, config.model
        kv = RankedPools.split(engine.kv_blocks, engine.kv_block_size, kv_ranks) if engine.paged else None
        return cls(engine.max_slots, engine.max_len, model.vocab_size, model.eos_token, max_queue=max_queue, kv=kv,
                   token_budget=engine.token_budget or None)

    # ------------------------------------------------------------------------------------------ intake
    def validate(self, request: Request) -> None:
        validate_request(request, self.max_len, self.vocab_size)
        if self.kv is not None and request.grammar is not None:
            raise InvalidRequest("structured output is not available with the paged KV cache yet", "response_format")
        if self.kv is not None and getattr(request.sampling, "prompt_logprobs", False):
            raise InvalidRequest("prompt logprobs (echo with logprobs) are not available with the paged KV cache yet",
                                 "echo")
        if self.kv is not None:  # a sequence must fit the pool alone: then preemption always makes progress
            kv, prompt = self.kv, len(request.prompt)
            whole = kv.blocks_for(prompt + request.max_tokens)
            if whole > kv.per_rank:
                name = "prompt" if kv.blocks_for(prompt) > kv.per_rank else "max_tokens"
                pool = (f"the whole pool has {kv.per_rank}" if kv.ranks == 1 else
                        f"a sequence lives on one of {kv.ranks} expert-parallel ranks, whose pools have "
                        f"{kv.per_rank} each")
                raise InvalidRequest(f"prompt ({prompt} tokens) + max_tokens ({request.max_tokens}) needs {whole} "
                                     f"KV blocks of {kv.block_size} tokens; {pool}", name)

    def submit(self, request: Request) -> None:
        self.validate(request)
        free_slots = sum(running is None for running in self.slots)  # these requests are admitted at once
        if self.max_queue is not None and len(self.queue) - free_slots >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self.queue.append(request)

    # ------------------------------------------------------------------------------------------ decisions
    def admit(self) -> list[tuple[int, Request]]:
        """Queued requests to prefill now, each with the free slot it gets (FIFO, lowest slot first)."""
        if self.kv is not None:
            raise RuntimeError("a paged scheduler admits through plan()")
        admitted = []
        for slot, running in enumerate(self.slots):
            if running is None and self.queue:
                request = self.queue.popleft()
                replay = self.resume.pop(request.request_id, [])
                self.slots[slot] = _Running(request, len(replay), list(replay))
                admitted.append((slot, request))
                self._admitted(request)
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

    def record(self, slot: int, token: int, logprob: float | None) -> TokenEvent:
        """A token produced for `slot` (logprob None: its request asked for none); says whether its request is
        now finished."""
        running = self.slots[slot]
        request = running.request
        running.generated += 1
        running.tokens.append(int(token))
        reason = None
        if (token == self.eos_token and not request.ignore_eos) or token in request.stop_token_ids:
            reason = FinishReason.STOP
        elif running.generated >= request.max_tokens:
            reason = FinishReason.LENGTH
        return TokenEvent(request.request_id, int(token), None if logprob is None else float(logprob), reason)

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
        if self.kv is not None:
            self.kv.clear()  # a rebuilt group starts with an empty pool; preempted requests replay their tokens
        return ended

    def free(self, slot: int) -> None:
        running = self.slots[slot]
        if self.kv is not None and running is not None and running.request.request_id in self.kv.sequences:
            self.kv.release(running.request.request_id)
        self.slots[slot] = None

    # ------------------------------------------------------------------------------------------ paged steps
    def plan(self) -> StepPlan:
        """The next paged step: decode tokens first, then prefill chunks, within the token budget."""
        budget = math.inf if self.token_budget is None else self.token_budget
        plan = StepPlan(tables=None)
        just_preempted: set[str] = set()
        for slot in self._by_age():
            running = self.slots[slot]
            if running is not None and running.prefilled == len(running.context):
                if self._room(slot, [running.tokens[-1]], plan, just_preempted):
                    plan.decode.append(slot)
                    budget -= 1
        for slot in self._by_age():
            running = self.slots[slot]
            if running is None or running.prefilled == len(running.context) or budget <= 0:
                continue
            start = running.prefilled
            count = min(budget, len(running.context) - start)
            if self._room(slot, running.context[start:start + count], plan, just_preempted):
                plan.chunks.append(self._chunk(slot, count))
                budget -= count
        self._admit_chunks(plan, budget, just_preempted)
        plan.tables = self._tables()
        return plan

    def _admit_chunks(self, plan: StepPlan, budget: float, just_preempted: set[str]) -> None:
        forkable: dict[tuple[int, ...], str] = {}  # contexts admitted whole this step -> their sequence
        while self.queue and budget > 0 and self.queue[0].request_id not in just_preempted:
            request = self.queue[0]
            replay = self.resume.get(request.request_id, [])
            context = request.prompt + replay
            parent = forkable.get(tuple(context))
            placed = self._place(request.request_id, context, parent, min(budget, len(context)))
            if placed is None:
                return
            slot, cached, parent = placed
            self.queue.popleft()
            self.resume.pop(request.request_id, None)
            self.admissions += 1
            self.slots[slot] = _Running(request, len(replay), list(replay), context, cached, self.admissions)
            self.cached_tokens += cached
            self.queried_tokens += len(context)
            self._admitted(request)
            count = min(budget, len(context) - cached)
            # A fork recomputes the last token for its own logits; its parent writes that token's KV.
            plan.chunks.append(self._chunk(slot, count, write_from=len(context) if parent else None))
            budget -= count
            if count == len(context) - cached and parent is None:
                forkable[tuple(context)] = request.request_id

    def _place(self, seq_id: str, context: list[int], parent: str | None, new_tokens: int):
        """A free slot and blocks for a new sequence: (slot, cached tokens, the parent it forked or None), or
        None when no rank has both. A fork goes to its parent's rank when that has a free slot."""
        free = {}
        for slot, running in enumerate(self.slots):
            if running is None:
                free.setdefault(self._rank(slot), slot)  # each rank's lowest free slot
        if not free:
            return None
        if parent is not None and self.kv.rank_of(parent) in free:  # n > 1 choices: share every block
            self.kv.fork(parent, seq_id)
            return free[self.kv.rank_of(parent)], len(context) - 1, parent
        ranks = sorted(free)
        if len(ranks) > 1:  # where its prefix is cached, else where most blocks are free
            cached = self.kv.cached_prefix(context)
            ranks.sort(key=lambda rank: (-cached[rank], -self.kv.free_on(rank), rank))
        for rank in ranks:
            try:
                allocation = self.kv.allocate(seq_id, context, new_tokens=new_tokens, rank=rank)
            except OutOfBlocks:
                continue
            return free[rank], allocation.cached_tokens, None
        return None

    def _rank(self, slot: int) -> int:
        return slot // self.slots_per_rank

    def _admitted(self, request: Request) -> None:
        if self.on_admit is not None:
            self.on_admit(request)

    def _chunk(self, slot: int, count: int, write_from: int | None = None) -> PrefillChunk:
        running = self.slots[slot]
        start = running.prefilled
        running.prefilled += count
        final = running.prefilled == len(running.context)
        self.prefill_tokens += count
        return PrefillChunk(slot, tuple(running.context[start:start + count]), start, final,
                            running.request.sampling, tuple(running.tokens) if final else (),
                            start if write_from is None else write_from)

    def _room(self, slot: int, tokens: list[int], plan: StepPlan, just_preempted: set[str]) -> bool:
        """Blocks for `tokens` after the slot's sequence, preempting the newest sequences of its rank not yet in
        this step until they fit; False when that was the slot's own sequence."""
        while True:
            try:
                plan.copies += self.kv.extend(self.slots[slot].request.request_id, tokens)
                return True
            except OutOfBlocks:
                planned = set(plan.decode) | {chunk.slot for chunk in plan.chunks}
                rank = self._rank(slot)
                victim = [s for s in self._by_age() if s not in planned and self._rank(s) == rank][-1]
                self._preempt(victim, plan, just_preempted)
                if victim == slot:
                    return False

    def _preempt(self, slot: int, plan: StepPlan, just_preempted: set[str]) -> None:
        running = self.slots[slot]
        request_id = running.request.request_id
        self.kv.release(request_id)
        self.slots[slot] = None
        self.resume[request_id] = running.tokens
        self.queue.appendleft(running.request)
        just_preempted.add(request_id)
        plan.preempted.append(slot)
        self.preemptions += 1

    def _by_age(self) -> list[int]:
        running = [slot for slot, r in enumerate(self.slots) if r is not None]
        return sorted(running, key=lambda slot: self.slots[slot].order)

    def _tables(self) -> np.ndarray:
        width = self.kv.blocks_for(self.max_len)
        tables = np.full((self.max_slots, width), -1, np.int32)
        for slot, running in enumerate(self.slots):
            if running is not None:
                blocks = self.kv.block_table(running.request.request_id)
                tables[slot, : len(blocks)] = blocks
        return tables

    # ------------------------------------------------------------------------------------------ state
    def running_slots(self) -> list[int]:
        return [slot for slot, running in enumerate(self.slots) if running is not None]

    def request_in(self, slot: int) -> Request | None:
        running = self.slots[slot]
        return running.request if running else None

    @property
    def idle(self) -> bool:
        return not self.queue and not self.running_slots()

    def kv_stats(self) -> dict:
        """What /metrics exports about the paged cache (zeros for a contiguous engine)."""
        kv = self.kv
        running = self.running_slots()
        return {
            "kv_blocks_total": kv.num_blocks if kv else 0, "kv_blocks_used": kv.used_blocks if kv else 0,
            "kv_block_size": kv.block_size if kv else 0,
            "prefix_cache_queries": kv.prefix_queries if kv else 0, "prefix_cache_hits": kv.prefix_hits if kv else 0,
            "prefix_cache_queried_tokens_total": self.queried_tokens,
            "prefill_tokens_total": self.prefill_tokens, "prefill_tokens_cached_total": self.cached_tokens,
            "preemptions_total": self.preemptions, "running_sequences": len(running),
            "waiting_sequences": len(self.queue),
        }
