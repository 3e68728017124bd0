"""Unit tests of grok1.model against slow, obviously correct references (numpy loops, dense one-hot MoE).

All on a small random model (grok1.random_weights.random_params): emb 64, 4/2 heads of 16, 8 experts, top-2.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok1 import model
from grok1.config import ModelConfig
from grok1.params import QuantizedWeight, dequantize
from grok1.random_weights import random_params
from tests.conftest import assert_close, relative_l2

SMALL = ModelConfig(vocab_size=256, sequence_len=128, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2,
                    num_layers=2, widening_factor=8.0, num_experts=8, num_selected_experts=2,
                    attn_output_multiplier=0.25)
GROUPED_SCALES = {"ffn_gelu_in": 4, "ffn_value_in": 4, "ffn_out": 8, "q_proj": 4, "o_proj": 4}


@functools.lru_cache(maxsize=None)
def small_params(grouped: bool = False):
    params = random_params(SMALL, seed=3, scale_groups=GROUPED_SCALES if grouped else None)
    return jax.tree.map(jnp.asarray, params)


def layer0(params):
    return jax.tree.map(lambda a: a[0], params["layers"])


def random_bf16(rng: np.random.Generator, *shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32).astype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------ references


def np_dense(w) -> np.ndarray:
    """A (possibly quantised) matrix [K, N] in float32, by explicit loop over scale groups."""
    if not isinstance(w, QuantizedWeight):
        return np.asarray(w, np.float32)
    weight = np.asarray(w.weight).astype(np.float32)
    scales = np.asarray(w.scales).astype(np.float32)
    k = weight.shape[0]
    groups = scales.shape[0]
    out = np.empty_like(weight)
    rows = k // groups
    for g in range(groups):
        out[g * rows:(g + 1) * rows] = weight[g * rows:(g + 1) * rows] * scales[g]
    return out


def np_expert(w, e) -> np.ndarray:
    """Expert e's matrix of a stacked [E, K, N] weight, in float32."""
    if isinstance(w, QuantizedWeight):
        return np_dense(QuantizedWeight(np.asarray(w.weight)[e], np.asarray(w.scales)[e]))
    return np.asarray(w, np.float32)[e]


def np_gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_gate_probs(x, gate_w) -> np.ndarray:
    logits = np.asarray(x, np.float64) @ np.asarray(gate_w, np.float64)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)


def reference_moe(x, layer, config: ModelConfig, valid=None, experts=None):
    """Loop over tokens and their experts: sum_j gate_j * (gelu(x W_j) * (x V_j)) W1_j, in float32/64.

    x [N, D]; experts [N, k] forces the choice (gates are still the gate's probabilities there).
    Returns the output [N, D] and the experts used [N, k].
    """
    x = np.asarray(x, np.float32)
    n, d = x.shape
    probs = np_gate_probs(x, layer["gate"])
    if experts is None:
        experts = np.argsort(-probs, axis=-1, kind="stable")[:, :config.num_selected_experts]
    valid = np.ones(n, bool) if valid is None else np.asarray(valid)
    out = np.zeros((n, d), np.float32)
    weights = {}  # expert -> its three matrices, dequantised when first needed
    for token in range(n):
        if not valid[token]:
            continue
        for e in experts[token]:
            if e not in weights:
                weights[e] = [np_expert(layer[name], e) for name in ("ffn_gelu_in", "ffn_value_in", "ffn_out")]
            w_gelu, w_value, w_out = weights[e]
            hidden = np_gelu_tanh(x[token] @ w_gelu) * (x[token] @ w_value)
            out[token] += probs[token, e] * (hidden @ w_out)
    return out, experts


