"""The paged engine: decode slots over a shared pool of KV blocks (grok1.paged_attention), one verb per step.

    paged_step(plan) -> (decode output, prefill output)   # a cluster/scheduler.py StepPlan, carried out
    release(slot)                                         # the slot stops decoding at once

The device state is grok1.steps.DecodeState with a PagedKV pool for its cache: memory is sized in tokens
(engine.kv_blocks x engine.kv_block_size), not slots x max_len, so max_slots can be far larger than the
contiguous engine's at the same memory. Which blocks a sequence owns, which chunk of which prompt runs when, and
who is preempted are the scheduler's decisions; this engine takes the block tables with every step.

On a mesh with ep > 1 the pool is split over ep (`kv_ranks`): rank r's devices hold blocks [r N/ep, (r + 1)
N/ep) and the slots [r B/ep, (r + 1) B/ep) whose sequences live there (cluster/kv_ranks.py places them). The
scheduler's tables name global blocks; this engine checks that each row's blocks are its rank's, turns them
into ids within the share and hands the kernel one table per rank (grok1.paged_attention), prefill chunk rows
grouped by rank, and copies per rank.

A step: the plan's block copies (copy-on-write of a shared partial block), one decode token for every active
slot (attention over a bucket of the longest live length, so a step's cost follows the live tokens) and the
prefill chunks, padded to a power of two of the longest chunk (`chunk_buckets`: a prefix hit's suffix or a token
budget's share runs at its own width). A step with both is one forward pass (`mixed_step`: each group attends
on its own, their tokens share one MoE call), so the experts' weights are read once per step: chunked prefill
costs the running streams the chunk's compute, not a second pass over the model. A chunk that ends its context
samples its sequence's next token, numbered after the tokens it had generated before a preemption, whose
counts feed the penalties; that sequence decodes from the next step on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import model
from grok1.buckets import PREFILL_BATCH_GROWTH, power_of_two_buckets, smallest_bucket
from grok1.config import Grok1Config
from grok1.engine import Engine, EngineSizes
from grok1.engine_api import Sampling, StepOutput, StepPlan
from grok1.paged_attention import PagedKV, PagedRows, bucket_kv_len, copy_pool_blocks
from grok1.sampling import SlotSampling
from grok1.slot_settings import slot_sampling
from grok1.steps import (
    PREFILL_H_AXES,
    SETTINGS_AXES,
    DecodeState,
    count_expert_tokens,
    jit_decode_halves,
    on_layout,
    release_slot,
    replicated_sampling,
    step_outputs,
)


def init_paged_state(config: Grok1Config) -> DecodeState:
    slots, engine = config.engine.max_slots, config.engine
    return DecodeState(
        cache=PagedKV.zeros(config.model, engine.kv_blocks, engine.kv_block_size),
        lengths=jnp.zeros(slots, jnp.int32), next_token=jnp.zeros(slots, jnp.int32),
        generated=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
        sampling=SlotSampling.defaults(slots), token_counts=jnp.zeros((slots, config.model.vocab_size), jnp.int32))


def copy_blocks(state: DecodeState, sources, destinations) -> DecodeState:
    """Copy whole blocks (every layer): grok1.paged_attention.copy_pool_blocks on the state's pool."""
    cache = copy_pool_blocks(state.cache, sources, destinations)
    return DecodeState(cache, state.lengths, state.next_token, state.generated, state.active, state.sampling,
                       state.token_counts)


def chunk_rows(tables, starts, lengths, write_from, steps: int):
    """The chunks' row group: positions starts + 0..T-1, valid the first `lengths` tokens of each row, and those
    at positions >= write_from writing their KV through the tables."""
    positions = starts[:, None] + jnp.arange(steps)[None]
    valid = jnp.arange(steps)[None] < lengths[:, None]
    write = valid & (positions >= write_from[:, None])
    return positions, valid, PagedRows(tables, write)


