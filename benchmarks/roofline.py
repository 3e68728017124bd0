"""The floor under a decode step: what it must read and compute, and what this machine can read and compute.

A decode step of n active sequences must at least
- read every attention weight (q, k, v, o: int8 + scales), the norms and the gate, once per layer;
- read the experts it actually selects (the distinct experts of the step's n x 2 choices, per layer; the
  engine reports them as expert counts) - three int8 matrices [D, F] / [F, D] + scales each;
- read the KV cache it actually attends: each active sequence's live length x 2 (k, v) x Hkv x K bfloat16, per
  layer (not the bucket it is padded to, nor max_len);
- read the tied unembedding [V, D] bfloat16 once (whatever n).
It must compute, per active token: 2 FLOPs per weight it multiplies (q, k, v, o; the gate; two selected experts
of three matrices; the unembedding) plus attention's 2 x 2 x H x K per attended position per layer.

The step's byte floor is bytes / read bandwidth, its FLOP floor FLOPs / matmul throughput, both measured on
this machine under XLA in the same run (`measure_machine`); a step's "fraction of the floor" is floor / time.
Everything here is arithmetic on shapes, except `measure_machine`. docs/benchmarks.md describes the model.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import jax
import jax.numpy as jnp
import numpy as np

from grok1.config import ModelConfig
from grok1.model import EXPERT_WEIGHTS

ATTENTION_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERT_PARAMS = EXPERT_WEIGHTS
KV_BYTES = 2  # bfloat16 cache entries
EMBEDDING_BYTES = 2  # bfloat16 unembedding


@dataclass(frozen=True)
class Machine:
    read_bytes_per_s: float  # the fastest of a few large float32 reductions under XLA (see measure_machine)
    flops_per_s: float  # a large matmul under XLA, bfloat16 inputs accumulated in float32 (as the model's)

    def as_dict(self) -> dict:
        return {"read_GB_per_s": self.read_bytes_per_s / 1e9, "matmul_GFLOP_per_s": self.flops_per_s / 1e9}

    def best(self, other: "Machine") -> "Machine":
        """The faster figure of each: a floor from the best the machine did is the one a step cannot beat."""
        return Machine(max(self.read_bytes_per_s, other.read_bytes_per_s), max(self.flops_per_s, other.flops_per_s))


def _best_seconds(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - started)
    return best


# Why several reductions: XLA:CPU runs sums of the same array on one thread or on two depending on their shape,
# and on the 2-core VMs here each read 23-46 GB/s within minutes (a whole-array sum 24-44, two row sums 30-41,
# sixteen column sums 31-46). A floor from a slow one would overstate every fraction. (shape, axis) each.
READ_SUMS = (((-1,), 0), ((2, -1), 1), ((-1, 16), 0))


def measure_machine(read_mib: int = 512, matmul_size: int = 2048, repeats: int = 10) -> Machine:
    """Read bandwidth (the fastest of the READ_SUMS over a read_mib float32 array) and matmul throughput
    (matmul_size^3, bf16 in, f32 acc), each the best of `repeats` runs."""
    data = jnp.ones(read_mib * 2**20 // 4, jnp.float32)
    read_s = min(_best_seconds(jax.jit(lambda d, shape=shape, axis=axis: jnp.sum(d.reshape(shape), axis=axis)), data,
                               repeats=repeats) for shape, axis in READ_SUMS)
    a = jnp.ones((matmul_size, matmul_size), jnp.bfloat16)
    product = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    matmul_s = _best_seconds(product, a, a, repeats=repeats)
    return Machine(data.nbytes / read_s, 2 * matmul_size**3 / matmul_s)


def _nbytes(leaf) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(leaf)))


@dataclass(frozen=True)
class StepCost:
    """What one decode step must read (bytes, by part) and compute (FLOPs)."""

    weight_bytes: int  # attention, norms, gate of every layer
    expert_bytes: int  # the experts selected
    kv_bytes: int  # the live KV cache attended
    unembedding_bytes: int
    flops: int

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.expert_bytes + self.kv_bytes + self.unembedding_bytes

    def fractions(self, step_s: float, machine: Machine) -> dict:
        """Floor time / measured step time, for the byte floor, the FLOP floor and the larger of the two."""
        byte_floor, flop_floor = self.bytes / machine.read_bytes_per_s, self.flops / machine.flops_per_s
        return {"byte_floor_ms": 1e3 * byte_floor, "flop_floor_ms": 1e3 * flop_floor,
                "byte_fraction": byte_floor / step_s, "flop_fraction": flop_floor / step_s,
                "roofline_fraction": max(byte_floor, flop_floor) / step_s}

    def as_dict(self) -> dict:
        return {**asdict(self), "bytes": self.bytes}


def decode_step_cost(params, config: ModelConfig, live_lengths, experts_selected) -> StepCost:
    """The cost of one decode step. live_lengths: positions each active sequence attends (its length + 1, the
    token fed now included); experts_selected: distinct experts per layer the step used ([L] or a total).

    Weight bytes come from the params as stored (int8 and scales, or bfloat16 when dequantised at load)."""
    layers = params["layers"]
    num_layers, experts = config.num_layers, config.num_experts
    live = np.asarray(live_lengths, np.int64)
    tokens = len(live)
    attention_bytes = sum(_nbytes(layers[name]) for name in ATTENTION_PARAMS)
    small_bytes = _nbytes({k: v for k, v in layers.items() if k not in ATTENTION_PARAMS + EXPERT_PARAMS})
    per_expert = sum(_nbytes(layers[name]) for name in EXPERT_PARAMS) // (num_layers * experts)
    selected = int(np.sum(experts_selected))
    kv = int(live.sum()) * num_layers * 2 * config.num_kv_heads * config.key_size * KV_BYTES
    unembedding = config.vocab_size * config.emb_size * EMBEDDING_BYTES
    d, k, f = config.emb_size, config.key_size, config.ffn_size
    q_heads, kv_heads = config.num_q_heads, config.num_kv_heads
    attention_weights = d * (q_heads + 2 * kv_heads) * k + q_heads * k * d
    per_token_layer = 2 * (attention_weights + d * experts + config.num_selected_experts * 3 * d * f)
    flops = (tokens * num_layers * per_token_layer + 2 * 2 * q_heads * k * int(live.sum()) * num_layers
             + tokens * 2 * config.vocab_size * d)
    return StepCost(attention_bytes + small_bytes + _nbytes(params["final_norm"]), selected * per_expert, kv,
                    unembedding, int(flops))
