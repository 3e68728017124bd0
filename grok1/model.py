"""Grok-1 as pure functions over a params pytree (see grok1.params), faithful to xAI's released `model.py`.

No haiku, no flax, no mesh, no Ray: parallelism is applied from outside (sharding/). Dimension letters are
listed in grok1.params. Dtypes follow the reference step by step, because the golden logits were made with
them: activations bfloat16, gate and attention softmax float32, and, inside the experts, the float32
intermediates that the reference's one-hot einsum produces.

One forward function serves every use: teacher-forced logits (a fresh cache as long as the sequence),
prefill of a new request into one slot of the engine's cache, and one decode step for all slots.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from grok1.config import ModelConfig
from grok1.paged_attention import PagedKV, attend, kv_bits, kv_like, kv_values, kv_zeros, paged_attention
from grok1.params import QuantizedWeight, dequantize

FPROP_DTYPE = jnp.bfloat16  # the reference's fprop_dtype
RMS_NORM_EPS = 1e-5
ROPE_BASE = 10000


# Logical axes of k and v [L, B, S, Hkv, K], as the params' in grok1.params (sharding/rules.py lays them out).
KV_CACHE_AXES = ("layers", "cache_slots", "cache_positions", "kv_heads", "head_dim")


class KVCache(NamedTuple):
    """Keys (after RoPE) and values of every layer: k, v [L, B, S, Hkv, K], bfloat16 values held as their
    uint16 bits (grok1.paged_attention.kv_bits); a bfloat16 cache works too, at XLA:CPU's slower update."""

    k: jax.Array
    v: jax.Array

    @staticmethod
    def zeros(config: ModelConfig, batch: int, length: int) -> "KVCache":
        return KVCache(*kv_zeros(config, batch, length))


class ForwardOutput(NamedTuple):
    logits: jax.Array  # [B, T, V] bfloat16
    cache: KVCache
    expert_index: jax.Array  # [L, B, T, 2] experts each token used, per layer


# ---------------------------------------------------------------------------------------------- basics


def rms_norm(x, scale):
    """`scale * x / rms(x)` in float32, returned in x's dtype (reference RMSNorm, eps 1e-5)."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return (scale.astype(jnp.float32) * (x * jax.lax.rsqrt(mean_square + RMS_NORM_EPS))).astype(dtype)


def matmul(subscripts: str, a, b):
    """einsum accumulated in float32 and rounded to a's dtype.

    That is what XLA does for a bfloat16 dot anyway; asking for float32 output explicitly lets XLA:CPU use
    its fast float32 kernels (4x faster here) instead of its bfloat16 path, with the same numbers.
    """
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def at_least_two_rows(product, x):
    """product(x) for x [..., K] whose leading dims hold a single row, computed on two rows (a zero one added).

    XLA:CPU (jax 0.10.2) runs a bfloat16 matrix-vector product (one row) on a slow path, 4-8x slower than the
    same product for two rows (measured: [1, 512] x [512, 131072] 82 ms, [2, 512] x ... 11 ms); every decode
    step of a lone sequence, and every prefill of one prompt, ends in such a product with the unembedding.
    """
    if x.size // x.shape[-1] != 1:
        return product(x)
    rows = x.reshape(1, x.shape[-1])
    out = product(jnp.concatenate([rows, jnp.zeros_like(rows)]))[:1]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def int8_product_dtype(activations):
    """The dtype both operands of an int8 weight's product take: the activations' own (bfloat16) on
    accelerators, float32 on XLA:CPU. Why: XLA:CPU (jax 0.10.2) runs a dot of int8 converted to bfloat16 on a
    slow path, 5x slower than the same values converted to float32 (one expert's [16, 512] x [512, 2736]:
    3.6 ms vs 0.75 ms; benchmarks/time_decode_step.py). The numbers do not change: every int8 and bfloat16
    value is exact in float32, their products are exact in float32, and the sum accumulates in float32 both
    ways (preferred_element_type), so only XLA's summation order could differ."""
    return jnp.float32 if jax.default_backend() == "cpu" else activations