def finish_chunks(params, state: DecodeState, h, starts, lengths, final_slots, generated, counts,
                  sampling: SlotSampling, config: Grok1Config, place=None):
    """Sample the next token of the chunk rows that end their context (h [n, T, D] after the layers) and start
    their slots decoding; see paged_prefill_step. Returns (state, grok1.sampling.Sampled of the rows: the token,
    its logprob and the top logprobs, as the contiguous engine's prefill reports them). place: a mesh layout's
    `constrain`, which samples every row on every rank (the chunks' rows are split over ep by their KV's rank):
    the contiguous prefill's reasons (grok1.steps.replicated_sampling)."""
    rows = h.shape[0]
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)  # [n, 1, D]
    if place is not None:
        last = place(last, PREFILL_H_AXES)
        final_slots = place(final_slots, SETTINGS_AXES[:1])
    sampled = replicated_sampling(place, model.unembed(params, last, config.model, jnp.float32)[:, 0], sampling,
                                  generated, counts)
    token = sampled.tokens

    def put(all_slots, new):
        return all_slots.at[final_slots].set(new, mode="drop")

    counts = counts.at[jnp.arange(rows), token].add(1)
    state = DecodeState(state.cache, put(state.lengths, starts + lengths), put(state.next_token, token),
                        put(state.generated, generated + 1), put(state.active, jnp.ones(rows, bool)),
                        jax.tree.map(put, state.sampling, sampling), put(state.token_counts, counts))
    return state, sampled


def paged_prefill_step(params, state: DecodeState, tables, tokens, starts, lengths, write_from, final_slots,
                       generated, counts, sampling: SlotSampling, *, config: Grok1Config, kv_len: int,
                       moe_fn=model.moe, place=None):
    """Prefill chunks tokens [n, T] (lengths [n] of them real) at positions starts + 0..T-1 through tables
    [n, M]; tokens at positions >= write_from [n] write their KV. Rows whose final_slots [n] is a slot end
    their context there: their next token is sampled as number generated [n] with counts [n, V] (the tokens
    generated before) for the penalties, and the slot starts decoding. Others (final_slots >= max_slots: a
    middle chunk, or padding) only write KV."""
    positions, valid, rows = chunk_rows(tables, starts, lengths, write_from, tokens.shape[1])
    h, cache, expert_index = model.run_layers(params, config.model, tokens, positions, state.cache, rows,
                                              kv_len=kv_len, valid=valid, block=config.engine.moe_block_size,
                                              moe_fn=moe_fn)
    state, sampled = finish_chunks(params, _with_cache(state, cache),
                                   h, starts, lengths, final_slots, generated, counts, sampling, config, place)
    return state, sampled, count_expert_tokens(expert_index, valid, config.model.num_experts)


def mixed_step(params, state: DecodeState, decode_tables, tables, tokens, starts, lengths, write_from, final_slots,
               generated, counts, sampling: SlotSampling, *, config: Grok1Config, decode_kv_len: int, kv_len: int,
               moe_fn=model.moe, place=None):
    """One forward pass for a decode token of every active slot (through decode_tables [B, M], attending over
    decode_kv_len) and the prefill chunks (arguments as paged_prefill_step's), so the experts' weights are
    read once for both: a step that carries a chunk costs a decode step plus the chunk's own compute, not two
    passes over the model. Returns (state, h [B, D] of the decode rows for decode_sample, the chunks' Sampled
    (finish_chunks), expert counts [L, E] of both). The chunks' final slots start decoding in the returned state;
    the caller's decode_sample skips them this step (they decode from the next one)."""
    going = state.active
    decode = model.RowGroup(state.lengths[:, None], PagedRows(decode_tables, going[:, None]), decode_kv_len,
                            going[:, None])
    positions, valid, rows = chunk_rows(tables, starts, lengths, write_from, tokens.shape[1])
    chunks = model.RowGroup(positions, rows, kv_len, valid)
    (h_decode, h_chunks), cache, (decode_experts, chunk_experts) = model.run_layers_groups(
        params, config.model, (state.next_token[:, None], tokens), (decode, chunks), state.cache,
        block=config.engine.moe_block_size, moe_fn=moe_fn)
    state, sampled = finish_chunks(params, _with_cache(state, cache), h_chunks, starts, lengths, final_slots,
                                   generated, counts, sampling, config, place)
    experts = (count_expert_tokens(decode_experts, going[:, None], config.model.num_experts)
               + count_expert_tokens(chunk_experts, valid, config.model.num_experts))
    return state, h_decode[:, 0], sampled, experts


