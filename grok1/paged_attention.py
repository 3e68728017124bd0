"""Attention over a paged KV cache: a pool of fixed-size blocks per layer, and a block table per sequence.

    pool      k, v [L, N, bs, Hkv, K]   N blocks of bs token positions, per layer
    table     [B, M] int32              row b's blocks in order; position p lives at (table[b, p // bs], p % bs)

Which blocks a sequence owns is cluster/kv_blocks.py's business (reference counts, prefix sharing); this module
only writes new tokens' keys and values through the tables and reads them back. A read gathers each row's first
`kv_len // bs` blocks, kv_len being a static bucket of the live length, so a step's cost follows the tokens in
context, not the longest context the engine allows.

`paged_attention` is the one kernel: a GPU kernel (vLLM's or Pallas' paged attention) can replace it without
anything else changing. On XLA:CPU the gather is an ordinary take, fused by XLA.

Split over ranks (the expert axis, when attention runs data parallel over it): the pool's N blocks are R equal
shares, rank-major, one per rank, and the rows are R equal groups in rank order, each row's blocks in its own
rank's share. The table then comes as [R, B/R, M] of ids within the share, and every read and write of a
group touches only its share: the gather and scatter name the rank as a batching dimension (as
grok1.model.write_each_row does for the contiguous cache's rows), so XLA's partitioner, seeing the pool split
over the rank axis, keeps each rank's reads and writes on its own device, with no collective.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from grok1.config import ModelConfig

FPROP_DTYPE = jnp.bfloat16
ATTN_LOGIT_CAP = 30.0  # as grok1.model: attention logits pass through 30 * tanh(x / 30)
MASKED_LOGIT = -1e30

# Logical axes of the pool's k and v [L, N, bs, Hkv, K], as KV_CACHE_AXES for the contiguous cache.
PAGED_KV_AXES = ("layers", "cache_blocks", "block_positions", "kv_heads", "head_dim")


class PagedRows(NamedTuple):
    """What grok1.model.attention takes as `rows` with a PagedKV cache: table [B, M] the rows' blocks, write
    [B, T] which tokens store their keys and values (not padding, nor a fork's tokens its parent writes)."""

    table: jax.Array
    write: jax.Array


KV_STORAGE = jnp.uint16  # what the caches hold: bfloat16 keys and values as their bits (kv_bits says why)


def kv_bits(x):
    """bfloat16 keys or values as the uint16 bits the caches store (bits pass through unchanged).

    Why bits: XLA:CPU (jax 0.10.2) runs a bfloat16 scatter or dynamic-update-slice by converting the whole
    operand to float32 and back, so writing one token per row converted the whole cache, every layer of every
    step (profiled: 13-38 ms per 4 layers for a [4, 32, 512, 2, 64] cache), while the same scatter on uint16
    is done in place (0.4 ms). A same-width bitcast is free on every backend, and the values are untouched.
    """
    return x if x.dtype == KV_STORAGE else jax.lax.bitcast_convert_type(x, KV_STORAGE)


def kv_values(bits):
    """The bfloat16 values of cache bits (a bfloat16 array passes through unchanged)."""
    return bits if bits.dtype == FPROP_DTYPE else jax.lax.bitcast_convert_type(bits, FPROP_DTYPE)


def kv_like(bits, cache_array):
    """Written bits back in the dtype the caller's cache array had (bits, or bfloat16 for a cache made so)."""
    return bits if cache_array.dtype == KV_STORAGE else kv_values(bits)


def kv_zeros(config: ModelConfig, rows: int, positions: int) -> tuple[jax.Array, jax.Array]:
    """Zero keys and values [L, rows, positions, Hkv, K] (as bits): the contiguous cache's rows are slots and
    positions the sequence's (grok1.model.KVCache); the paged pool's are blocks and a block's positions."""
    shape = (config.num_layers, rows, positions, config.num_kv_heads, config.key_size)
    return jnp.zeros(shape, KV_STORAGE), jnp.zeros(shape, KV_STORAGE)


class PagedKV(NamedTuple):
    """Keys (after RoPE) and values of every layer, in blocks: k, v [L, N, bs, Hkv, K], bfloat16 values held as
    their uint16 bits (kv_bits)."""

    k: jax.Array
    v: jax.Array

    @staticmethod
    def zeros(config: ModelConfig, num_blocks: int, block_size: int) -> "PagedKV":
        return PagedKV(*kv_zeros(config, num_blocks, block_size))

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def copy_pool_blocks(pool: PagedKV, sources, destinations) -> PagedKV:
    """Copy whole blocks (every layer) sources[i] -> destinations[i]; a destination past the pool (or past the
    share) is padding, dropped. sources, destinations [C] are pool ids; [R, C] ids within each rank's share."""
    if sources.ndim == 1:
        return PagedKV(*(a.at[:, destinations].set(a[:, sources], mode="drop") for a in pool))
    ranks = sources.shape[0]
    layers, _, *block = pool.k.shape
    take = jax.lax.GatherDimensionNumbers(  # operand [L, R, N/R, bs, Hkv, K] -> [R, C, L, bs, Hkv, K]
        offset_dims=(2, 3, 4, 5), collapsed_slice_dims=(2,), start_index_map=(2,), operand_batching_dims=(1,),
        start_indices_batching_dims=(0,))
    put = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(2, 3, 4, 5), inserted_window_dims=(2,), scatter_dims_to_operand_dims=(2,),
        operand_batching_dims=(1,), scatter_indices_batching_dims=(0,))

    def copy(array):
        shares = by_rank(array, ranks)
        blocks = jax.lax.gather(shares, sources[..., None], take, (layers, 1, 1, *block),
                                mode=jax.lax.GatherScatterMode.CLIP)
        return jax.lax.scatter(shares, destinations[..., None], blocks, put,
                               mode=jax.lax.GatherScatterMode.FILL_OR_DROP).reshape(array.shape)

    return PagedKV(copy(pool.k), copy(pool.v))