def weight_matmul(x, w):
    """x [M, K] @ w [K, N] accumulated in float32 and returned in float32; w plain or a QuantizedWeight.

    A quantised weight is never dequantised: the int8 matrix enters the product as it is (exact in any float
    dtype) and the scales multiply the float32 product: with one scale group `(x @ int8) * s`, with G groups
    the sum of the per-group partial products `sum_g (x_g @ int8_g) * s_g`. So a step reads int8 and converts
    it, with no scaled [K, N] copy per step. Rounding: the reference rounds each weight's `int8 * s` to
    bfloat16 and then multiplies; here the scale meets the exact product, which skips that rounding (one
    rounding per output instead of one per weight). Chosen for the experts (expert_ffn_grouped) because every
    golden and engine criterion passes unchanged with it there; `linear` (attention) keeps the reference's
    order (see there why).
    """
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum("mk,kn->mn", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    weight, scales = w.weight, w.scales.astype(jnp.float32)  # [K, N], [G, N]
    groups = scales.shape[0]
    size = weight.shape[0] // groups
    operands = int8_product_dtype(x.dtype)
    x = x.astype(operands)
    # One 2-D product per group (XLA:CPU has no batched bfloat16 -> float32 dot); G is static and small.
    out = None
    for g in range(groups):
        part = jnp.einsum("mk,kn->mn", x[:, g * size:(g + 1) * size], weight[g * size:(g + 1) * size].astype(operands),
                          preferred_element_type=jnp.float32) * scales[g]  # [M, N]
        out = part if out is None else out + part
    return out


def linear(x, w):
    """[..., K] @ [K, N] in x's dtype, as the reference's quantised Linear: an int8 weight is dequantised first.

    Why not weight_matmul's scale after the product here: in the attention projections that rounding change
    moved the KV-cache decode's logprobs from the full forward's past tests/test_engine.py's bound (0.109 > 0.1
    at one step of 16), while in the experts (8x these bytes) it passes every golden and engine criterion.
    """
    def product(x):
        weight = dequantize(w, x.dtype) if isinstance(w, QuantizedWeight) else w.astype(x.dtype)
        return matmul("...k,kn->...n", x, weight)
    return at_least_two_rows(product, x)


def write_each_row(cache, new, layer_index, positions):
    """cache [L, B, S, Hkv, K] with new [B, Hkv, K] written at (layer_index, b, positions[b]) for every row b;
    positions past S write nothing.

    One scatter whose row axis is a batching dimension (operand_batching_dims), not an index: XLA's partitioner
    then keeps each device's rows local when a mesh splits them (a scatter indexed by row ids would all-gather
    the updates; jax.vmap makes the same scatter but moves the row axis first, transposing the whole cache)."""
    rows = new.shape[0]
    indices = jnp.stack([jnp.broadcast_to(layer_index, (rows,)), positions], axis=1).astype(jnp.int32)  # [B, 2]
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1, 2), inserted_window_dims=(0, 2), scatter_dims_to_operand_dims=(0, 2),
        operand_batching_dims=(1,), scatter_indices_batching_dims=(0,))
    return jax.lax.scatter(cache, indices, new, numbers, mode=jax.lax.GatherScatterMode.FILL_OR_DROP)


def rotary(x, positions):
    """Rotary position embedding with rotate-half: x [B, T, H, K], positions [B, T]."""
    dim = x.shape[-1]
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32)
    inv_freq = 1.0 / (ROPE_BASE ** (exponents / dim))  # [K/2]
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


# ------------------------------------------------------------------------------------------- attention


