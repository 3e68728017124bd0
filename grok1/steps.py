"""The engines' jitted steps as pure functions of (params, state, inputs), and how they are jitted on a mesh.

`DecodeState` is the device state of one replica (the cache, each slot's length, the token it feeds next, its
sampling settings and its generated-token counts for the penalties), so consecutive decode steps need nothing
from the host. Every step returns the new state (donated by its caller, so the cache is updated in place) and
what the host reads. A decode step is two halves: `decode_forward` runs the layers for all slots over a bucket
of the longest live length (`kv_len`), `decode_sample` unembeds and samples only a bucket of the active rows.
grok1.engine.Engine (contiguous cache) and grok1.paged_engine.PagedEngine (a pool of blocks) drive them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from grok1 import model, token_scores
from grok1.config import Grok1Config
from grok1.limits import MAX_TOP_LOGPROBS
from grok1.paged_attention import PagedRows
from grok1.sampling import Sampled, SlotSampling, sample_scored

# Logical axes of the rows decode_sample unembeds (sharding.rules maps them): h [n, 1, D] and logits [n, V].
SAMPLE_H_AXES = ("sample_rows", "sample_steps", "embed")
SAMPLE_LOGITS_AXES = ("sample_rows", "vocab")
SAMPLED_AXES = ("sampled_rows", "top_logprobs")  # the sampler's outputs [n] and [n, K], gathered
# A prefill's unembedded h [n, T, D], replicated: every rank samples every prompt's token (prefill_step).
PREFILL_H_AXES = ("sampled_rows", "sample_steps", "embed")
# The rows' sampling settings [n] and [n, ...] (the key's words, the logit bias entries), replicated.
SETTINGS_AXES = ("sampled_rows", "setting_entries")
# decode_forward's results by ep rank [ep, rows, D]: each rank's share of h and its expert counts, then gathered.
FORWARD_SHARE_AXES = ("rank_shares", "share_rows", "embed")
FORWARD_GATHERED_AXES = ("gathered_shares", "share_rows", "embed")


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    cache: model.KVCache  # [L, B, S, Hkv, K]
    lengths: jax.Array  # [B] int32: tokens in the cache = position of the token fed next
    next_token: jax.Array  # [B] int32: the last sampled token, fed at the next decode step
    generated: jax.Array  # [B] int32: tokens sampled so far (indexes the request's random stream)
    active: jax.Array  # [B] bool
    sampling: SlotSampling
    # [B, V] int32: how often the slot's request generated each token (prompt excluded), for the penalties.
    # int32 rather than int16: the per-step update is a scatter-add, native for 32-bit words everywhere, and
    # the array is 0.5 MiB per slot at Grok-1's vocabulary, next to its 2 GiB of KV cache.
    token_counts: jax.Array


def init_state(config: Grok1Config) -> DecodeState:
    slots = config.engine.max_slots
    return DecodeState(
        cache=model.KVCache.zeros(config.model, slots, config.engine.max_len),
        lengths=jnp.zeros(slots, jnp.int32), next_token=jnp.zeros(slots, jnp.int32),
        generated=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
        sampling=SlotSampling.defaults(slots), token_counts=jnp.zeros((slots, config.model.vocab_size), jnp.int32))


def count_expert_tokens(expert_index, valid, num_experts):
    """[L, E] tokens per expert, counting only valid tokens. expert_index [L, B, T, k]."""
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [L, B, T, k, E]
    return jnp.sum(one_hot * valid[None, :, :, None, None], axis=(1, 2, 3))


def prefill_step(params, state: DecodeState, slots, tokens, lengths, sampling: SlotSampling, generated, mask_words,
                 has_mask, *, config: Grok1Config, moe_fn=model.moe, score_prompt: bool = False, place=None):
    """Run n prompts (each padded to one bucket: tokens [n, T]) into `slots` [n] and sample their next tokens
    (under the grammar masks mask_words uint32 [n, W] of the rows with has_mask [n]).

    generated [n] int32: how many of a row's last tokens its request generated before (a resumed request:
    prompt + its tokens so far; 0 for a new one). The token sampled here is then that request's token number
    `generated` (its random stream's index), and those tokens count for the penalties, as if never interrupted.
    Rows whose slot is out of range (>= max_slots) are padding: every write of theirs is dropped. With
    score_prompt (static) the logits of every position are kept and the prompt logprobs returned as well.
    place: a mesh layout's `constrain` (see decode_sample), which keeps the sampler's decisions and results
    replicated (`replicated_sampling`).
    Returns (state, (token, logprob, expert counts, top ids, top logprobs, prompt scores or None)).
    """
    rows, steps = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(steps)[None], (rows, steps))
    valid = positions < lengths[:, None]  # [n, T]
    out = model.forward(params, config.model, tokens, positions, state.cache, slots, kv_len=steps,
                        valid=valid, block=config.engine.moe_block_size,
                        logits_at=None if score_prompt else lengths - 1, moe_fn=moe_fn,
                        place_h=None if place is None else lambda h: place(h, PREFILL_H_AXES))
    if score_prompt:
        scores = token_scores.prompt_logprobs(out.logits, tokens, MAX_TOP_LOGPROBS)
        last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, V]
    else:
        scores, last = None, out.logits[:, 0]

    def put(all_slots, new):
        return all_slots.at[slots].set(new, mode="drop")

    # The slot's counts restart from this request's own generated tokens (whatever the slot's last request left).
    replayed = (valid & (positions >= (lengths - generated)[:, None])).astype(jnp.int32)  # [n, T]
    if place is not None:  # replicated, else XLA splits the scatters over the ranks and sums them (see below)
        slots = place(slots, SETTINGS_AXES[:1])
        tokens, replayed = place(tokens, SETTINGS_AXES), place(replayed, SETTINGS_AXES)
    counts = put(state.token_counts, 0).at[slots[:, None], tokens].add(replayed, mode="drop")

    def slot_counts(counts=counts):  # [n, V], gathered only when a prompt has penalties (sample_scored)
        return counts[jnp.clip(slots, 0, counts.shape[0] - 1)]

    sampled = replicated_sampling(place, last, sampling, generated, slot_counts, (mask_words, has_mask))
    token = sampled.tokens
    counts = counts.at[slots, token].add(1, mode="drop")  # [B, V]
    state = DecodeState(
        cache=out.cache, lengths=put(state.lengths, lengths), next_token=put(state.next_token, token),
        generated=put(state.generated, generated + 1), active=put(state.active, jnp.ones(rows, bool)),
        sampling=jax.tree.map(put, state.sampling, sampling), token_counts=counts)
    counts = count_expert_tokens(out.expert_index, valid, config.model.num_experts)
    return state, (token, sampled.logprobs, counts, sampled.top_ids, sampled.top_logprobs, scores)


def decode_forward(params, state: DecodeState, skip=None, tables=None, *, config: Grok1Config, kv_len: int,
                   moe_fn=model.moe, place=None, ranks: int = 1):
    """The decoder layers of one decode step for every slot: the new cache, the final hidden states h [B, D]
    and the expert counts. kv_len (static): a bucket longer than every active slot's sequence (see Engine).
    skip [B] (optional): slots that sit this step out (their experts skip them; nothing of theirs changes).
    tables [B, M]: the slots' block tables when the cache is a paged pool (grok1/paged_engine.py).
    place, ranks: a mesh layout's `constrain` and its ep size; with ep > 1 each rank holds the h of its own
    slots, and both results reach every rank in one all-gather (gathered_forward)."""
    going = state.active if skip is None else state.active & ~skip
    valid = going[:, None]
    rows = None if tables is None else PagedRows(tables, valid)
    h, cache, expert_index = model.run_layers(params, config.model, state.next_token[:, None],
                                              state.lengths[:, None], state.cache, rows, kv_len=kv_len,
                                              valid=valid, block=config.engine.moe_block_size, moe_fn=moe_fn)
    state = DecodeState(cache=cache, lengths=state.lengths, next_token=state.next_token, generated=state.generated,
                        active=state.active, sampling=state.sampling, token_counts=state.token_counts)
    if place is None or ranks == 1 or h.shape[0] % ranks:
        return state, h[:, 0], count_expert_tokens(expert_index, valid, config.model.num_experts)
    return state, *gathered_forward(h[:, 0], expert_index, valid, config.model.num_experts, place, ranks)


def gathered_forward(h, expert_index, valid, num_experts: int, place, ranks: int):
    """h [B, D] and the [L, E] expert counts on every rank, in one all-gather of each rank's share.

    The slots are split over ep, so each rank counts its own slots' experts; left to XLA, the counts' sum over
    the slots is an all-reduce of its own beside h's all-gather, and each collective between processes costs a
    round trip in which both wait for the slower. The counts travel as float32 bits in rows of h's width."""
    slots, dim = h.shape
    layers, _, steps, k = expert_index.shape
    share = slots // ranks
    choices = jax.nn.one_hot(expert_index.reshape(layers, ranks, share, steps, k), num_experts, dtype=jnp.int32)
    mine = valid.reshape(1, ranks, share, steps, 1, 1)
    counts = jnp.sum(choices * mine, axis=(2, 3, 4)).transpose(1, 0, 2)  # [ep, L, E]
    count_words = counts.reshape(ranks, -1)
    count_words = jnp.pad(count_words, ((0, 0), (0, (-count_words.shape[1]) % dim)))
    count_rows = jax.lax.bitcast_convert_type(count_words, jnp.float32).reshape(ranks, -1, dim)
    packed = jnp.concatenate([h.astype(jnp.float32).reshape(ranks, share, dim), count_rows], axis=1)
    packed = place(place(packed, FORWARD_SHARE_AXES), FORWARD_GATHERED_AXES)
    h = packed[:, :share].reshape(slots, dim).astype(h.dtype)
    words = jax.lax.bitcast_convert_type(packed[:, share:].reshape(ranks, -1), jnp.int32)
    return h, jnp.sum(words[:, : layers * num_experts], axis=0).reshape(layers, num_experts)


def logits_dtype(rows: int):
    """The dtype a decode step's logits reach the sampler in (bfloat16 values either way, see model.unembed).
    Measured on XLA:CPU (benchmarks/ab_sampler.py, grok-1-tiny and grok-1-cpu, interleaved): float32, rounded in
    one pass, is faster from 16 rows on (tiny: 26 vs 30 ms at 16 rows, 37 vs 42 at 32; grok-1-cpu 136 vs 146 at
    32), where the sampler's passes over [rows, V] dominate; at 8 rows bfloat16 logits, converted inside the
    sampler's reductions, are faster (tiny 9.6 vs 12.8 ms), and at 1 they tie."""
    return jnp.float32 if rows >= 16 else model.FPROP_DTYPE


def decode_sample(params, state: DecodeState, h, rows, mask_words=None, has_mask=None, skip=None, *,
                  config: Grok1Config, place=None):
    """Unembedding and sampling for the slots `rows` [n] only (a bucket of the active ones, padded with
    indices >= max_slots), then the state's bookkeeping for every active slot. h [B, D] from decode_forward.
    The masked variant takes the grammar masks (mask_words uint32 [B, W], has_mask [B]) and skip [B]: slots
    that sit this step out (no token, no change; `rows` leaves them out).

    place(x, axes) (optional, a mesh layout's `constrain`): lays out an array whose dimensions are named
    `axes` (SAMPLE_H_AXES, SAMPLE_LOGITS_AXES). On a mesh it splits the rows over ep, so that each rank
    unembeds and samples its share of the rows: otherwise every rank of an expert-parallel group would
    compute every row's [V] logits and the sampler's passes over them, the largest cost of a small model's
    step, ep times over.

    Returns (state, (tokens [B], logprobs [B], top ids [B, K], top logprobs [B, K])); inactive slots: -1, 0."""
    slots = state.active.shape[0]
    going = state.active if skip is None else state.active & ~skip  # [B]
    padding = rows >= slots  # [n]
    place = place or (lambda x, axes: x)
    # The row split ends at the sampler: the gather below splits its indices, and without this every later use
    # of `rows` would be split too (the [B, V] counts' scatter then partitioned into a [B, V] all-reduce).
    rows = place(rows, SAMPLED_AXES[:1])
    h_rows = place(jnp.take(h, place(rows, SAMPLE_H_AXES[:1]), axis=0, mode="clip")[:, None], SAMPLE_H_AXES)
    logits = place(model.unembed(params, h_rows, config.model, logits_dtype(rows.shape[0]))[:, 0],
                   SAMPLE_LOGITS_AXES)
    defaults = SlotSampling.defaults(rows.shape[0])

    def row_settings(all_slots, default):  # padding rows sample greedily with no penalties
        mask = padding.reshape(-1, *([1] * (default.ndim - 1)))
        return jnp.where(mask, default, jnp.take(all_slots, rows, axis=0, mode="clip"))

    # Replicated, so that every rank takes the sampler's branches (plain greedy? penalties? top logprobs?) from
    # the same settings on its own: laid out like the row-split logits, each `lax.cond` predicate became an
    # all-reduce across the group (three per greedy step, each a round trip over gloo or NCCL).
    sampling = jax.tree.map(lambda all_slots, default: place(row_settings(all_slots, default),
                                                            SETTINGS_AXES[:default.ndim]), state.sampling, defaults)
    def row_counts():  # [n, V], gathered only when a row has penalties (sample_scored)
        return jnp.take(state.token_counts, rows, axis=0, mode="clip")

    generated = jnp.take(state.generated, rows, mode="clip")
    mask = None
    if mask_words is not None:
        row_has = place(jnp.take(has_mask & going, rows, mode="clip") & ~padding, SETTINGS_AXES[:1])
        mask = (jnp.take(mask_words, rows, axis=0, mode="clip"), row_has)
    # Every rank gets every row's result before the scatters below (the same [B, V] all-reduce otherwise).
    out = gathered(sample_scored(logits, sampling, generated, row_counts, mask), place)
    row_tokens = out.tokens
    tokens = jnp.full(slots, -1, jnp.int32).at[rows].set(row_tokens, mode="drop")
    logprobs = jnp.zeros(slots, jnp.float32).at[rows].set(out.logprobs, mode="drop")
    top_ids = jnp.zeros((slots, MAX_TOP_LOGPROBS), jnp.int32).at[rows].set(out.top_ids, mode="drop")
    top_values = jnp.zeros((slots, MAX_TOP_LOGPROBS), jnp.float32).at[rows].set(out.top_logprobs, mode="drop")
    tokens = jnp.where(going, tokens, -1)
    step = going.astype(jnp.int32)
    # One entry per active row, in place: the state is donated.
    counted = jnp.where(padding, 0, jnp.take(going, rows, mode="clip").astype(jnp.int32))  # [n]
    counted = place(counted, SAMPLED_AXES[:1])  # else XLA splits the scatter below over the ranks, then sums it
    counts = state.token_counts.at[rows, row_tokens].add(counted, mode="drop")  # [B, V]
    state = DecodeState(cache=state.cache, lengths=state.lengths + step,
                        next_token=jnp.where(going, tokens, state.next_token),
                        generated=state.generated + step, active=state.active, sampling=state.sampling,
                        token_counts=counts)
    return state, (tokens, jnp.where(going, logprobs, 0.0), top_ids, top_values)


def replicated_sampling(place, logits, sampling: SlotSampling, step, counts=None, mask=None) -> Sampled:
    """sample_scored for a prefill's rows, with its inputs that decide the branches and its results replicated
    on a mesh (place: a layout's `constrain`; None: no mesh). Left to XLA's sharding propagation, a prefill
    on an ep=2 mesh computed each of the sampler's `lax.cond` predicates from split rows (7 pred[] all-reduces)
    and the [B, V] token counts' scatter from split tokens (a 16 MB all-reduce at 32 slots), found in its
    compiled program; decode_sample keeps them replicated the same way."""
    if place is None:
        return sample_scored(logits, sampling, step, counts, mask)
    sampling = jax.tree.map(lambda x: place(x, SETTINGS_AXES[:x.ndim]), sampling)
    step = place(step, SETTINGS_AXES[:1])
    if mask is not None:
        mask = (place(mask[0], SETTINGS_AXES), place(mask[1], SETTINGS_AXES[:1]))
    return gathered(sample_scored(logits, sampling, step, counts, mask), place)


def gathered(out: Sampled, place) -> Sampled:
    """The sampler's row-split results on every rank, in one all-gather: each of the four is a collective of its
    own otherwise. The float32 results travel as their int32 bits beside the token ids."""
    floats = jax.lax.bitcast_convert_type
    packed = jnp.concatenate([out.tokens[:, None], floats(out.logprobs, jnp.int32)[:, None], out.top_ids,
                              floats(out.top_logprobs, jnp.int32)], axis=1)  # [n, 2 + 2K]
    packed = place(packed, SAMPLED_AXES)
    k = out.top_ids.shape[1]
    return Sampled(packed[:, 0], floats(packed[:, 1], jnp.float32), packed[:, 2:2 + k],
                   floats(packed[:, 2 + k:], jnp.float32))


def decode_step(params, state: DecodeState, rows, *, config: Grok1Config, kv_len: int, moe_fn=model.moe):
    """One token for every active slot: decode_forward, then decode_sample of `rows` (which must list every
    active slot). The Engine jits the two halves apart, so that each compiles per its own bucket."""
    state, h, expert_counts = decode_forward(params, state, config=config, kv_len=kv_len, moe_fn=moe_fn)
    state, (tokens, logprobs, _, _) = decode_sample(params, state, h, rows, config=config)
    return state, tokens, logprobs, expert_counts


def release_slot(state: DecodeState, slot) -> DecodeState:
    # Reset the slot's sampling and counts too: a leftover top-k/top-p would make every later step sort the
    # vocabulary, leftover penalties would make it read every count.
    defaults = SlotSampling.defaults(1)
    sampling = jax.tree.map(lambda all_slots, one: all_slots.at[slot].set(one[0]), state.sampling, defaults)
    return DecodeState(cache=state.cache, lengths=state.lengths.at[slot].set(0),
                       next_token=state.next_token, generated=state.generated,
                       active=state.active.at[slot].set(False), sampling=sampling,
                       token_counts=state.token_counts.at[slot].set(0))


def on_layout(layout, params, state):
    """(the MoE function, params, state) for the layout's mesh; without one, this process's default device.

    Host (numpy) params are put on the device here, once: a numpy leaf passed to a jitted step is copied into
    a device buffer on every call, so a step would re-read the whole model first (on grok-1-cpu that was
    ~300 ms of every step, a 16-token prefill's cost ~20x over)."""
    if layout is None:
        return model.moe, jax.device_put(params), state
    return layout.moe_fn, layout.put_params(params), jax.device_put(state, layout.state_shardings(state))


def step_outputs(layout, state, replicated: int) -> dict:
    """jit's out_shardings for a step that returns the state, then `replicated` outputs (each a pytree, every
    leaf replicated: hosts read them); nothing to say without a mesh."""
    if layout is None:
        return {}
    shardings = layout.state_shardings(state)
    return {"out_shardings": (shardings, *[layout.replicated] * replicated) if replicated else shardings}


def row_shares(layout) -> int:
    """How many ranks decode_sample splits its rows over (SAMPLE_H_AXES' rows: a mesh's ep); 1 without a mesh."""
    return 1 if layout is None else layout.shape.ep


def jit_decode_halves(config: Grok1Config, layout, state, moe_fn):
    """The two jitted halves of a decode step (decode_forward per kv_len bucket, decode_sample per row bucket),
    donating the state; the paged engine takes them too, with its block tables as the cache's rows."""
    place = None if layout is None else layout.constrain
    ranks = 1 if layout is None else layout.shape.ep
    forward = jax.jit(functools.partial(decode_forward, config=config, moe_fn=moe_fn, place=place, ranks=ranks),
                      static_argnames=("kv_len",), donate_argnums=(1,), **step_outputs(layout, state, 2))
    sample_step = jax.jit(functools.partial(decode_sample, config=config, place=place), donate_argnums=(1,),
                          **step_outputs(layout, state, 1))
    return forward, sample_step
