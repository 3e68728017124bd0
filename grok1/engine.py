"""The single-process engine: fixed decode slots over a preallocated KV cache, and three verbs.

    prefill(slot, prompt, sampling) -> first token   # runs the prompt into a free slot's cache rows
    decode()                        -> one token per slot (inactive slots give -1)
    release(slot)                                     # the slot stops decoding at once

The device state (`DecodeState`) holds the cache, each slot's length, the token it feeds next and its
sampling settings, so consecutive decode steps need nothing from the host: sampled tokens stay on the
device. Both steps are jitted once per shape (decode: one shape; prefill: one per prompt bucket) and donate
the state, so the cache is updated in place. Which request owns which slot, and when it ends, is the
scheduler's business (cluster/scheduler.py), not this module's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from grok1 import model
from grok1.config import Grok1Config
from grok1.sampling import SlotSampling, sample


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    cache: model.KVCache  # [L, B, S, Hkv, K]
    lengths: jax.Array  # [B] int32: tokens in the cache = position of the token fed next
    next_token: jax.Array  # [B] int32: the last sampled token, fed at the next decode step
    generated: jax.Array  # [B] int32: tokens sampled so far (indexes the request's random stream)
    active: jax.Array  # [B] bool
    sampling: SlotSampling


class StepOutput(NamedTuple):
    tokens: np.ndarray  # [B] int32, -1 where a slot is inactive
    logprobs: np.ndarray  # [B] float32
    expert_counts: np.ndarray  # [L, E] tokens routed to each expert in this step


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings (host side)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0


def init_state(config: Grok1Config) -> DecodeState:
    slots = config.engine.max_slots
    return DecodeState(
        cache=model.KVCache.zeros(config.model, slots, config.engine.max_len),
        lengths=jnp.zeros(slots, jnp.int32), next_token=jnp.zeros(slots, jnp.int32),
        generated=jnp.zeros(slots, jnp.int32), active=jnp.zeros(slots, bool),
        sampling=SlotSampling.defaults(slots))


def _expert_counts(expert_index, valid, num_experts):
    """[L, E] tokens per expert, counting only valid tokens. expert_index [L, B, T, k]."""
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.int32)  # [L, B, T, k, E]
    return jnp.sum(one_hot * valid[None, :, :, None, None], axis=(1, 2, 3))


def prefill_step(params, state: DecodeState, slot, tokens, length, sampling: SlotSampling, *,
                 config: Grok1Config, moe_fn=model.moe):
    """Run a prompt (padded to a bucket: tokens [T]) into `slot` and sample its first token."""
    steps = tokens.shape[0]
    positions = jnp.arange(steps)[None]
    valid = positions < length
    out = model.forward(params, config.model, tokens[None], positions, state.cache, slot[None], kv_len=steps,
                        valid=valid, block=config.engine.moe_block_size, logits_at=(length - 1)[None],
                        moe_fn=moe_fn)
    token, logprob = sample(out.logits[:, 0], sampling, jnp.zeros(1, jnp.int32))
    state = DecodeState(
        cache=out.cache,
        lengths=state.lengths.at[slot].set(length),
        next_token=state.next_token.at[slot].set(token[0]),
        generated=state.generated.at[slot].set(1),
        active=state.active.at[slot].set(True),
        sampling=jax.tree.map(lambda all_slots, one: all_slots.at[slot].set(one[0]), state.sampling, sampling))
    counts = _expert_counts(out.expert_index, valid, config.model.num_experts)
    return state, token[0], logprob[0], counts


def decode_step(params, state: DecodeState, *, config: Grok1Config, moe_fn=model.moe):
    """One token for every active slot, all slots in one batch."""
    slots = state.lengths.shape[0]
    positions = state.lengths[:, None]
    valid = state.active[:, None]
    out = model.forward(params, config.model, state.next_token[:, None], positions, state.cache,
                        None, kv_len=state.cache.k.shape[2], valid=valid,
                        block=config.engine.moe_block_size, moe_fn=moe_fn)
    tokens, logprobs = sample(out.logits[:, 0], state.sampling, state.generated)
    tokens = jnp.where(state.active, tokens, -1)
    step = state.active.astype(jnp.int32)
    state = DecodeState(cache=out.cache, lengths=state.lengths + step,
                        next_token=jnp.where(state.active, tokens, state.next_token),
                        generated=state.generated + step, active=state.active, sampling=state.sampling)
    return state, tokens, logprobs, _expert_counts(out.expert_index, valid, config.model.num_experts)


def release_slot(state: DecodeState, slot) -> DecodeState:
    # Reset the slot's sampling too: a leftover top-k/top-p would make every later step sort the vocabulary.
    defaults = SlotSampling.defaults(1)
    sampling = jax.tree.map(lambda all_slots, one: all_slots.at[slot].set(one[0]), state.sampling, defaults)
    return DecodeState(cache=state.cache, lengths=state.lengths.at[slot].set(0),
                       next_token=state.next_token, generated=state.generated,
                       active=state.active.at[slot].set(False), sampling=sampling)


class Engine:
    """Owns the params and the device state of one model replica.

    `placement` (sharding.placement.Placement) spreads them over a device mesh, possibly spanning processes;
    without it everything lives on this process's default device.
    """

    def __init__(self, config: Grok1Config, params, placement=None):
        self.config = config
        self.placement = placement
        moe_fn = model.moe if placement is None else placement.moe_fn
        state = init_state(config)
        if placement is not None:
            params = placement.put_params(params)
            state = jax.device_put(state, placement.state_shardings(state))
        self.params = params
        self.state = state
        keep = {} if placement is None else {"out_shardings": placement.state_shardings(state)}
        with_outputs = {} if placement is None else {
            "out_shardings": (placement.state_shardings(state), placement.replicated, placement.replicated,
                              placement.replicated)}
        self._prefill = jax.jit(functools.partial(prefill_step, config=config, moe_fn=moe_fn),
                                donate_argnums=(1,), **with_outputs)
        self._decode = jax.jit(functools.partial(decode_step, config=config, moe_fn=moe_fn),
                               donate_argnums=(1,), **with_outputs)
        self._release = jax.jit(release_slot, donate_argnums=(0,), **keep)

    @property
    def max_slots(self) -> int:
        return self.config.engine.max_slots

    @property
    def max_len(self) -> int:
        return self.config.engine.max_len

    def bucket_for(self, length: int) -> int:
        for bucket in self.config.engine.buckets_up_to_max_len():
            if length <= bucket:
                return bucket
        raise ValueError(f"prompt of {length} tokens exceeds the engine's max_len {self.max_len}")

    def prefill(self, slot: int, prompt: list[int], sampling: Sampling) -> StepOutput:
        if not 0 < len(prompt) < self.max_len:
            raise ValueError(f"prompt length {len(prompt)} must be in [1, {self.max_len})")
        bucket = self.bucket_for(len(prompt))
        padded = np.zeros(bucket, np.int32)
        padded[: len(prompt)] = prompt
        one = SlotSampling.single(sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed)
        self.state, token, logprob, counts = self._prefill(
            self.params, self.state, jnp.int32(slot), jnp.asarray(padded), jnp.int32(len(prompt)), one)
        return StepOutput(np.asarray([token]), np.asarray([logprob]), np.asarray(counts))

    def decode(self) -> StepOutput:
        return self.decode_finish(self.decode_start())

    def decode_start(self):
        """Dispatch a decode step and return at once (JAX runs it asynchronously); read it with decode_finish."""
        self.state, tokens, logprobs, counts = self._decode(self.params, self.state)
        return tokens, logprobs, counts

    @staticmethod
    def decode_finish(handle) -> StepOutput:
        return StepOutput(*(np.asarray(x) for x in handle))

    def release(self, slot: int) -> None:
        self.state = self._release(self.state, jnp.int32(slot))

    def warmup(self) -> None:
        """Compile the decode step and every prefill bucket now rather than on the first requests."""
        for bucket in self.config.engine.buckets_up_to_max_len():
            self.prefill(0, [1] * min(bucket, self.max_len - 1), Sampling())
        self.decode()
        self.release(0)

    def check_health(self) -> bool:
        return bool(jnp.all(jnp.isfinite(self.state.lengths)))

    def shutdown(self) -> None:
        self.state = None
        self.params = None