def attention(x, layer, config: ModelConfig, positions, cache: KVCache, layer_index, rows, kv_len: int):
    """Grouped-query attention over the cache, after writing this step's keys and values into it.

    x [B, T, D] (normed); positions [B, T] absolute; cache [L, Bc, S, Hkv, K], written in place at
    layer_index; rows [B] the cache row of each batch entry, or None for all rows in order with one token
    each (decode); kv_len (static) how many leading cache positions can be attended (for decode a bucket
    longer than every live sequence, at most S; for prefill the padded prompt length). With a paged cache
    (grok1.paged_attention.PagedKV) rows is a PagedRows and kv_len a bucket of the rows' live lengths.
    Returns the projected output [B, T, D] and the updated cache.
    """
    batch, steps, _ = x.shape
    heads, kv_heads, key_size = config.num_q_heads, config.num_kv_heads, config.key_size
    q = linear(x, layer["q_proj"]).reshape(batch, steps, heads, key_size)
    k = linear(x, layer["k_proj"]).reshape(batch, steps, kv_heads, key_size)
    v = linear(x, layer["v_proj"]).reshape(batch, steps, kv_heads, key_size)
    q = rotary(q, positions)
    k = rotary(k, positions)

    if isinstance(cache, PagedKV):  # rows: a PagedRows (block tables, which tokens write)
        out, cache = paged_attention(q, k, v, cache, layer_index, rows.table, positions, rows.write, kv_len,
                                     config.attn_output_multiplier)
        return linear(out, layer["o_proj"]), cache
    if rows is None:
        # Every cache row in order, one new token each (decode): one scatter of each row's token, in place (see
        # kv_bits), local to each device's rows when a mesh splits them (see write_each_row). Only the first
        # kv_len positions are read (the caller makes kv_len longer than every live sequence): a step's cost
        # follows the live lengths, not the cache's S.
        assert steps == 1 and batch == cache.k.shape[1], "rows=None is for decode: all rows, one token each"
        at = positions[:, 0]

        def written(layer_cache, new):
            bits = write_each_row(kv_bits(layer_cache), kv_bits(new[:, 0]), layer_index, at)
            return kv_like(bits, layer_cache), kv_values(bits[layer_index, :, :kv_len])  # [B, kv_len, Hkv, K]
    else:
        # Scatter the new keys/values at their positions; positions past the cache end are dropped.
        row_index = jnp.broadcast_to(rows[:, None], positions.shape)

        def written(layer_cache, new):
            bits = kv_bits(layer_cache).at[layer_index, row_index, positions].set(kv_bits(new), mode="drop")
            return kv_like(bits, layer_cache), kv_values(bits[layer_index, rows, :kv_len])  # [B, S, Hkv, K]

    (new_k, keys), (new_v, values) = written(cache.k, k), written(cache.v, v)
    cache = KVCache(new_k, new_v)
    out = attend(q, keys, values, positions, config.attn_output_multiplier)
    return linear(out, layer["o_proj"]), cache


# ------------------------------------------------------------------------------------ mixture of experts


def select_experts(x, gate_w, num_selected: int, override=None):
    """The MoE gate: float32 softmax over experts, top-k; gates are the raw probabilities (no renormalisation).

    x [N, D]; returns gates [N, k] float32 and expert indices [N, k]. `override` [N, k] forces the experts
    (for tests near routing ties) while the gates still come from the gate's probabilities.
    """
    logits = jnp.dot(x.astype(jnp.float32), gate_w.astype(jnp.float32))  # [N, E]
    probs = jax.nn.softmax(logits, axis=-1)
    if override is None:
        return jax.lax.top_k(probs, num_selected)
    index = override.astype(jnp.int32)
    return jnp.take_along_axis(probs, index, axis=-1), index


class Dispatch(NamedTuple):
    """Where each (token, choice) assignment sits in the expert-sorted, block-padded buffer."""

    slot: jax.Array  # [N*k] row in the buffer of each assignment (or `rows` for dropped ones)
    group_start: jax.Array  # [E] first buffer row of each expert's group (a multiple of block)
    group_blocks: jax.Array  # [E] blocks in each expert's group
    rows: int  # static buffer size
    counts: jax.Array  # [E] assignments each expert computes (its group's first rows; the rest is zero padding)


def plan_dispatch(expert_index, valid, num_experts: int, block: int) -> Dispatch:
    """Sort assignments by expert into groups padded to whole blocks, so each block has one expert.

    expert_index [N, k]; valid [N] (invalid tokens, e.g. padding or empty slots, are not computed).
    """
    experts = jnp.where(valid[:, None], expert_index, num_experts).reshape(-1)  # [A]; E = not computed
    assignments = experts.shape[0]
    counts = jnp.bincount(experts, length=num_experts + 1)[:num_experts]  # [E]
    group_blocks = (counts + block - 1) // block
    group_start = (jnp.cumsum(group_blocks) - group_blocks) * block
    order = jnp.argsort(experts, stable=True)
    sorted_experts = experts[order]
    first_of_expert = jnp.cumsum(counts) - counts
    clipped = jnp.minimum(sorted_experts, num_experts - 1)
    rank_in_group = jnp.arange(assignments) - first_of_expert[clipped]
    # Every expert may waste up to block-1 rows of padding; the buffer is sized for the worst case.
    rows = (assignments + num_experts * (block - 1) + block - 1) // block * block
    sorted_slot = jnp.where(sorted_experts < num_experts, group_start[clipped] + rank_in_group, rows)
    slot = jnp.zeros(assignments, jnp.int32).at[order].set(sorted_slot.astype(jnp.int32))
    return Dispatch(slot, group_start, group_blocks, rows, counts)


