"""The single-process engine: fixed decode slots over a preallocated KV cache, and three verbs.

    prefill(slot, prompt, sampling) -> first token   # runs the prompt into a free slot's cache rows
    prefill_many(slots, prompts, samplings)           # the same for a burst: one call per bucket
    decode(masks?, skip?)           -> one token per slot (inactive slots give -1)
    release(slot)                                     # the slot stops decoding at once

Each step also returns the top MAX_TOP_LOGPROBS tokens' logprobs of every slot (computed only when a slot
asks), and a prefill whose prompts ask for it their prompt logprobs (a separate compile per bucket, run one
prompt at a time: its logits cover every position). Grammar masks (grok1/grammar.py's bitmasks) are inputs
of the step that needs them: prefill always takes them (zeros when none), decode has a masked variant
(with `skip`: slots that sit the step out), so a batch without grammars moves no mask at all.

The device state (`DecodeState`) holds the cache, each slot's length, the token it feeds next, its
sampling settings and how often it generated each token (for the penalties), so consecutive decode steps
need nothing from the host: sampled tokens stay on the device. The steps are jitted once per shape and donate
the state, so the cache is updated in place. Work follows what is live, not the engine's size: a decode step
runs the layers for all slots over a power-of-two bucket of the longest live sequence (`kv_len`, not
`max_len`), then unembeds and samples only a power-of-two bucket of the active slots, two jitted halves
compiled per bucket (prefill: one per prompt bucket and batch size). Which
request owns which slot, and when it ends, is the scheduler's business (cluster/scheduler.py), not this
module's.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import model, token_scores
from grok1.config import Grok1Config
from grok1.engine_api import PromptLogprobs, Sampling, StepOutput
from grok1.limits import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, PENALTY_RANGE
from grok1.paged_attention import PagedRows
from grok1.sampling import LogitPenalties, SlotSampling, sample_scored, seed_key_data


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


KV_BUCKET_MIN = 16  # the shortest cache length a decode step attends over


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... while below largest, then largest."""
    sizes = [smallest]
    while sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes) if sizes[-1] == largest else (*sizes, largest)


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    return next(size for size in buckets if size >= n)


PREFILL_BATCH_GROWTH = 4  # prefill calls take 1, 4, 16, ... prompts of a bucket (each size is one compile)


# The scheduler refuses values outside grok1.limits; the conversion clips instead, so that no request's
# settings can raise inside a shard worker (where it would fail the whole group).


def _finite_clipped(value: float, bounds: tuple[float, float]) -> float:
    value = float(value)
    return 0.0 if math.isnan(value) else min(max(value, bounds[0]), bounds[1])


