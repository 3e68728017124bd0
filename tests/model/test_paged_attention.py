"""Paged attention (grok1/paged_attention.py) against the contiguous attention of grok1/model.py.

The same projections, positions and prompts go through both: model.attention over a [L, B, S, Hkv, K] cache,
and paged_attention over a block pool whose blocks are handed out in a scrambled order (so that a row's
positions are not contiguous in memory, and the two rows' blocks interleave). Outputs must be equal bit for bit,
and each row must read back exactly the keys and values the contiguous cache holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grok1 import model
from grok1.paged_attention import PagedKV, bucket_kv_len, copy_pool_blocks, gather_kv, paged_attention
from tests.model.test_model import SMALL, layer0, random_bf16, small_params

BLOCK = 8
NUM_BLOCKS = 24
MAX_BLOCKS = 8  # per row: 64 positions


def project(x, layer, positions):
    """q, k, v of model.attention, before any cache (after RoPE)."""
    batch, steps, _ = x.shape
    c = SMALL
    q = model.linear(x, layer["q_proj"]).reshape(batch, steps, c.num_q_heads, c.key_size)
    k = model.linear(x, layer["k_proj"]).reshape(batch, steps, c.num_kv_heads, c.key_size)
    v = model.linear(x, layer["v_proj"]).reshape(batch, steps, c.num_kv_heads, c.key_size)
    return model.rotary(q, positions), model.rotary(k, positions), v


def paged(x, layer, positions, valid, pool, table, kv_len):
    q, k, v = project(x, layer, positions)
    out, pool = paged_attention(q, k, v, pool, 1, table, positions, valid, kv_len, SMALL.attn_output_multiplier)
    return model.linear(out, layer["o_proj"]), pool


def scrambled_tables(rows: int) -> np.ndarray:
    """Row r owns blocks perm[r::rows]: interleaved, out of order. Unused entries are -1."""
    perm = np.random.default_rng(5).permutation(NUM_BLOCKS)
    table = np.full((rows, MAX_BLOCKS), -1, np.int32)
    for r in range(rows):
        mine = perm[r::rows][:MAX_BLOCKS]
        table[r, : len(mine)] = mine
    return table


@pytest.fixture(scope="module")
def setup():
    params = small_params()
    layer = layer0(params)
    rng = np.random.default_rng(11)
    lengths = np.array([37, 20])  # 5 and 3 blocks: the last ones partial
    steps = 40
    x = jnp.asarray(random_bf16(rng, 2, steps, SMALL.emb_size))
    positions = jnp.broadcast_to(jnp.arange(steps), (2, steps))
    valid = positions < jnp.asarray(lengths)[:, None]
    return layer, x, positions, valid, lengths, jnp.asarray(scrambled_tables(2)), rng


def contiguous_prefill(layer, x, positions, length):
    cache = model.KVCache(*(jnp.zeros((2, 2, length, SMALL.num_kv_heads, SMALL.key_size), jnp.bfloat16)
                            for _ in range(2)))
    return model.attention(x, layer, SMALL, positions, cache, 1, jnp.arange(2), x.shape[1])


@pytest.mark.parametrize("kv_len", [40, 64], ids=["exact-length", "bucketed"])
def test_prefill_over_several_blocks_equals_contiguous(setup, kv_len):
    layer, x, positions, valid, lengths, table, _ = setup
    expected, cache = contiguous_prefill(layer, x, positions, 64)
    pool = PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK)
    got, pool = paged(x, layer, positions, valid, pool, table, kv_len)
    for row, length in enumerate(lengths):
        np.testing.assert_array_equal(np.asarray(got[row, :length]), np.asarray(expected[row, :length]))
        keys, values = gather_kv(pool, 1, table, 64)
        np.testing.assert_array_equal(np.asarray(keys[row, :length]), np.asarray(cache.k[1, row, :length]))
        np.testing.assert_array_equal(np.asarray(values[row, :length]), np.asarray(cache.v[1, row, :length]))
    # Padding wrote nothing: only the blocks covering each row's valid positions were touched.
    touched = {int(b) for b in np.nonzero(np.asarray(jnp.any(pool.k[1] != 0, axis=(1, 2, 3))))[0]}
    owned = {int(table[r, i]) for r, n in enumerate(lengths) for i in range(-(-n // BLOCK))}
    assert touched == owned
    assert not np.asarray(pool.k[0]).any()  # other layers untouched


def test_decode_after_prefill_equals_contiguous(setup):
    layer, x, positions, valid, lengths, table, rng = setup
    _, cache = contiguous_prefill(layer, x, positions, 64)
    pool = PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK)
    _, pool = paged(x, layer, positions, valid, pool, table, 64)
    for step in range(3):  # a few tokens: row 1 crosses into its 4th block (position 24)
        new = jnp.asarray(random_bf16(rng, 2, 1, SMALL.emb_size))
        at = jnp.asarray(lengths + step)[:, None]
        expected, cache = model.attention(new, layer, SMALL, at, cache, 1, None, 64)
        live = int(lengths.max()) + step + 1
        got, pool = paged(new, layer, at, jnp.ones((2, 1), bool), pool, table, bucket_kv_len(live, BLOCK, 64))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_chunked_prefill_equals_one_shot(setup):
    """A 37-token prompt prefilled as chunks of 16, 16 and 5 gives the one-shot outputs, token for token."""
    layer, x, positions, valid, lengths, table, _ = setup
    expected, _ = contiguous_prefill(layer, x, positions, 64)
    pool = PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK)
    row = slice(0, 1)
    pieces = []
    for start, stop in [(0, 16), (16, 32), (32, 37)]:
        width = 16
        chunk_positions = jnp.arange(start, start + width)[None]
        chunk_valid = chunk_positions < stop
        chunk_x = jnp.pad(x[row, start:stop], ((0, 0), (0, width - (stop - start)), (0, 0)))
        out, pool = paged(chunk_x, layer, chunk_positions, chunk_valid, pool, table[row],
                          bucket_kv_len(start + width, BLOCK, 64))
        pieces.append(out[:, : stop - start])
    got = jnp.concatenate(pieces, axis=1)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(expected[0, :37]))


def test_shared_prefix_blocks_are_read_not_written():
    """Two rows whose tables start with the same block (a prefix hit) read it; only the suffix is written."""
    params = small_params()
    layer = layer0(params)
    rng = np.random.default_rng(2)
    prompt_x = jnp.asarray(random_bf16(rng, 1, 12, SMALL.emb_size))
    positions = jnp.arange(12)[None]
    pool = PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK)
    first = jnp.asarray([[3, 7] + [-1] * (MAX_BLOCKS - 2)], jnp.int32)
    expected, pool = paged(prompt_x, layer, positions, jnp.ones((1, 12), bool), pool, first, 16)
    shared_block = np.asarray(pool.k[1, 3])
    # The second sequence shares block 3 (positions 0-7) and prefills only positions 8-11 into its own block 9.
    second = jnp.asarray([[3, 9] + [-1] * (MAX_BLOCKS - 2)], jnp.int32)
    suffix = jnp.pad(prompt_x[:, 8:], ((0, 0), (0, 4), (0, 0)))
    suffix_positions = jnp.arange(8, 16)[None]
    got, pool = paged(suffix, layer, suffix_positions, suffix_positions < 12, pool, second, 16)
    np.testing.assert_array_equal(np.asarray(got[0, :4]), np.asarray(expected[0, 8:]))
    np.testing.assert_array_equal(np.asarray(pool.k[1, 3]), shared_block)


def test_bucket_kv_len():
    assert [bucket_kv_len(n, 16, 8192) for n in (1, 16, 17, 33, 100, 8000, 9000)] == [
        16, 16, 32, 64, 128, 8192, 8192]
    assert bucket_kv_len(100, 16, 96) == 96  # never past the limit


def test_jitted_paged_attention_compiles_once_per_kv_len(setup):
    layer, x, positions, valid, lengths, table, _ = setup
    q, k, v = project(x, layer, positions)
    fn = jax.jit(paged_attention, static_argnames=("kv_len", "multiplier"))
    pool = PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK)
    eager, _ = paged_attention(q, k, v, pool, 1, table, positions, valid, 64, SMALL.attn_output_multiplier)
    jitted, _ = fn(q, k, v, pool, 1, table, positions, valid, kv_len=64, multiplier=SMALL.attn_output_multiplier)
    np.testing.assert_array_equal(np.asarray(jitted), np.asarray(eager))


def test_a_pool_split_over_ranks_gives_the_whole_pools_outputs_and_keeps_each_row_in_its_share(setup):
    """Two ranks of 12 blocks: row 0's blocks in rank 0's share, row 1's in rank 1's. The table given per rank
    ([R, B/R, M], ids within the share) gives the one-pool kernel's outputs and pool bit for bit, prefill and
    then decode, and each row's writes land in its own share only."""
    layer, x, positions, valid, lengths, _, rng = setup
    share = NUM_BLOCKS // 2
    perm = np.random.default_rng(9).permutation(share)
    table = np.full((2, MAX_BLOCKS), -1, np.int32)
    table[0, :5], table[1, :3] = perm[:5], share + perm[5:8]  # global ids, rank-major
    local = np.where(table >= 0, table % share, -1).reshape(2, 1, MAX_BLOCKS)
    whole, ranked = PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK), PagedKV.zeros(SMALL, NUM_BLOCKS, BLOCK)
    expected, whole = paged(x, layer, positions, valid, whole, jnp.asarray(table), 64)
    got, ranked = paged(x, layer, positions, valid, ranked, jnp.asarray(local), 64)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(ranked.k), np.asarray(whole.k))
    np.testing.assert_array_equal(np.asarray(ranked.v), np.asarray(whole.v))
    written = np.asarray(jnp.any(ranked.k[1] != 0, axis=(1, 2, 3)))
    assert written[:share].sum() == 5 and written[share:].sum() == 3
    new = jnp.asarray(random_bf16(rng, 2, 1, SMALL.emb_size))
    at = jnp.asarray(lengths)[:, None]
    expected, _ = paged(new, layer, at, jnp.ones((2, 1), bool), whole, jnp.asarray(table), 64)
    got, _ = paged(new, layer, at, jnp.ones((2, 1), bool), ranked, jnp.asarray(local), 64)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_block_copies_per_rank_equal_the_same_copies_in_one_pool():
    """Copy-on-write within each rank's share ([R, C] ids within the share, padding past it) moves the same
    bytes as the global copies in one pool, and nothing else."""
    rng = np.random.default_rng(4)
    shape = (2, NUM_BLOCKS, BLOCK, SMALL.num_kv_heads, SMALL.key_size)
    pool = PagedKV(*(jnp.asarray(rng.integers(0, 1 << 16, shape), jnp.uint16) for _ in range(2)))
    share = NUM_BLOCKS // 2
    expected = copy_pool_blocks(pool, jnp.asarray([1, 14, 15]), jnp.asarray([3, 20, 12]))
    sources = jnp.asarray([[1, 0], [2, 3]], jnp.int32)  # rank 0: 1 -> 3 (and padding); rank 1: 14 -> 20, 15 -> 12
    destinations = jnp.asarray([[3, share], [8, 0]], jnp.int32)
    got = copy_pool_blocks(pool, sources, destinations)
    for got_array, expected_array, before in zip(got, expected, pool):
        np.testing.assert_array_equal(np.asarray(got_array), np.asarray(expected_array))
        assert not np.array_equal(np.asarray(got_array), np.asarray(before))