def row_tiers(block: int) -> tuple[int, ...]:
    """Row counts an expert's product runs over: powers of two from 2 below block, then block (looped).

    Why: a decode step routes a few tokens to each expert (one at batch 1), and a [block, D] x [D, F] product
    costs about block/2 times a [2, D] one on XLA:CPU (measured on grok-1-cpu's experts: [16, 512] x [512,
    2736] 0.74 ms, [2, 512] x ... 0.34 ms), so padding one token to 16 rows made the experts most of a batch-1
    step. Never one row: XLA:CPU's matrix-vector product is its slow path (see at_least_two_rows)."""
    tiers, size = [], 2
    while size < block:
        tiers.append(size)
        size *= 2
    return (*tiers, block)


def expert_ffn_grouped(x_sorted, dispatch: Dispatch, w_gelu, w_value, w_out, block: int):
    """Run each expert only on its own rows of the sorted buffer: `(gelu(x W) * (x V)) W1`.

    x_sorted [R, D] bfloat16; returns [R, D] float32. Quantised weights stay int8 (see weight_matmul), and
    experts without tokens are skipped, so the work is proportional to the tokens routed, not to E. An expert
    with at most t < block tokens runs one [t, D] product (t its row tier, `row_tiers`); more run in blocks.
    A row's result is the one it gets alone, to float32 rounding (tests/model/test_model.py, every tier).
    """
    num_experts = dispatch.group_start.shape[0]
    tiers = row_tiers(block)

    def one_expert(e, out):
        count = dispatch.counts[e]

        def in_blocks_of(size):
            def run(out):
                wg, wv, wo = _index(w_gelu, e), _index(w_value, e), _index(w_out, e)  # [D, F], [D, F], [F, D]

                def one_block(i, out):
                    start = dispatch.group_start[e] + i * size
                    rows = jax.lax.dynamic_slice_in_dim(x_sorted, start, size)  # [size, D], within the group
                    # The reference's one-hot einsum promotes to float32 after the bfloat16 matmuls: match it.
                    gelu_in = weight_matmul(rows, wg).astype(rows.dtype).astype(jnp.float32)
                    value_in = weight_matmul(rows, wv).astype(rows.dtype).astype(jnp.float32)
                    hidden = jax.nn.gelu(gelu_in, approximate=True) * value_in  # [size, F] float32
                    return jax.lax.dynamic_update_slice_in_dim(out, weight_matmul(hidden, wo), start, axis=0)

                return jax.lax.fori_loop(0, (count + size - 1) // size, one_block, out)
            return run

        # 0: no tokens; then the smallest tier holding them all (the last, block, loops over the group).
        which = jnp.where(count == 0, 0, 1 + jnp.sum(count > jnp.asarray(tiers[:-1], count.dtype)))
        return jax.lax.switch(which, [lambda out: out] + [in_blocks_of(size) for size in tiers], out)

    out = jnp.zeros((x_sorted.shape[0], x_sorted.shape[1]), jnp.float32)
    return jax.lax.fori_loop(0, num_experts, one_expert, out)


EXPERT_WEIGHTS = ("ffn_gelu_in", "ffn_value_in", "ffn_out")


class StackedWeight(NamedTuple):
    """One layer's expert weight left in the params' stacked [L, E, ...] array (plain or a QuantizedWeight), with
    the layer's index: expert e is read as stacked[layer, e] where it runs (`_index`).

    Why: lax.scan over the layers slices what it scans, and XLA:CPU copies each slice into a new buffer; with
    the experts scanned, every step copied every expert of every layer (grok-1-cpu: 134 MB, ~1/6 of a batch-1
    step, profiled with jax.profiler) to run the two a token picked. Sliced here, only those are read."""

    stacked: object
    layer: jax.Array


def _index(w, e):
    """Expert e's matrix out of a stacked [E, ...] weight (quantised or not) or a StackedWeight."""
    if isinstance(w, StackedWeight):
        def one(leaf):  # one dynamic slice [1, 1, ...] of [L, E, ...]: nothing else of the stack is touched
            starts = (w.layer, e) + (0,) * (leaf.ndim - 2)
            return jax.lax.dynamic_slice(leaf, starts, (1, 1, *leaf.shape[2:])).reshape(leaf.shape[2:])
        return jax.tree.map(one, w.stacked)
    if isinstance(w, QuantizedWeight):
        return QuantizedWeight(w.weight[e], w.scales[e])
    return w[e]


def combine(gates, y):
    """Gate-weighted sum of each token's expert outputs: gates [N, k] float32, y [N, k, D] float32 -> [N, D] f32.

    Gates are rounded to bfloat16 first (as the reference), the sum is float32, and it stays float32 into
    post_moe_norm (rounded to bfloat16 after it, in decoder_layer). Why not round here: XLA:CPU (jax 0.10.2)
    fuses a reduce with the f32->bf16->f32 convert pair that rms_norm makes of a bf16 input into one YNNPACK
    fusion that silently drops the rounding, for some shapes only; one device (fused) and expert-parallel
    (rounded at the shard_map boundary) then differed by a bfloat16 ulp and flipped near-tie greedy tokens.
    Not rounding at all is the same on every shape and layout, and matches the golden logits as closely.
    Every MoE (model.moe, sharding.expert_parallel) combines through this function.
    """
    gates = gates.astype(FPROP_DTYPE).astype(jnp.float32)
    combined = gates[:, 0, None] * y[:, 0]
    for choice in range(1, y.shape[1]):
        combined = combined + gates[:, choice, None] * y[:, choice]
    return combined  # float32: rounded only after post_moe_norm


def moe(x, layer, config: ModelConfig, valid, block: int, override=None):
    """Top-2 mixture of experts: route -> dispatch (sort into expert blocks) -> experts -> combine.

    x [B, T, D] (normed); valid [B, T]; override [B, T, k] or None. Returns [B, T, D] and the experts
    used [B, T, k].
    """
    batch, steps, dim = x.shape
    tokens = x.reshape(batch * steps, dim)  # [N, D]
    k = config.num_selected_experts
    gates, expert_index = select_experts(
        tokens, layer["gate"], k, None if override is None else override.reshape(batch * steps, k))
    dispatch = plan_dispatch(expert_index, valid.reshape(-1), config.num_experts, block)
    token_of_assignment = jnp.repeat(jnp.arange(batch * steps), k)  # [A]
    x_sorted = jnp.zeros((dispatch.rows + 1, dim), x.dtype).at[dispatch.slot].set(
        tokens[token_of_assignment])[:-1]  # the extra row absorbs dropped assignments
    y_sorted = expert_ffn_grouped(x_sorted, dispatch, layer["ffn_gelu_in"], layer["ffn_value_in"],
                                  layer["ffn_out"], block)
    y = jnp.take(y_sorted, dispatch.slot, axis=0, mode="fill", fill_value=0).reshape(batch * steps, k, dim)
    return combine(gates, y).reshape(batch, steps, dim), expert_index.reshape(batch, steps, k)


# ----------------------------------------------------------------------------------------------- model


def decoder_layer(h, layer, config: ModelConfig, positions, cache, layer_index, rows, kv_len, valid, block,
                  override=None, moe_fn=moe):
    """One decoder layer; h [B, T, D] bfloat16. Norm order as in the reference's DecoderLayer."""
    group = RowGroup(positions, rows, kv_len, valid)
    (h,), cache, (expert_index,) = decoder_layer_groups((h,), layer, config, (group,), cache, layer_index, block,
                                                        (override,), moe_fn)
    return h, cache, expert_index


class RowGroup(NamedTuple):
    """One group of batch rows through the layers: positions [B, T], cache rows (see attention), kv_len
    (static) and valid [B, T]. Groups of one call differ in shape (a decode token per slot beside [n, T]
    prefill chunks), so each attends on its own; their tokens meet in one MoE."""

    positions: jax.Array
    rows: object
    kv_len: int
    valid: jax.Array


def decoder_layer_groups(hs, layer, config: ModelConfig, groups, cache, layer_index, block, overrides, moe_fn=moe):
    """decoder_layer for several row groups hs[i] [B_i, T_i, D]: attention per group, in order (each writes its
    keys and values before the next group reads), then one MoE call over every group's tokens, so a step that
    decodes some sequences and prefills others reads the experts' weights once. Every op is per token except
    attention, so a token's result does not depend on which groups share the call. overrides: one per group."""
    attended = []
    for h, group in zip(hs, groups):
        attn, cache = attention(rms_norm(h, layer["pre_attn_norm"]), layer, config, group.positions, cache,
                                layer_index, group.rows, group.kv_len)
        attended.append(h + rms_norm(attn, layer["post_attn_norm"]))
    normed = [rms_norm(h, layer["pre_moe_norm"]) for h in attended]
    if len(normed) == 1:
        ffns, expert_indices = moe_fn(normed[0], layer, config, groups[0].valid, block, overrides[0])
        ffns, expert_indices = (ffns,), (expert_indices,)
    else:
        ffns, expert_indices = _moe_together(normed, layer, config, [g.valid for g in groups], block, overrides,
                                             moe_fn)
    hs = tuple(h + rms_norm(ffn, layer["post_moe_norm"]).astype(h.dtype) for h, ffn in zip(attended, ffns))
    return hs, cache, tuple(expert_indices)


def _moe_together(xs, layer, config: ModelConfig, valids, block, overrides, moe_fn):
    """moe_fn once over the tokens of every xs[i] [B_i, T_i, D] as one row [1, sum B_i T_i, D]; split back."""
    sizes = [x.shape[0] * x.shape[1] for x in xs]
    tokens = jnp.concatenate([x.reshape(1, n, x.shape[-1]) for x, n in zip(xs, sizes)], axis=1)
    valid = jnp.concatenate([v.reshape(1, n) for v, n in zip(valids, sizes)], axis=1)
    override = None
    if any(o is not None for o in overrides):
        k = config.num_selected_experts
        override = jnp.concatenate([o.reshape(1, n, k) for o, n in zip(overrides, sizes)], axis=1)
    ffn, expert_index = moe_fn(tokens, layer, config, valid, block, override)
    cuts = list(itertools.accumulate(sizes))[:-1]
    ffns = [part.reshape(x.shape) for part, x in zip(jnp.split(ffn[0], cuts), xs)]
    indices = [part.reshape(*x.shape[:2], -1) for part, x in zip(jnp.split(expert_index[0], cuts), xs)]
    return ffns, indices


def scale_in_float32(x, multiplier: float):
    """x * multiplier computed in float32, rounded back to x's dtype.

    The reference writes `bf16_array *= python_float`; its logits match far better (golden logits: 0.86%
    vs 1.4% relative error, and no near-tie routing flips) when the product is formed in float32 than
    with the multiplier rounded to bfloat16 first (78.38 -> 78.5), so that is what its XLA computed.
    """
    return (x.astype(jnp.float32) * multiplier).astype(x.dtype)


def embed(params, tokens, config: ModelConfig):
    """Token embeddings times the release's embedding multiplier: [B, T, D] bfloat16."""
    return scale_in_float32(params["embedding"][tokens].astype(FPROP_DTYPE), config.embedding_multiplier_scale)


def round_to_bfloat16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), kept as float32: `x.astype(bf16).astype(f32)`,
    bit for bit, NaN included, as integer operations XLA:CPU fuses into the loop around them (it runs each
    float32 <-> bfloat16 conversion pair as passes of their own over the array)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) & jnp.uint32(0xFFFF0000)
    return jnp.where(jnp.isnan(x), x, jax.lax.bitcast_convert_type(rounded, jnp.float32))