def _with_cache(state: DecodeState, cache) -> DecodeState:
    return DecodeState(cache, state.lengths, state.next_token, state.generated, state.active, state.sampling,
                       state.token_counts)


class PagedEngine(EngineSizes):
    """Owns the params and the paged device state of one model replica (layout: as grok1.engine.Engine)."""

    def __init__(self, config: Grok1Config, params, layout=None):
        if not config.engine.paged:
            raise ValueError("engine.kv_blocks is 0: this config asks for the contiguous engine")
        self.config = config
        self.layout = layout
        self.kv_ranks = 1 if layout is None else layout.shape.ep  # the pool's shares (see the module docstring)
        if config.engine.kv_blocks % self.kv_ranks or self.max_slots % self.kv_ranks:
            raise ValueError(f"kv_blocks ({config.engine.kv_blocks}) and max_slots ({self.max_slots}) must split "
                             f"evenly over ep={self.kv_ranks}")
        moe_fn, self.params, self.state = on_layout(layout, params, init_paged_state(config))
        # Decode as the contiguous engine does (its two halves: the layers for all slots, then unembedding and
        # sampling of a bucket of the active ones), with the block tables as the cache's rows.
        self._decode_forward, self._decode_sample = jit_decode_halves(config, layout, self.state, moe_fn)
        place = None if layout is None else layout.constrain
        self._prefill = jax.jit(functools.partial(paged_prefill_step, config=config, moe_fn=moe_fn, place=place),
                                static_argnames=("kv_len",), donate_argnums=(1,),
                                **step_outputs(layout, self.state, 2))
        self._mixed = jax.jit(functools.partial(mixed_step, config=config, moe_fn=moe_fn, place=place),
                              static_argnames=("decode_kv_len", "kv_len"), donate_argnums=(1,),
                              **step_outputs(layout, self.state, 3))
        keep = step_outputs(layout, self.state, 0)
        self._copy = jax.jit(copy_blocks, donate_argnums=(0,), **keep)
        self._release = jax.jit(release_slot, donate_argnums=(0,), **keep)
        self._lengths = np.zeros(self.max_slots, np.int64)  # host copy: live positions per active slot
        self._active = np.zeros(self.max_slots, bool)

    @property
    def block_size(self) -> int:
        return self.config.engine.kv_block_size

    @property
    def table_width(self) -> int:
        return -(-self.max_len // self.block_size)

    def chunk_buckets(self) -> tuple[int, ...]:
        """Widths a prefill call is padded to: powers of two from the block size, then max_len. Not the
        contiguous engine's prompt buckets: a chunk (a token budget's share, a prefix hit's suffix) is often
        far shorter than the shortest of those, or just past the longest (which then padded it to max_len)."""
        return power_of_two_buckets(min(self.block_size, self.max_len), self.max_len)

    def by_rank(self, tables: np.ndarray) -> np.ndarray:
        """Global block tables [rows, M], rows in rank order, as the kernel takes them: unchanged on one rank,
        else [R, rows/R, M] of ids within each rank's share. A row naming another rank's block is refused: its
        device does not hold that block, and the id would read or overwrite another sequence's KV there."""
        ranks = self.kv_ranks
        if ranks == 1:
            return tables
        share, group = self.config.engine.kv_blocks // ranks, tables.shape[0] // ranks
        used = tables >= 0
        foreign = used & (tables // share != (np.arange(tables.shape[0]) // group)[:, None])
        if foreign.any():
            row = int(np.flatnonzero(foreign.any(axis=1))[0])
            raise ValueError(f"block table row {row} (rank {row // group}) names blocks outside its rank's share "
                             f"[{row // group * share}, {(row // group + 1) * share})")
        return np.where(used, tables % share, -1).astype(np.int32).reshape(ranks, group, tables.shape[1])

    def kv_len_for(self, live: int) -> int:
        return bucket_kv_len(live, self.block_size, self.table_width * self.block_size)

    def paged_step(self, plan: StepPlan) -> tuple[StepOutput | None, StepOutput | None]:
        if plan.copies:
            self._copy_blocks(plan.copies)
        if plan.decode:
            assert set(plan.decode) == set(np.flatnonzero(self._active)), "the plan's decode slots vs the engine's"
        if plan.decode and plan.chunks:
            return self._mixed_step(plan)
        decoded = self._decode_step(plan) if plan.decode else None
        prefilled = self._prefill_chunks(plan) if plan.chunks else None
        return decoded, prefilled

    def _copy_blocks(self, copies) -> None:
        ranks, share = self.kv_ranks, self.config.engine.kv_blocks // self.kv_ranks
        if any(s // share != d // share for s, d in copies):
            raise ValueError(f"a block copy across ranks' shares: {copies}")
        per_rank = [[(s % share, d % share) for s, d in copies if s // share == r] for r in range(ranks)]
        size = 1 << (max(map(len, per_rank)) - 1).bit_length()  # a power of two of copies: few compiles
        sources = np.zeros((ranks, size), np.int32)
        destinations = np.full((ranks, size), share, np.int32)  # past the share: padding, dropped
        for rank, pairs in enumerate(per_rank):
            if pairs:
                sources[rank, : len(pairs)], destinations[rank, : len(pairs)] = zip(*pairs)
        if ranks == 1:  # one pool: ids are pool ids
            sources, destinations = sources[0], destinations[0]
        self.state = self._copy(self.state, sources, destinations)

    def _decode_rows(self) -> tuple[np.ndarray, int]:
        """(a power-of-two bucket of the active slots, padded with max_slots; the decode kv_len bucket)."""
        active = np.flatnonzero(self._active)
        rows = np.full(smallest_bucket(len(active), self.decode_row_buckets()), self.max_slots, np.int32)
        rows[: len(active)] = active  # the rest is padding: out of range
        return rows, self.kv_len_for(int(self._lengths[self._active].max()) + 1)

    def _decode_step(self, plan: StepPlan) -> StepOutput:
        rows, kv_len = self._decode_rows()
        self.state, h, counts = self._decode_forward(self.params, self.state, None, self.by_rank(plan.tables),
                                                     kv_len=kv_len)
        return self._sample_decoded(h, rows, counts, np.zeros(self.max_slots, bool))

    def _sample_decoded(self, h, rows, expert_counts, skip) -> StepOutput:
        self.state, (tokens, logprobs, top_ids, top_logprobs) = self._decode_sample(
            self.params, self.state, h, rows, None, None, skip)
        self._lengths[self._active & ~skip] += 1
        return StepOutput(*(np.asarray(x) for x in (tokens, logprobs, expert_counts, top_ids, top_logprobs)))

    def _chunk_inputs(self, plan: StepPlan) -> tuple[tuple, int, list[int]]:
        """The prefill chunks as one call's arrays (tables, tokens, starts, lengths, write_from, final_slots,
        generated, counts, sampling), padded to the longest chunk's bucket, their kv_len bucket, and each chunk's
        row. Rows are kv_ranks equal groups in rank order (a chunk in its slot's rank's group)."""
        vocab = self.config.model.vocab_size
        longest = max(len(chunk.tokens) for chunk in plan.chunks)
        width = smallest_bucket(longest, self.chunk_buckets())
        slots_per_rank = self.max_slots // self.kv_ranks
        chunk_ranks = [chunk.slot // slots_per_rank for chunk in plan.chunks]
        group = 1
        while group < max(chunk_ranks.count(rank) for rank in set(chunk_ranks)):
            group *= PREFILL_BATCH_GROWTH
        rows = group * self.kv_ranks
        row_of = [rank * group + chunk_ranks[:i].count(rank) for i, rank in enumerate(chunk_ranks)]
        tokens = np.zeros((rows, width), np.int32)
        starts, lengths = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        write_from = np.zeros(rows, np.int32)
        final_slots = np.full(rows, self.max_slots, np.int32)
        generated = np.zeros(rows, np.int32)
        counts = np.zeros((rows, vocab), np.int32)
        tables = np.full((rows, self.table_width), -1, np.int32)
        samplings = [Sampling()] * rows
        for row, chunk in zip(row_of, plan.chunks):
            tokens[row, : len(chunk.tokens)] = chunk.tokens
            starts[row], lengths[row], write_from[row] = chunk.start, len(chunk.tokens), chunk.write_from
            tables[row] = plan.tables[chunk.slot]
            if chunk.final:
                final_slots[row], generated[row], samplings[row] = chunk.slot, len(chunk.generated), chunk.sampling
                np.add.at(counts[row], np.asarray(chunk.generated, np.int64), 1)
        kv_len = self.kv_len_for(int((starts + lengths).max()))
        inputs = (self.by_rank(tables), tokens, starts, lengths, write_from, final_slots, generated, counts,
                  slot_sampling(samplings, vocab))
        return inputs, kv_len, row_of

    def _prefill_chunks(self, plan: StepPlan) -> StepOutput:
        """Every chunk in one call, padded to the longest one's bucket (a fork's chunk reads what its parent's
        chunk writes in the same call: each layer writes every row's KV before any row reads)."""
        inputs, kv_len, row_of = self._chunk_inputs(plan)
        self.state, sampled, expert_counts = self._prefill(self.params, self.state, *inputs, kv_len=kv_len)
        return self._started(plan, row_of, sampled, expert_counts)

    def _mixed_step(self, plan: StepPlan) -> tuple[StepOutput, StepOutput]:
        """Decode and prefill chunks in one forward pass (mixed_step); the decode half's counts are the step's
        (both groups'), the prefill half reports zeros, so /metrics counts every token once."""
        rows, decode_kv_len = self._decode_rows()
        inputs, kv_len, row_of = self._chunk_inputs(plan)
        self.state, h, sampled, expert_counts = self._mixed(
            self.params, self.state, self.by_rank(plan.tables), *inputs, decode_kv_len=decode_kv_len, kv_len=kv_len)
        starting = np.zeros(self.max_slots, bool)
        starting[[chunk.slot for chunk in plan.chunks if chunk.final]] = True
        decoded = self._sample_decoded(h, rows, expert_counts, starting)
        return decoded, self._started(plan, row_of, sampled, np.zeros_like(decoded.expert_counts))

    def _started(self, plan: StepPlan, row_of, sampled, expert_counts) -> StepOutput:
        """The prefill half's output (the final chunks' tokens, in the plan's order); the slots whose context
        the chunks completed start decoding."""
        finals = [row for row, chunk in zip(row_of, plan.chunks) if chunk.final]
        for chunk in plan.chunks:
            if chunk.final:
                self._active[chunk.slot], self._lengths[chunk.slot] = True, chunk.start + len(chunk.tokens)
        tokens, logprobs, top_ids, top_logprobs = (np.asarray(x)[finals] for x in sampled)
        return StepOutput(tokens, logprobs, np.asarray(expert_counts), top_ids, top_logprobs)

    def release(self, slot: int) -> None:
        self.state = self._release(self.state, jnp.int32(slot))
        self._active[slot], self._lengths[slot] = False, 0

    def warmup(self) -> None:
        """Compile the decode step for every kv_len bucket now (with no slot active nothing is written); prefill
        shapes compile on first use."""
        tables = self.by_rank(np.full((self.max_slots, self.table_width), -1, np.int32))
        limit = self.table_width * self.block_size
        kv_len = self.kv_len_for(1)
        while True:
            self.state = self._decode_forward(self.params, self.state, None, tables, kv_len=kv_len)[0]
            if kv_len >= limit:
                break
            kv_len = self.kv_len_for(kv_len + 1)

    def check_health(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.state.lengths)))

    def shutdown(self) -> None:
        self.state = None
        self.params = None


def make_engine(config: Grok1Config, params, layout=None):
    """The engine the config asks for: paged when engine.kv_blocks is set, else the contiguous one."""
    return PagedEngine(config, params, layout) if config.engine.paged else Engine(config, params, layout)
