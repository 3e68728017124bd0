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

The device state and the jitted steps are grok1.steps' pure functions; this class keeps the host's side: which
slots decode and how long they are, the buckets each call is padded to (grok1.buckets), and the requests'
settings as the step's arrays (grok1.slot_settings). Which request owns which slot, and when it ends, is the
scheduler's business (cluster/scheduler.py), not this module's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from grok1.buckets import KV_BUCKET_MIN, PREFILL_BATCH_GROWTH, decode_row_buckets, power_of_two_buckets, smallest_bucket
from grok1.config import Grok1Config
from grok1.engine_api import PromptLogprobs, Sampling, StepOutput
from grok1.grammar import mask_words
from grok1.limits import MAX_TOP_LOGPROBS
from grok1.slot_settings import slot_sampling
from grok1.steps import init_state, jit_decode_halves, on_layout, prefill_step, release_slot, row_shares, step_outputs


def _prompt_scores(scores, row: int, length: int, k: int) -> PromptLogprobs:
    """Row `row` of prefill_step's prompt scores as host values: the first token has none."""
    chosen, ids, values = (np.asarray(x)[row] for x in scores)
    k = min(max(int(k), 0), MAX_TOP_LOGPROBS)
    return PromptLogprobs([None] + chosen[1:length].tolist(),
                          [()] + [tuple(zip(ids[t, :k].tolist(), values[t, :k].tolist())) for t in range(1, length)])


class EngineSizes:
    """The sizes both engines (this one and grok1.paged_engine's) take from their config and layout."""

    config: Grok1Config
    layout: object  # sharding.layout.MeshLayout or None

    @property
    def max_slots(self) -> int:
        return self.config.engine.max_slots

    @property
    def max_len(self) -> int:
        return self.config.engine.max_len

    def decode_row_buckets(self) -> tuple[int, ...]:
        """Row counts the unembedding and sampling of a decode step compile for (buckets.decode_row_buckets)."""
        return decode_row_buckets(self.max_slots, row_shares(self.layout))


class Engine(EngineSizes):
    """Owns the params and the device state of one model replica.

    `layout` (sharding.layout.MeshLayout) spreads them over a device mesh, possibly spanning processes;
    without it everything lives on this process's default device.
    """

    def __init__(self, config: Grok1Config, params, layout=None):
        self.config = config
        self.layout = layout
        moe_fn, self.params, self.state = on_layout(layout, params, init_state(config))
        outputs = step_outputs(layout, self.state, 1)
        place = None if layout is None else layout.constrain
        self._prefill = jax.jit(functools.partial(prefill_step, config=config, moe_fn=moe_fn, place=place),
                                donate_argnums=(1,), **outputs)
        self._prefill_scored = jax.jit(functools.partial(prefill_step, config=config, moe_fn=moe_fn, place=place,
                                                         score_prompt=True), donate_argnums=(1,), **outputs)
        self._decode_forward, self._decode_sample = jit_decode_halves(config, layout, self.state, moe_fn)
        self._words = mask_words(config.model.vocab_size)
        self._release = jax.jit(release_slot, donate_argnums=(0,), **step_outputs(layout, self.state, 0))
        # The host's copy of which slots decode and how long their sequences are: every change comes from a call
        # of this class (prefill, decode, release), so it is exact, and equal in every process of a mesh.
        self._active = np.zeros(self.max_slots, bool)
        self._lengths = np.zeros(self.max_slots, np.int64)

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
            sizes.append(min(sizes[-1] * PREFILL_BATCH_GROWTH, self.max_slots))  # never more rows than slots
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
                                       slot_sampling(chosen, self.config.model.vocab_size), replayed, words, has)
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
        rows = np.full(smallest_bucket(len(active), self.decode_row_buckets()), self.max_slots, np.int32)
        rows[: len(active)] = active  # the rest is padding: out of range
        # The token fed now sits at position lengths[slot]: attend over a bucket that holds it.
        longest = int(self._lengths[active].max()) + 1 if len(active) else 1
        kv_len = smallest_bucket(min(longest, self.max_len), self.decode_kv_buckets())
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
            # `skip` passed as decode_buckets passes it: a call that leaves it out is another cache key, and the
            # first real step at each bucket would trace and compile again (seconds each on a CPU).
            self.state = self._decode_forward(self.params, self.state, None, kv_len=kv_len)[0]
        for rows in self.decode_row_buckets():
            self.decode_buckets(np.full(rows, self.max_slots, np.int32), self.decode_kv_buckets()[0])
        # The masked variant (requests under a grammar) at the smallest buckets; others compile on first use.
        none = np.zeros(self.max_slots, bool)
        smallest = np.full(self.decode_row_buckets()[0], self.max_slots, np.int32)
        self.decode_buckets(smallest, self.decode_kv_buckets()[0],
                            (np.zeros((self.max_slots, self._words), np.uint32), none, none))

    def check_health(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.state.lengths)))

    def shutdown(self) -> None:
        self.state = None
        self.params = None