def unembed(params, h, config: ModelConfig, dtype=FPROP_DTYPE):
    """Final norm, tied output embedding, times the release's output multiplier: [B, T, V] bfloat16 values, held
    as `dtype`. A sampler reads them as float32: asked for float32, the two bfloat16 roundings (the product's,
    then the multiplier's: `matmul` and `scale_in_float32`) run in float32 in one pass (the same values), where
    bfloat16 logits widened by the sampler cost three passes over [B, T, V] on XLA:CPU."""
    h = rms_norm(h, params["final_norm"])
    embedding = params["embedding"].astype(h.dtype)
    if dtype != jnp.float32:
        logits = at_least_two_rows(lambda h: matmul("...d,vd->...v", h, embedding), h)
        return scale_in_float32(logits, config.output_multiplier_scale).astype(dtype)
    product = at_least_two_rows(lambda h: jnp.einsum("...d,vd->...v", h, embedding,
                                                     preferred_element_type=jnp.float32), h)
    return round_to_bfloat16(round_to_bfloat16(product) * config.output_multiplier_scale)


def run_layers(params, config: ModelConfig, tokens, positions, cache: KVCache, rows, *, kv_len: int, valid=None,
               block: int = 16, routing_override=None, moe_fn=moe):
    """Embedding and every decoder layer (no final norm, no unembedding): h [B, T, D], the cache, the experts.

    Arguments as `forward`'s. The engine's decode step runs this for all slots and unembeds the active ones.
    """
    if valid is None:
        valid = jnp.ones(tokens.shape, bool)
    (h,), cache, (expert_index,) = run_layers_groups(
        params, config, (tokens,), (RowGroup(positions, rows, kv_len, valid),), cache, block=block,
        routing_overrides=(routing_override,), moe_fn=moe_fn)
    return h, cache, expert_index