def np_rotary(x, positions, base=10000.0):
    """RoPE, rotate-half convention, written as a rotation of each pair (i, i + K/2) by pos * base^(-2i/K)."""
    x = np.asarray(x, np.float64)
    half = x.shape[-1] // 2
    out = np.empty_like(x)
    for i in range(half):
        angle = np.asarray(positions, np.float64)[:, :, None] * base ** (-2.0 * i / x.shape[-1])  # [B, T, 1]
        a, b = x[..., i], x[..., i + half]
        out[..., i] = a * np.cos(angle) - b * np.sin(angle)
        out[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
    return out


# ------------------------------------------------------------------------------------------- jitted fns


@functools.partial(jax.jit, static_argnames=("config", "block"))
def _moe(x, layer, valid, override, *, config, block):
    return model.moe(x, layer, config, valid, block, override)


@functools.partial(jax.jit, static_argnames=("config",))
def _full_forward(params, tokens, *, config):
    return model.full_forward(params, config, tokens).logits


# ------------------------------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("grouped", [False, True], ids=["per-channel-scales", "grouped-scales"])
def test_moe_matches_loop_over_experts(grouped):
    params = small_params(grouped)
    layer = layer0(params)
    rng = np.random.default_rng(0)
    x = random_bf16(rng, 2, 24, SMALL.emb_size)
    out, experts = _moe(x, layer, np.ones((2, 24), bool), None, config=SMALL, block=8)
    expected, expected_experts = reference_moe(x.reshape(48, -1), layer, SMALL)
    np.testing.assert_array_equal(np.asarray(experts).reshape(48, 2), expected_experts)
    out = np.asarray(out, np.float32).reshape(48, -1)
    error = relative_l2(out, expected)
    assert error < 0.01, f"MoE vs loop-over-experts reference: relative L2 {error:.4%}"
    # bfloat16 activations and weights: errors of a few bfloat16 steps at the output's scale.
    assert_close(out, expected, rtol=2e-2, atol=1e-2 * float(np.abs(expected).max()), name="moe output")


def test_moe_invalid_tokens_are_zero_and_do_not_disturb_valid_ones():
    layer = layer0(small_params())
    rng = np.random.default_rng(1)
    x = random_bf16(rng, 2, 24, SMALL.emb_size)
    valid = rng.random((2, 24)) < 0.6
    masked, _ = _moe(x, layer, valid, None, config=SMALL, block=8)
    full, _ = _moe(x, layer, np.ones_like(valid), None, config=SMALL, block=8)
    masked, full = np.asarray(masked, np.float32), np.asarray(full, np.float32)
    assert (masked[~valid] == 0).all(), "invalid tokens must get a zero MoE output"
    np.testing.assert_array_equal(masked[valid], full[valid],
                                  err_msg="valid tokens' outputs changed when other tokens were masked")
    expected, _ = reference_moe(x.reshape(48, -1), layer, SMALL, valid=valid.reshape(-1))
    assert relative_l2(masked.reshape(48, -1), expected) < 0.01


def test_moe_block_size_invariance():
    layer = layer0(small_params())
    x = random_bf16(np.random.default_rng(2), 1, 20, SMALL.emb_size)
    valid = np.ones((1, 20), bool)
    outputs = {block: np.asarray(_moe(x, layer, valid, None, config=SMALL, block=block)[0], np.float32)
               for block in (1, 8, 16)}
    # The MoE's output is float32 (see model.combine); other block sizes are other matmul shapes, whose
    # float32 sums may differ in the last bit, never by more.
    for block in (8, 16):
        np.testing.assert_allclose(outputs[block], outputs[1], rtol=4e-7 * 32, atol=1e-7,
                                   err_msg=f"MoE output differs between block {block} and block 1")


def test_moe_routing_override():
    """Forced experts are used as given; the gates are the gate's probabilities at those experts."""
    layer = layer0(small_params())
    rng = np.random.default_rng(4)
    x = random_bf16(rng, 1, 16, SMALL.emb_size)
    forced = np.stack([rng.permutation(SMALL.num_experts)[:2] for _ in range(16)]).astype(np.int32)
    out, experts = _moe(x, layer, np.ones((1, 16), bool), forced[None], config=SMALL, block=8)
    np.testing.assert_array_equal(np.asarray(experts)[0], forced)
    expected, _ = reference_moe(x[0], layer, SMALL, experts=forced)
    assert relative_l2(np.asarray(out, np.float32)[0], expected) < 0.01


def test_gates_are_gate_probabilities():
    layer = layer0(small_params())
    rng = np.random.default_rng(5)
    x = random_bf16(rng, 32, SMALL.emb_size)
    probs = np_gate_probs(x.astype(np.float32), layer["gate"])
    gates, index = model.select_experts(jnp.asarray(x), layer["gate"], 2)
    expected_index = np.argsort(-probs, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.asarray(index), expected_index)
    assert_close(gates, np.take_along_axis(probs, expected_index, -1), rtol=1e-5, atol=1e-6, name="free gates")
    forced = np.stack([rng.permutation(SMALL.num_experts)[:2] for _ in range(32)]).astype(np.int32)
    gates, index = model.select_experts(jnp.asarray(x), layer["gate"], 2, override=jnp.asarray(forced))
    np.testing.assert_array_equal(np.asarray(index), forced)
    assert_close(gates, np.take_along_axis(probs, forced, -1), rtol=1e-5, atol=1e-6, name="forced gates")


# -------------------------------------------------------------------------------------------- dispatch


def check_dispatch(expert_index: np.ndarray, valid: np.ndarray, num_experts: int, block: int):
    plan = model.plan_dispatch(jnp.asarray(expert_index), jnp.asarray(valid), num_experts, block)
    slot = np.asarray(plan.slot)
    start = np.asarray(plan.group_start)
    blocks = np.asarray(plan.group_blocks)
    rows = plan.rows
    n, k = expert_index.shape
    assert slot.shape == (n * k,)
    assert rows % block == 0, f"buffer of {rows} rows is not whole blocks of {block}"
    experts = expert_index.reshape(-1)
    assigned = np.repeat(valid, k)
    # Dropped assignments point one past the buffer.
    assert (slot[~assigned] == rows).all()
    # Every kept assignment has its own row ...
    kept = slot[assigned]
    assert (kept >= 0).all() and (kept < rows).all()
    assert len(np.unique(kept)) == len(kept), "two assignments share a buffer row"
    # ... inside its expert's group, which starts on a block boundary and holds exactly its tokens.
    counts = np.bincount(experts[assigned], minlength=num_experts)
    np.testing.assert_array_equal(blocks, -(-counts // block))
    assert (start % block == 0).all()
    for e in range(num_experts):
        mine = slot[assigned & (experts == e)]
        assert ((mine >= start[e]) & (mine < start[e] + blocks[e] * block)).all(), f"expert {e} outside its group"
    # Groups do not overlap and fit in the buffer.
    order = np.argsort(start, kind="stable")
    ends = start + blocks * block
    used = order[blocks[order] > 0]
    assert (ends[used][:-1] <= start[used][1:]).all(), "expert groups overlap"
    assert ends.max(initial=0) <= rows
    return plan


@pytest.mark.parametrize("block", [1, 4, 16])
def test_plan_dispatch_random_routing(block):
    rng = np.random.default_rng(block)
    n, e = 37, 8
    experts = np.stack([rng.permutation(e)[:2] for _ in range(n)]).astype(np.int32)
    check_dispatch(experts, np.ones(n, bool), e, block)
    check_dispatch(experts, rng.random(n) < 0.5, e, block)


@pytest.mark.parametrize("block", [1, 4, 16])
def test_plan_dispatch_skewed_routing(block):
    n, e = 29, 8
    all_to_two = np.tile(np.array([[3, 5]], np.int32), (n, 1))  # every token to experts 3 and 5
    plan = check_dispatch(all_to_two, np.ones(n, bool), e, block)
    assert np.asarray(plan.group_blocks)[[3, 5]].tolist() == [-(-n // block)] * 2
    all_to_one = np.full((n, 2), 6, np.int32)  # degenerate: every assignment to expert 6
    check_dispatch(all_to_one, np.ones(n, bool), e, block)
    plan = check_dispatch(all_to_one, np.zeros(n, bool), e, block)  # nothing valid: nothing computed
    assert (np.asarray(plan.group_blocks) == 0).all()


def test_expert_ffn_grouped_matches_dense_one_hot():
    """Grouped per-expert blocks equal running every expert on every token and selecting by one-hot."""
    layer = layer0(small_params(grouped=True))
    rng = np.random.default_rng(6)
    n, k, e, block = 30, 2, SMALL.num_experts, 4
    x = jnp.asarray(random_bf16(rng, n, SMALL.emb_size))
    experts = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
    experts[:12] = [2, 5]  # a crowded pair of experts, and (probably) some experts with no tokens
    plan = model.plan_dispatch(jnp.asarray(experts), jnp.ones(n, bool), e, block)
    token_of = np.repeat(np.arange(n), k)
    x_sorted = jnp.zeros((plan.rows + 1, SMALL.emb_size), x.dtype).at[plan.slot].set(x[token_of])[:-1]
    y_sorted = np.asarray(model.expert_ffn_grouped(x_sorted, plan, layer["ffn_gelu_in"], layer["ffn_value_in"],
                                                   layer["ffn_out"], block))
    # The reference's way: all experts on all tokens (same dtypes, same int8 products), then a one-hot selection.
    def every_expert(x, w):  # [E, N, out] float32
        return jax.vmap(lambda w: model.weight_matmul(x, w))(w)
    gelu_in = every_expert(x, layer["ffn_gelu_in"]).astype(jnp.bfloat16).astype(jnp.float32)
    value_in = every_expert(x, layer["ffn_value_in"]).astype(jnp.bfloat16).astype(jnp.float32)
    hidden = jax.nn.gelu(gelu_in, approximate=True) * value_in  # [E, N, F]
    all_out = jax.vmap(model.weight_matmul)(hidden, layer["ffn_out"])  # [E, N, D]
    one_hot = jax.nn.one_hot(experts, e, dtype=jnp.float32)  # [N, k, E]
    expected = np.asarray(jnp.einsum("nke,end->nkd", one_hot, all_out)).reshape(n * k, -1)
    slot = np.asarray(plan.slot)
    assert_close(y_sorted[slot], expected, rtol=1e-3, atol=1e-3 * float(np.abs(expected).max()),
                 name="grouped expert output")
    padding = np.setdiff1d(np.arange(plan.rows), slot)
    assert (y_sorted[padding] == 0).all(), "padding rows of the buffer must stay zero"


# ----------------------------------------------------------------------------------------------- model


@functools.partial(jax.jit, static_argnames="block")
def _grouped_rows(x, experts, layer, block):
    """expert_ffn_grouped's output row of each assignment, in assignment order [N*k, D]."""
    plan = model.plan_dispatch(experts, jnp.ones(experts.shape[0], bool), SMALL.num_experts, block)
    token_of = jnp.repeat(jnp.arange(experts.shape[0]), experts.shape[1])
    x_sorted = jnp.zeros((plan.rows + 1, SMALL.emb_size), x.dtype).at[plan.slot].set(x[token_of])[:-1]
    y = model.expert_ffn_grouped(x_sorted, plan, layer["ffn_gelu_in"], layer["ffn_value_in"], layer["ffn_out"],
                                 block)
    return y[plan.slot]


def test_row_tiers():
    assert model.row_tiers(16) == (2, 4, 8, 16)
    assert model.row_tiers(4) == (2, 4)
    assert model.row_tiers(2) == (2,)


def test_an_expert_result_is_the_same_in_every_row_tier():
    """Experts holding 1, 2, 3, 5, 8, 9 and 17 tokens (every tier of block 8, and the looped block) give each
    token what the same token gets alone, to float32 rounding of the product's summation order."""
    layer = layer0(small_params(grouped=True))
    rng = np.random.default_rng(11)
    per_expert = [1, 2, 3, 5, 8, 9, 17, 0]
    experts = np.concatenate([np.full(c, i) for i, c in enumerate(per_expert)]).astype(np.int32)
    experts = experts[:, None]  # k = 1: each expert's count is exactly its tokens
    n = len(experts)
    x = jnp.asarray(random_bf16(rng, n, SMALL.emb_size))
    together = np.asarray(_grouped_rows(x, jnp.asarray(experts), layer, block=8))
    alone = np.concatenate([_grouped_rows(x[i:i + 1], jnp.asarray(experts[i:i + 1]), layer, block=8)
                            for i in range(n)])
    assert_close(together, alone, rtol=1e-5, atol=1e-5 * float(np.abs(alone).max()), name="tiered expert rows")


def test_one_token_per_expert_runs_two_row_products_not_a_whole_block():
    """A decode step at batch 1 sends one token to each of two experts: the compiled program must hold [2, D]
    expert products (the smallest tier) for that, not only products over the whole block of 16 rows."""
    layer = layer0(small_params(grouped=True))
    block, n = 16, 3
    experts = jnp.zeros((n, 2), jnp.int32)
    plan = jax.jit(lambda e: model.plan_dispatch(e, jnp.ones(n, bool), SMALL.num_experts, block))(experts)

    def ffn(x_sorted, plan):
        return model.expert_ffn_grouped(x_sorted, plan, layer["ffn_gelu_in"], layer["ffn_value_in"],
                                        layer["ffn_out"], block)
    x_sorted = jnp.zeros((plan.rows, SMALL.emb_size), jnp.bfloat16)
    hlo = jax.jit(ffn).lower(x_sorted, plan).compile().as_text()
    product_rows = {int(m) for m in re.findall(r"= f32\[(\d+),\d+\]\{1,0\} (?:dot|fusion)\(", hlo)}
    assert 2 in product_rows, f"no two-row expert product in the program (products over {sorted(product_rows)} rows)"


def test_forward_batch_invariance():
    """A row's logits do not depend on what else is in the batch (free routing): bitwise."""
    params = small_params()
    rng = np.random.default_rng(7)
    rows = rng.integers(0, SMALL.vocab_size, size=(5, 12)).astype(np.int32)
    batch_a = _full_forward(params, rows[[0, 1, 2]], config=SMALL)
    batch_b = _full_forward(params, rows[[3, 1, 4]], config=SMALL)
    alone = _full_forward(params, rows[[1]], config=SMALL)
    np.testing.assert_array_equal(np.asarray(batch_a[1]), np.asarray(alone[0]),
                                  err_msg="row 1's logits change when batched with rows 0 and 2")
    np.testing.assert_array_equal(np.asarray(batch_b[1]), np.asarray(alone[0]),
                                  err_msg="row 1's logits change when batched with rows 3 and 4")
    np.testing.assert_array_equal(np.asarray(batch_a[0]), np.asarray(_full_forward(params, rows[[0]],
                                                                                   config=SMALL)[0]))


# ---------------------------------------------------------------------------------------------- basics


def test_rotary_matches_numpy_pair_rotation():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 6, 3, 16), dtype=np.float32)
    positions = np.stack([np.arange(6), rng.integers(0, 8192, size=6)]).astype(np.int32)
    out = np.asarray(model.rotary(jnp.asarray(x), jnp.asarray(positions)))
    expected = np_rotary(x, positions)
    # float32 phases at positions up to 8191 are good to ~5e-4 rad.
    assert_close(out, expected, rtol=0, atol=2e-3 * float(np.abs(x).max()), name="rotary")
    assert_close(out[0], expected[0], rtol=1e-5, atol=1e-5, name="rotary at small positions")
    # A rotation: norms are preserved, per head and per (i, i + K/2) pair.
    assert_close(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5, atol=1e-5,
                 name="rotary norms")
    # Position 0 is the identity; scores depend only on relative position.
    np.testing.assert_allclose(out[0, 0], x[0, 0], rtol=0, atol=0)
    q, k = jnp.asarray(x[:1, :1, :1]), jnp.asarray(x[1:, :1, :1])
    scores = [float(jnp.sum(model.rotary(q, jnp.array([[m + 5]])) * model.rotary(k, jnp.array([[m]]))))
              for m in (0, 10, 100)]
    np.testing.assert_allclose(scores, scores[0], rtol=1e-4)


def test_rotary_keeps_dtype():
    x = jnp.asarray(random_bf16(np.random.default_rng(9), 1, 4, 2, 16))
    assert model.rotary(x, jnp.arange(4)[None]).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_rms_norm_matches_numpy(dtype):
    rng = np.random.default_rng(10)
    x = (3.0 * rng.standard_normal((4, 5, 64), dtype=np.float32)).astype(dtype)
    scale = (1.0 + 0.1 * rng.standard_normal(64, dtype=np.float32))
    out = model.rms_norm(jnp.asarray(x), jnp.asarray(scale))
    assert out.dtype == x.dtype
    x64 = x.astype(np.float64)
    expected = scale * x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-5)
    assert_close(np.asarray(out), expected.astype(dtype), name=f"rms_norm {np.dtype(dtype).name}")


def test_dequantize_grouped_scales_numpy_and_jax_equal_the_loop():
    """params.dequantize, the one dequantisation (checkpoint loading, tests), for numpy and jax arrays."""
    rng = np.random.default_rng(11)
    weight = rng.integers(-127, 128, size=(3, 32, 24), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, size=(3, 4, 24)) / 100).astype(ml_dtypes.bfloat16)  # G = 4
    quantised_np = QuantizedWeight(weight, scales)
    quantised_jnp = QuantizedWeight(jnp.asarray(weight), jnp.asarray(scales))
    for dtype in (np.float32, ml_dtypes.bfloat16):
        ours = np.asarray(dequantize(quantised_jnp, dtype))
        assert ours.dtype == dtype
        np.testing.assert_array_equal(ours, dequantize(quantised_np, dtype=dtype))
    # Against the explicit per-group loop (int8 * bf16 is exact in float32; the reference rounds to bf16).
    loop = np.stack([np_dense(QuantizedWeight(weight[e], scales[e])) for e in range(3)])
    np.testing.assert_array_equal(np.asarray(dequantize(quantised_jnp, np.float32)),
                                  loop.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("groups", [1, 4])
def test_weight_matmul_applies_the_scales_to_the_int8_product(groups):
    """(x @ int8) * s per scale group, summed: equal to float64 x @ (int8 * s) up to float32 accumulation, and
    within bfloat16 rounding of the reference's dequantise-first product."""
    rng = np.random.default_rng(12)
    weight = rng.integers(-127, 128, size=(32, 24), dtype=np.int8)
    scales = (rng.uniform(0.5, 2.0, size=(groups, 24)) / 100).astype(ml_dtypes.bfloat16)
    w = QuantizedWeight(jnp.asarray(weight), jnp.asarray(scales))
    x = random_bf16(rng, 5, 32)
    ours = np.asarray(jax.jit(model.weight_matmul)(jnp.asarray(x), w))
    assert ours.dtype == np.float32
    exact = x.astype(np.float64) @ np_dense(QuantizedWeight(weight, scales)).astype(np.float64)
    assert_close(ours, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max(), name="scale after the int8 product")
    dequantised_first = x.astype(np.float32) @ np.asarray(dequantize(w, jnp.bfloat16), np.float32)
    assert_close(ours, dequantised_first, rtol=2e-2, atol=1e-2 * np.abs(exact).max(), name="vs dequantise first")
    plain = rng.standard_normal((32, 24)).astype(np.float32)  # a plain weight is cast to x's dtype
    np.testing.assert_allclose(np.asarray(model.weight_matmul(jnp.asarray(x), jnp.asarray(plain))),
                               x.astype(np.float32) @ plain.astype(ml_dtypes.bfloat16).astype(np.float32),
                               rtol=1e-5, atol=1e-5)


def test_rounding_to_bfloat16_in_float32_equals_the_conversion_pair():
    """Every float32 bit pattern class: ties either way, carries into the exponent, the largest values (which
    round to infinity), subnormals, zeros of both signs, infinities, NaNs."""
    rng = np.random.default_rng(0)
    patterns = np.concatenate([
        rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32),
        np.asarray([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3FFFFFFF, 0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF,
                    0x00000001, 0x00008000, 0x00018000, 0x807FFFFF, 0x00000000, 0x80000000, 0x7F800000,
                    0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FBFFFFF], np.uint32)])
    x = jnp.asarray(patterns.view(np.float32))
    got = np.asarray(jax.jit(model.round_to_bfloat16)(x))
    want = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32))
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_float32_unembedding_holds_the_bfloat16_logits():
    """decode_sample asks unembed for float32: the same values as the bfloat16 logits, bit for bit."""
    config = ModelConfig(vocab_size=4096, pad_token=0, eos_token=2, sequence_len=64, emb_size=64, key_size=16,
                         num_q_heads=4, num_kv_heads=2, num_layers=1, widening_factor=2.0, num_experts=8,
                         num_selected_experts=2, attn_output_multiplier=0.25, embedding_multiplier_scale=1.0,
                         output_multiplier_scale=0.5773502691896257)
    params = jax.tree.map(jnp.asarray, random_params(config))
    for rows in (1, 5):
        h = jax.random.normal(jax.random.PRNGKey(rows), (rows, 1, config.emb_size), jnp.bfloat16) * 4
        wide = jax.jit(lambda p, h: model.unembed(p, h, config, jnp.float32))(params, h)
        narrow = jax.jit(lambda p, h: model.unembed(p, h, config))(params, h)
        assert wide.dtype == jnp.float32 and narrow.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(wide), np.asarray(narrow.astype(jnp.float32)))
