"""Requests' sampling settings as the arrays a jitted step takes (grok1.sampling.SlotSampling), on the host.

The scheduler refuses values outside grok1.limits; the conversion clips instead, so that no request's settings
can raise inside a shard worker (where it would fail the whole group).
"""

from __future__ import annotations

import math

import numpy as np

from grok1.engine_api import Sampling
from grok1.limits import LOGIT_BIAS_RANGE, MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, PENALTY_RANGE
from grok1.sampling import LogitPenalties, SlotSampling, seed_key_data


def finite_clipped(value: float, bounds: tuple[float, float]) -> float:
    value = float(value)
    return 0.0 if math.isnan(value) else min(max(value, bounds[0]), bounds[1])


def bias_row(logit_bias, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 / values f32 [MAX_LOGIT_BIAS]: ids outside the vocabulary are dropped, a repeated id keeps its
    last bias (as a JSON object would), entries past MAX_LOGIT_BIAS are dropped; padding is id 0, bias 0."""
    biases = {token: finite_clipped(bias, LOGIT_BIAS_RANGE) for token, bias in logit_bias if 0 <= token < vocab}
    ids, values = np.zeros(MAX_LOGIT_BIAS, np.int32), np.zeros(MAX_LOGIT_BIAS, np.float32)
    kept = list(biases.items())[:MAX_LOGIT_BIAS]
    ids[: len(kept)] = [token for token, _ in kept]
    values[: len(kept)] = [bias for _, bias in kept]
    return ids, values


def slot_sampling(samplings: list[Sampling], vocab: int) -> SlotSampling:
    """The requests' settings as SlotSampling arrays. Total: any seed (Python int), top_k clamped into
    [0, vocab] before the int32 conversion, penalties and biases clipped to OpenAI's ranges."""
    bias = [bias_row(s.logit_bias, vocab) for s in samplings]
    penalties = LogitPenalties(
        np.asarray([finite_clipped(s.presence_penalty, PENALTY_RANGE) for s in samplings], np.float32),
        np.asarray([finite_clipped(s.frequency_penalty, PENALTY_RANGE) for s in samplings], np.float32),
        np.stack([ids for ids, _ in bias]), np.stack([values for _, values in bias]))
    return SlotSampling(np.asarray([s.temperature for s in samplings], np.float32),
                        np.asarray([s.top_p for s in samplings], np.float32),
                        np.asarray([min(max(int(s.top_k), 0), vocab) for s in samplings], np.int32),
                        np.stack([seed_key_data(s.seed) for s in samplings]), penalties,
                        np.asarray([logprobs_wanted(s) for s in samplings], np.int32))


def logprobs_wanted(s: Sampling) -> int:
    """SlotSampling.top_logprobs of a request: its k clamped into [0, MAX_TOP_LOGPROBS], or -1 when it wants no
    logprob at all (not even its sampled token's)."""
    k = min(max(int(getattr(s, "top_logprobs", 0)), 0), MAX_TOP_LOGPROBS)
    return k if k > 0 or getattr(s, "logprobs", True) is not False else -1