def run_layers_groups(params, config: ModelConfig, tokens, groups, cache, *, block: int = 16,
                      routing_overrides=None, moe_fn=moe):
    """run_layers for several row groups in one pass (see decoder_layer_groups): tokens[i] [B_i, T_i] with
    groups[i] a RowGroup; routing_overrides: one [L, B_i, T_i, k] or None per group. Returns (h per group,
    the cache, experts [L, B_i, T_i, k] per group)."""
    if routing_overrides is None:
        routing_overrides = (None,) * len(groups)
    hs = tuple(embed(params, t, config) for t in tokens)

    layers = params["layers"]
    scanned = {name: leaf for name, leaf in layers.items() if name not in EXPERT_WEIGHTS}  # see StackedWeight

    def body(carry, xs):
        hs, cache = carry
        index, layer, overrides = xs
        layer = {**layer, **{name: StackedWeight(layers[name], index) for name in EXPERT_WEIGHTS if name in layers}}
        hs, cache, expert_indices = decoder_layer_groups(hs, layer, config, groups, cache, index, block, overrides,
                                                         moe_fn)
        return (hs, cache), expert_indices

    indices = jnp.arange(config.num_layers)
    (hs, cache), expert_indices = jax.lax.scan(body, (hs, cache), (indices, scanned, tuple(routing_overrides)))
    return hs, cache, expert_indices