def bucket_kv_len(live: int, block_size: int, limit: int) -> int:
    """The static kv_len for `live` positions: the next power of two of whole blocks, at most `limit`
    (a multiple of block_size). Few buckets, few compiles; at most twice the live positions are read."""
    blocks = max(1, -(-live // block_size))
    return min(block_size * (1 << (blocks - 1).bit_length()), limit)


def by_rank(pool_array, ranks: int):
    """A pool array [L, N, bs, Hkv, K] viewed as [L, R, N/R, bs, Hkv, K]: rank r's share at [:, r]."""
    layers, blocks, *rest = pool_array.shape
    return pool_array.reshape(layers, ranks, blocks // ranks, *rest)


def write_kv(pool: PagedKV, layer_index, table, positions, valid, k, v) -> PagedKV:
    """Write k, v [B, T, Hkv, K] of tokens at positions [B, T] into layer `layer_index` of the pool.

    Invalid tokens (valid [B, T] False: padding), positions outside the table and negative table entries (no
    block) write nothing: they are sent past the pool's end and dropped by the scatter.
    """
    num_blocks, block_size = pool.k.shape[1], pool.k.shape[2]
    index = positions // block_size
    inside = (positions >= 0) & (index < table.shape[1])
    blocks = jnp.take_along_axis(table, jnp.clip(index, 0, table.shape[1] - 1), axis=1)  # [B, T]
    blocks = jnp.where(valid & inside & (blocks >= 0), blocks, num_blocks)
    offsets = positions % block_size
    def put(layer_pool, new):  # in bits: in place (kv_bits)
        return kv_like(kv_bits(layer_pool).at[layer_index, blocks, offsets].set(kv_bits(new), mode="drop"),
                       layer_pool)

    return PagedKV(put(pool.k, k), put(pool.v, v))


def write_kv_ranked(pool: PagedKV, layer_index, table, positions, valid, k, v) -> PagedKV:
    """write_kv with the pool split over ranks: table [R, B/R, M] holds ids within each rank's share; k, v
    [B, T, Hkv, K], positions and valid [B, T] are R groups of rows in rank order."""
    ranks, group, width = table.shape
    steps = positions.shape[1]
    share, block_size = pool.k.shape[1] // ranks, pool.k.shape[2]
    positions, valid = positions.reshape(ranks, group, steps), valid.reshape(ranks, group, steps)
    index = positions // block_size
    inside = (positions >= 0) & (index < width)
    blocks = jnp.take_along_axis(table, jnp.clip(index, 0, width - 1), axis=2)  # [R, B/R, T]
    blocks = jnp.where(valid & inside & (blocks >= 0), blocks, share)  # past the share: dropped
    layer = jnp.broadcast_to(layer_index, blocks.shape)
    indices = jnp.stack([layer, blocks, positions % block_size], axis=-1).reshape(ranks, group * steps, 3)
    numbers = jax.lax.ScatterDimensionNumbers(  # operand [L, R, N/R, bs, Hkv, K]; the rank is a batching dim
        update_window_dims=(2, 3), inserted_window_dims=(0, 2, 3), scatter_dims_to_operand_dims=(0, 2, 3),
        operand_batching_dims=(1,), scatter_indices_batching_dims=(0,))

    def put(layer_pool, new):
        new = kv_bits(new).reshape(ranks, group * steps, *new.shape[2:])
        bits = jax.lax.scatter(by_rank(kv_bits(layer_pool), ranks), indices, new, numbers,
                               mode=jax.lax.GatherScatterMode.FILL_OR_DROP)
        return kv_like(bits.reshape(layer_pool.shape), layer_pool)

    return PagedKV(put(pool.k, k), put(pool.v, v))


def gather_kv(pool: PagedKV, layer_index, table, kv_len: int):
    """Keys and values [B, kv_len, Hkv, K] of each row's first kv_len positions (kv_len static, a multiple of
    the block size). Table entries past a row's blocks may hold anything: those positions are masked."""
    num_blocks, block_size = pool.k.shape[1], pool.k.shape[2]
    assert kv_len % block_size == 0, f"kv_len {kv_len} is not a multiple of the block size {block_size}"
    blocks = jnp.clip(table[:, : kv_len // block_size], 0, num_blocks - 1)  # [B, kv_len / bs]
    batch = table.shape[0]

    def read(layer_pool):
        rows = kv_values(layer_pool[layer_index][blocks])  # [B, n, bs, Hkv, K]
        return rows.reshape(batch, kv_len, *rows.shape[3:])

    return read(pool.k), read(pool.v)


def gather_kv_ranked(pool: PagedKV, layer_index, table, kv_len: int):
    """gather_kv with the pool split over ranks (table [R, B/R, M], ids within each rank's share): keys and
    values [B, kv_len, Hkv, K], the rows in rank order."""
    ranks, group, _ = table.shape
    share, block_size = pool.k.shape[1] // ranks, pool.k.shape[2]
    assert kv_len % block_size == 0, f"kv_len {kv_len} is not a multiple of the block size {block_size}"
    blocks = jnp.clip(table[:, :, : kv_len // block_size], 0, share - 1)[..., None]  # [R, B/R, n, 1]
    numbers = jax.lax.GatherDimensionNumbers(  # operand [R, N/R, bs, Hkv, K]; the rank is a batching dim
        offset_dims=(3, 4, 5), collapsed_slice_dims=(1,), start_index_map=(1,), operand_batching_dims=(0,),
        start_indices_batching_dims=(0,))

    def read(layer_pool):
        shares = by_rank(layer_pool, ranks)[layer_index]  # [R, N/R, bs, Hkv, K]
        rows = jax.lax.gather(shares, blocks, numbers, (1, 1, *shares.shape[2:]),
                              mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)  # [R, B/R, n, bs, Hkv, K]
        return kv_values(rows).reshape(ranks * group, kv_len, *rows.shape[4:])

    return read(pool.k), read(pool.v)


def attend(q, keys, values, positions, multiplier: float):
    """Causal grouped-query attention of q [B, T, H, K] (after RoPE) over keys, values [B, S, Hkv, K], where
    position s of a row is visible from positions[b, t] >= s. Returns [B, T, H*K] in q's dtype. The math of
    grok1.model.attention, for either cache (float32 logits and softmax, the 30 tanh cap)."""
    batch, steps, heads, key_size = q.shape
    kv_heads, kv_len = keys.shape[2], keys.shape[1]
    q = q.reshape(batch, steps, kv_heads, heads // kv_heads, key_size)  # query head h uses kv head h // (H/Hkv)
    logits = jnp.einsum("bthgk,bshk->bhgts", q, keys, preferred_element_type=jnp.float32)
    logits = logits.astype(q.dtype).astype(jnp.float32) * multiplier
    logits = ATTN_LOGIT_CAP * jnp.tanh(logits / ATTN_LOGIT_CAP)
    visible = jnp.arange(kv_len)[None, None, :] <= positions[:, :, None]  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("bhgts,bshk->bthgk", weights, values, preferred_element_type=jnp.float32).astype(q.dtype)
    return out.reshape(batch, steps, heads * key_size)


def paged_attention(q, k, v, pool: PagedKV, layer_index, table, positions, valid, kv_len: int,
                    multiplier: float):
    """The paged kernel: write this step's k, v [B, T, Hkv, K] through the block table, then attend q
    [B, T, H, K] over each row's first kv_len positions. Returns [B, T, H*K] and the updated pool. A table
    [R, B/R, M] splits the pool over R ranks (see the module's docstring)."""
    ranked = table.ndim == 3
    pool = (write_kv_ranked if ranked else write_kv)(pool, layer_index, table, positions, valid, k, v)
    keys, values = (gather_kv_ranked if ranked else gather_kv)(pool, layer_index, table, kv_len)
    return attend(q, keys, values, positions, multiplier), pool