def _bias_row(logit_bias, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 / values f32 [MAX_LOGIT_BIAS]: ids outside the vocabulary are dropped, a repeated id keeps its
    last bias (as a JSON object would), entries past MAX_LOGIT_BIAS are dropped; padding is id 0, bias 0."""
    biases = {token: _finite_clipped(bias, LOGIT_BIAS_RANGE) for token, bias in logit_bias if 0 <= token < vocab}
    ids, values = np.zeros(MAX_LOGIT_BIAS, np.int32), np.zeros(MAX_LOGIT_BIAS, np.float32)
    kept = list(biases.items())[:MAX_LOGIT_BIAS]
    ids[: len(kept)] = [token for token, _ in kept]
    values[: len(kept)] = [bias for _, bias in kept]
    return ids, values


def _slot_sampling(samplings: list[Sampling], vocab: int) -> SlotSampling:
    """The requests' settings as SlotSampling arrays. Total: any seed (Python int), top_k clamped into
    [0, vocab] before the int32 conversion, penalties and biases clipped to OpenAI's ranges."""
    bias = [_bias_row(s.logit_bias, vocab) for s in samplings]
    penalties = LogitPenalties(
        np.asarray([_finite_clipped(s.presence_penalty, PENALTY_RANGE) for s in samplings], np.float32),
        np.asarray([_finite_clipped(s.frequency_penalty, PENALTY_RANGE) for s in samplings], np.float32),
        np.stack([ids for ids, _ in bias]), np.stack([values for _, values in bias]))
    return SlotSampling(np.asarray([s.temperature for s in samplings], np.float32),
                        np.asarray([s.top_p for s in samplings], np.float32),
                        np.asarray([min(max(int(s.top_k), 0), vocab) for s in samplings], np.int32),
                        np.stack([seed_key_data(s.seed) for s in samplings]), penalties,
                        np.asarray([min(max(int(getattr(s, "top_logprobs", 0)), 0), MAX_TOP_LOGPROBS)
                                    for s in samplings], np.int32))


def mask_words(vocab: int) -> int:
    return -(-vocab // token_scores.MASK_WORD_BITS)


def init_state(config: Grok1Config) -> DecodeState:
    slots = config.engine.max_slots
    return DecodeState(
        cache=model.KVCache.zeros(config.model, slots, config.engine.max_len),
        lengths=jnp.zeros(slots, jnp.int32), next_token=jnp.zeros(slots, jnp.int32),
        generated=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
        sampling=SlotSampling.defaults(slots), token_counts=jnp.zeros((slots, config.model.vocab_size), jnp.int32))


def _expert_counts(expert_index, valid, num_experts):
    """[L, E] tokens per expert, counting only valid tokens. expert_index [L, B, T, k]."""
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [L, B, T, k, E]
    return jnp.sum(one_hot * valid[None, :, :, None, None], axis=(1, 2, 3))


def prefill_step(params, state: DecodeState, slots, tokens, lengths, sampling: SlotSampling, generated, mask_words,
                 has_mask, *, config: Grok1Config, moe_fn=model.moe, score_prompt: bool = False):
    """Run n prompts (each padded to one bucket: tokens [n, T]) into `slots` [n] and sample their next tokens
    (under the grammar masks mask_words uint32 [n, W] of the rows with has_mask [n]).

    generated [n] int32: how many of a row's last tokens its request generated before (a resumed request:
    prompt + its tokens so far; 0 for a new one). The token sampled here is then that request's token number
    `generated` (its random stream's index), and those tokens count for the penalties, as if never interrupted.
    Rows whose slot is out of range (>= max_slots) are padding: every write of theirs is dropped. With
    score_prompt (static) the logits of every position are kept and the prompt logprobs returned as well.
    Returns (state, (token, logprob, expert counts, top ids, top logprobs, prompt scores or None)).
    """
    rows, steps = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(steps)[None], (rows, steps))
    valid = positions < lengths[:, None]  # [n, T]
    out = model.forward(params, config.model, tokens, positions, state.cache, slots, kv_len=steps,
                        valid=valid, block=config.engine.moe_block_size,
                        logits_at=None if score_prompt else lengths - 1, moe_fn=moe_fn)
    if score_prompt:
        scores = token_scores.prompt_logprobs(out.logits, tokens, MAX_TOP_LOGPROBS)
        last = jnp.take_along_axis(out.logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [n, V]
    else:
        scores, last = None, out.logits[:, 0]

    def put(all_slots, new):
        return all_slots.at[slots].set(new, mode="drop")

    # The slot's counts restart from this request's own generated tokens (whatever the slot's last request left).
    replayed = valid & (positions >= (lengths - generated)[:, None])  # [n, T]
    counts = put(state.token_counts, 0).at[slots[:, None], tokens].add(replayed.astype(jnp.int32), mode="drop")
    sampled = sample_scored(last, sampling, generated, counts[jnp.clip(slots, 0, counts.shape[0] - 1)],
                            (mask_words, has_mask))
    token = sampled.tokens
    counts = counts.at[slots, token].add(1, mode="drop")  # [B, V]
    state = DecodeState(
        cache=out.cache, lengths=put(state.lengths, lengths), next_token=put(state.next_token, token),
        generated=put(state.generated, generated + 1), active=put(state.active, jnp.ones(rows, bool)),
        sampling=jax.tree.map(put, state.sampling, sampling), token_counts=counts)
    counts = _expert_counts(out.expert_index, valid, config.model.num_experts)
    return state, (token, sampled.logprobs, counts, sampled.top_ids, sampled.top_logprobs, scores)


def decode_forward(params, state: DecodeState, skip=None, tables=None, *, config: Grok1Config, kv_len: int,
                   moe_fn=model.moe):
    """The decoder layers of one decode step for every slot: the new cache, the final hidden states h [B, D]
    and the expert counts. kv_len (static): a bucket longer than every active slot's sequence (see Engine).
    skip [B] (optional): slots that sit this step out (their experts skip them; nothing of theirs changes).
    tables [B, M]: the slots' block tables when the cache is a paged pool (grok1/paged_engine.py)."""
    going = state.active if skip is None else state.active & ~skip
    valid = going[:, None]
    rows = None if tables is None else PagedRows(tables, valid)
    h, cache, expert_index = model.run_layers(params, config.model, state.next_token[:, None],
                                              state.lengths[:, None], state.cache, rows, kv_len=kv_len,
                                              valid=valid, block=config.engine.moe_block_size, moe_fn=moe_fn)
    state = DecodeState(cache=cache, lengths=state.lengths, next_token=state.next_token, generated=state.generated,
                        active=state.active, sampling=state.sampling, token_counts=state.token_counts)
    return state, h[:, 0], _expert_counts(expert_index, valid, config.model.num_experts)


def decode_sample(params, state: DecodeState, h, rows, mask_words=None, has_mask=None, skip=None, *,
                  config: Grok1Config):
    """Unembedding and sampling for the slots `rows` [n] only (a bucket of the active ones, padded with
    indices >= max_slots), then the state's bookkeeping for every active slot. h [B, D] from decode_forward.
    The masked variant takes the grammar masks (mask_words uint32 [B, W], has_mask [B]) and skip [B]: slots
    that sit this step out (no token, no change; `rows` leaves them out).

    Returns (state, (tokens [B], logprobs [B], top ids [B, K], top logprobs [B, K])); inactive slots: -1, 0."""
    slots = state.active.shape[0]
    going = state.active if skip is None else state.active & ~skip  # [B]
    padding = rows >= slots  # [n]
    logits = model.unembed(params, jnp.take(h, rows, axis=0, mode="clip")[:, None], config.model)[:, 0]
    defaults = SlotSampling.defaults(rows.shape[0])

    def row_settings(all_slots, default):  # padding rows sample greedily with no penalties
        mask = padding.reshape(-1, *([1] * (default.ndim - 1)))
        return jnp.where(mask, default, jnp.take(all_slots, rows, axis=0, mode="clip"))

    sampling = jax.tree.map(row_settings, state.sampling, defaults)
    counts = jnp.take(state.token_counts, rows, axis=0, mode="clip")  # [n, V]
    generated = jnp.take(state.generated, rows, mode="clip")
    mask = None
    if mask_words is not None:
        row_has = jnp.take(has_mask & going, rows, mode="clip") & ~padding
        mask = (jnp.take(mask_words, rows, axis=0, mode="clip"), row_has)
    out = sample_scored(logits, sampling, generated, counts, mask)
    row_tokens = out.tokens
    tokens = jnp.full(slots, -1, jnp.int32).at[rows].set(row_tokens, mode="drop")
    logprobs = jnp.zeros(slots, jnp.float32).at[rows].set(out.logprobs, mode="drop")
    top_ids = jnp.zeros((slots, MAX_TOP_LOGPROBS), jnp.int32).at[rows].set(out.top_ids, mode="drop")
    top_values = jnp.zeros((slots, MAX_TOP_LOGPROBS), jnp.float32).at[rows].set(out.top_logprobs, mode="drop")
    tokens = jnp.where(going, tokens, -1)
    step = going.astype(jnp.int32)
    # One entry per active row, in place: the state is donated.
    counted = jnp.where(padding, 0, jnp.take(going, rows, mode="clip").astype(jnp.int32))  # [n]
    counts = state.token_counts.at[rows, row_tokens].add(counted, mode="drop")  # [B, V]
    state = DecodeState(cache=state.cache, lengths=state.lengths + step,
                        next_token=jnp.where(going, tokens, state.next_token),
                        generated=state.generated + step, active=state.active, sampling=state.sampling,
                        token_counts=counts)
    return state, (tokens, jnp.where(going, logprobs, 0.0), top_ids, top_values)


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


def _prompt_scores(scores, row: int, length: int, k: int) -> PromptLogprobs:
    """Row `row` of prefill_step's prompt scores as host values: the first token has none."""
    chosen, ids, values = (np.asarray(x)[row] for x in scores)
    k = min(max(int(k), 0), MAX_TOP_LOGPROBS)
    return PromptLogprobs([None] + chosen[1:length].tolist(),
                          [()] + [tuple(zip(ids[t, :k].tolist(), values[t, :k].tolist())) for t in range(1, length)])


class Engine:
    """Owns the params and the device state of one model replica.

    `layout` (sharding.layout.MeshLayout) spreads them over a device mesh, possibly spanning processes;
    without it everything lives on this process's default device.
    """

    def __init__(self, config: Grok1Config, params, layout=None):
        self.config = config
        self.layout = layout
        moe_fn = model.moe if layout is None else layout.moe_fn
        state = init_state(config)
        if layout is not None:
            params = layout.put_params(params)
            state = jax.device_put(state, layout.state_shardings(state))
        self.params = params
        self.state = state
        keep = {} if layout is None else {"out_shardings": layout.state_shardings(state)}
        with_outputs = {} if layout is None else {  # the step's outputs (a tuple) all replicated
            "out_shardings": (layout.state_shardings(state), layout.replicated)}
        self._prefill = jax.jit(functools.partial(prefill_step, config=config, moe_fn=moe_fn),
                                donate_argnums=(1,), **with_outputs)
        self._prefill_scored = jax.jit(functools.partial(prefill_step, config=config, moe_fn=moe_fn,
                                                         score_prompt=True), donate_argnums=(1,), **with_outputs)
        forward_outputs = {} if layout is None else {
            "out_shardings": (layout.state_shardings(state), layout.replicated, layout.replicated)}
        self._decode_forward = jax.jit(functools.partial(decode_forward, config=config, moe_fn=moe_fn),
                                       static_argnames=("kv_len",), donate_argnums=(1,), **forward_outputs)
        self._decode_sample = jax.jit(functools.partial(decode_sample, config=config), donate_argnums=(1,),
                                      **with_outputs)
        self._words = mask_words(config.model.vocab_size)
        self._release = jax.jit(release_slot, donate_argnums=(0,), **keep)
        # The host's copy of which slots decode and how long their sequences are: every change comes from a call
        # of this class (prefill, decode, release), so it is exact, and equal in every process of a mesh.
        self._active = np.zeros(self.max_slots, bool)
        self._lengths = np.zeros(self.max_slots, np.int64)

    @property
    def max_slots(self) -> int:
        return self.config.engine.max_slots

    @property
    def max_len(self) -> int:
        return self.config.engine.max_len

    def decode_row_buckets(self) -> tuple[int, ...]:
        """Row counts the unembedding and sampling of a decode step compile for: powers of two, then max_slots."""
        return power_of_two_buckets(1, self.max_slots)

    def decode_kv_buckets(self) -> tuple[int, ...]:
        """Cache lengths a decode step attends over (one compile each): powers of two from KV_BUCKET_MIN, then
        max_len."""
        return power_of_two_buckets(min(KV_BUCKET_MIN, self.max_len), self.max_len)

    def bucket_for(self, length: int) -> int:
        for bucket in self.config.engine.buckets_up_to_max_len():
            if length <= bucket:
                return bucket
        raise ValueError(f"prompt of {length} tokens exceeds the engine's max_len {self.max_len}")

    def prefill(self, slot: int, prompt: list[int], sampling: Sampling) -> StepOutput:
        return self.prefill_many([slot], [prompt], [sampling])

    def prefill_batches(self, bucket: int) -> tuple[int, ...]:
        """Prompt counts one prefill call of this bucket takes: powers of PREFILL_BATCH_GROWTH, as long as the
        call's tokens stay within the longest bucket (the prefill whose activations the planner counts on)."""
        longest = self.config.engine.buckets_up_to_max_len()[-1]
        sizes = [1]
        while sizes[-1] * PREFILL_BATCH_GROWTH * bucket <= longest and sizes[-1] < self.max_slots:
            sizes.append(sizes[-1] * PREFILL_BATCH_GROWTH)
        return tuple(sizes)

    def prefill_many(self, slots: list[int], prompts: list[list[int]], samplings: list[Sampling],
                     generated: list[int] | None = None, masks: list | None = None) -> StepOutput:
        """Prefill several prompts into their slots: one call per bucket (and per batch that fits), so that a
        burst of admissions costs a few steps, not one per request. Outputs come back in order.
        `generated[i]`: how many of prompt i's last tokens are its request's own (a resumed request; see
        prefill_step). masks: per prompt, its grammar's bitmask for the first token, or None."""
        generated = [0] * len(prompts) if generated is None else generated
        for prompt in prompts:
            if not 0 < len(prompt) < self.max_len:
                raise ValueError(f"prompt length {len(prompt)} must be in [1, {self.max_len})")
        masks = masks or [None] * len(prompts)
        n = len(slots)
        tokens, logprobs = np.zeros(n, np.int32), np.zeros(n, np.float32)
        top_ids = np.zeros((n, MAX_TOP_LOGPROBS), np.int32)
        top_values = np.zeros((n, MAX_TOP_LOGPROBS), np.float32)
        scored: list = [None] * n
        counts = None
        groups: dict[tuple[int, bool], list[int]] = {}  # (bucket, scores the prompt) -> prompt indices
        for index, prompt in enumerate(prompts):
            wants = bool(getattr(samplings[index], "prompt_logprobs", False))
            groups.setdefault((self.bucket_for(len(prompt)), wants), []).append(index)
        for (bucket, wants), indices in groups.items():
            sizes = (1,) if wants else self.prefill_batches(bucket)  # logits at every position: one at a time
            while indices:
                chunk, indices = indices[: sizes[-1]], indices[sizes[-1]:]
                size = next(k for k in sizes if k >= len(chunk))
                batch_tokens = np.zeros((size, bucket), np.int32)
                batch_slots = np.full(size, self.max_slots, np.int32)  # out of range: padding rows write nothing
                lengths = np.zeros(size, np.int32)
                replayed = np.zeros(size, np.int32)
                words = np.zeros((size, self._words), np.uint32)
                has = np.zeros(size, bool)
                chosen = [samplings[i] for i in chunk] + [Sampling()] * (size - len(chunk))
                for row, index in enumerate(chunk):
                    batch_tokens[row, : len(prompts[index])] = prompts[index]
                    batch_slots[row] = slots[index]
                    lengths[row] = len(prompts[index])
                    replayed[row] = generated[index]
                    if masks[index] is not None:
                        words[row], has[row] = masks[index], True
                step = self._prefill_scored if wants else self._prefill
                self.state, out = step(self.params, self.state, batch_slots, batch_tokens, lengths,
                                       _slot_sampling(chosen, self.config.model.vocab_size), replayed, words, has)
                for index in chunk:
                    self._active[slots[index]], self._lengths[slots[index]] = True, len(prompts[index])
                token, logprob, step_counts, ids, values, scores = out
                k = len(chunk)
                tokens[chunk], logprobs[chunk] = np.asarray(token)[:k], np.asarray(logprob)[:k]
                top_ids[chunk], top_values[chunk] = np.asarray(ids)[:k], np.asarray(values)[:k]
                counts = np.asarray(step_counts) if counts is None else counts + np.asarray(step_counts)
                if scores is not None:
                    for row, index in enumerate(chunk):
                        scored[index] = _prompt_scores(scores, row, len(prompts[index]),
                                                       samplings[index].top_logprobs)
        return StepOutput(tokens, logprobs, counts, top_ids, top_values,
                          scored if any(s is not None for s in scored) else None)

    def decode(self, masks: dict | None = None, skip=()) -> StepOutput:
        return self.decode_finish(self.decode_start(masks, skip))

    def decode_start(self, masks: dict | None = None, skip=()):
        """Dispatch a decode step and return at once (JAX runs it asynchronously); read it with decode_finish.
        masks {slot: bitmask}: the grammar slots' masks for this step; skip: slots that sit it out."""
        going = self._active.copy()
        going[list(skip)] = False
        active = np.flatnonzero(going)
        rows = np.full(_bucket(len(active), self.decode_row_buckets()), self.max_slots, np.int32)
        rows[: len(active)] = active  # the rest is padding: out of range
        # The token fed now sits at position lengths[slot]: attend over a bucket that holds it.
        longest = int(self._lengths[active].max()) + 1 if len(active) else 1
        kv_len = _bucket(min(longest, self.max_len), self.decode_kv_buckets())
        if not masks and not len(skip):
            return self.decode_buckets(rows, kv_len)
        words = np.zeros((self.max_slots, self._words), np.uint32)
        has = np.zeros(self.max_slots, bool)
        for slot, mask in (masks or {}).items():
            words[slot], has[slot] = mask, True
        return self.decode_buckets(rows, kv_len, (words, has, ~going & self._active))

    def decode_buckets(self, rows: np.ndarray, kv_len: int, masked=None):
        """decode_start over given buckets: rows [n] (every decoding slot, then padding >= max_slots), kv_len
        longer than every active sequence. decode_start picks the smallest; benchmarks compare wider ones.
        masked: (mask words [B, W], has a mask [B], skip [B]) for the masked variant."""
        skip = None if masked is None else masked[2]
        self.state, h, counts = self._decode_forward(self.params, self.state, skip, kv_len=kv_len)
        self.state, (tokens, logprobs, top_ids, top_values) = self._decode_sample(
            self.params, self.state, h, rows, *(masked or ()))
        self._lengths[self._active if skip is None else self._active & ~skip] += 1
        return tokens, logprobs, counts, top_ids, top_values

    @staticmethod
    def decode_finish(handle) -> StepOutput:
        return StepOutput(*(np.asarray(x) for x in handle))

    def release(self, slot: int) -> None:
        self.state = self._release(self.state, jnp.int32(slot))
        self._active[slot], self._lengths[slot] = False, 0

    def warmup(self) -> None:
        """Compile the decode step and every prefill bucket now rather than on the first requests."""
        for bucket in self.config.engine.buckets_up_to_max_len():
            for size in self.prefill_batches(bucket):
                prompt = [1] * min(bucket, self.max_len - 1)
                self.prefill_many(list(range(size)), [prompt] * size, [Sampling()] * size)
                for slot in range(size):
                    self.release(slot)
        for kv_len in self.decode_kv_buckets():  # every decode bucket, with no slot active (nothing changes)
            self.state = self._decode_forward(self.params, self.state, kv_len=kv_len)[0]
        for rows in self.decode_row_buckets():
            self.decode_buckets(np.full(rows, self.max_slots, np.int32), self.decode_kv_buckets()[0])
        # The masked variant (requests under a grammar) at the smallest buckets; others compile on first use.
        none = np.zeros(self.max_slots, bool)
        self.decode_buckets(np.full(1, self.max_slots, np.int32), self.decode_kv_buckets()[0],
                            (np.zeros((self.max_slots, self._words), np.uint32), none, none))

    def check_health(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.state.lengths)))

    def shutdown(self) -> None:
        self.state = None
        self.params = None