def forward(params, config: ModelConfig, tokens, positions, cache: KVCache, rows, *, kv_len: int,
            valid=None, block: int = 16, routing_override=None, logits_at=None, moe_fn=moe,
            place_h=None) -> ForwardOutput:
    """Run the model on tokens [B, T] at positions [B, T], reading and writing cache rows `rows` [B].

    kv_len (static): cache positions attention may see. valid [B, T]: tokens that count (others are
    skipped by the experts). routing_override [L, B, T, 2]: force the experts per layer. logits_at [B]:
    if given, logits only at that step of each row ([B, 1, V]), which is all that sampling needs.
    moe_fn: the mixture-of-experts implementation (`moe` here; sharding/ passes an expert-parallel one).
    place_h: applied to the h that is unembedded (a mesh layout's constraint; None: nothing).
    """
    h, cache, expert_index = run_layers(params, config, tokens, positions, cache, rows, kv_len=kv_len, valid=valid,
                                        block=block, routing_override=routing_override, moe_fn=moe_fn)
    if logits_at is not None:
        h = jnp.take_along_axis(h, logits_at[:, None, None], axis=1)
    if place_h is not None:
        h = place_h(h)
    return ForwardOutput(unembed(params, h, config), cache, expert_index)


def full_forward(params, config: ModelConfig, tokens, *, block: int = 16, routing_override=None, moe_fn=moe):
    """Teacher-forced logits [B, T, V] for whole sequences, with a fresh cache (no padding)."""
    batch, steps = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(steps), (batch, steps))
    return forward(params, config, tokens, positions, KVCache.zeros(config, batch, steps), jnp.arange(batch),
                   kv_len=steps, block=block, routing_override=routing_override, moe_fn=moe_fn)
