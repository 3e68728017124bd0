"""Expert-parallel top-2 MoE: tokens go to the ranks that own their experts and come back, by all-to-all.

Named steps, each run on every rank inside one `shard_map` (tokens split over `ep`, replicated over `tp`):
1. gate      — the gate picks two experts per local token (float32 softmax, raw gates);
2. dispatch  — each (token, expert) assignment is written into a send buffer [ep, C, D] at
               (owner rank, its rank among assignments to that owner); C is the per-pair capacity;
3. exchange  — `all_to_all` over `ep`: every rank receives the rows for its own experts (with their expert
               ids in one extra column: one collective, not two);
4. experts   — the received rows run through the local experts (grouped, as the single-device path), each
               `tp` rank on its slice of the FFN, partial sums all-reduced over `tp`;
5. return    — `all_to_all` back, then combine: sum over the two choices of gate x expert output.

`ragged_all_to_all` is not implemented on XLA:CPU, so the buffers are padded to a fixed capacity. The default
is dropless (C = every local assignment could go to one rank). With a capacity factor, assignments over
capacity are dropped, reported as expert -1 in the returned expert index and counted, never silently.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from grok1 import model
from sharding.mesh_shape import EP, TP
from sharding.rules import layer_specs, logical_spec

MOE_PARAMS = ("gate", "ffn_gelu_in", "ffn_value_in", "ffn_out")


def capacity(local_tokens: int, num_selected: int, experts_per_rank: int, ep: int,
             capacity_factor: float | None, distinct_experts: bool = True) -> int:
    """Rows each rank may send to each other rank. Dropless: all of a rank's assignments to one owner.

    A gate's top-k picks distinct experts, so one token sends at most experts_per_rank rows to one owner;
    a forced routing (tests) may repeat an expert, so then every choice counts.
    """
    per_token = min(num_selected, experts_per_rank) if distinct_experts else num_selected
    dropless = local_tokens * per_token
    if capacity_factor is None:
        return dropless
    return max(1, min(dropless, math.ceil(capacity_factor * local_tokens * num_selected / ep)))


def dispatch_positions(owner, ep: int, cap: int):
    """Position of each assignment in its owner's send chunk; owner [A] (ep = not sent). -> pos, kept, dropped."""
    one_hot = jax.nn.one_hot(owner, ep + 1, dtype=jnp.int32)  # [A, ep+1]
    pos = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0) - 1, owner[:, None], axis=1)[:, 0]  # [A]
    sent = owner < ep
    return pos, sent & (pos < cap), sent & (pos >= cap)


def _local_moe(tokens, valid, override, gate, w_gelu, w_value, w_out, *, config, ep, tp, cap, block):
    """Steps 1-5 on one rank. tokens [n, D] local; weights hold this rank's experts and FFN slice."""
    n, dim = tokens.shape
    k = config.num_selected_experts
    experts_per_rank = config.num_experts // ep
    gates, expert_index = model.select_experts(tokens, gate, k, override)  # 1. gate: [n, k]
    owner = jnp.where(valid[:, None], expert_index // experts_per_rank, ep).reshape(-1)  # [A]
    local_expert = (expert_index % experts_per_rank).reshape(-1)
    pos, kept, dropped = dispatch_positions(owner, ep, cap)  # 2. dispatch
    dest = jnp.where(kept, owner, ep)  # out of range: the scatter drops it
    token_of = jnp.repeat(jnp.arange(n), k)
    # Each row carries its local expert id in one extra column (a small integer: exact in the tokens' float
    # dtype), so one all_to_all sends both: each collective costs a fixed latency across processes.
    assert experts_per_rank <= 2 ** (jnp.finfo(tokens.dtype).nmant + 1), "expert ids must be exact floats"
    rows = jnp.concatenate([tokens[token_of], local_expert[:, None].astype(tokens.dtype)], axis=1)
    send = jnp.zeros((ep, cap, dim + 1), tokens.dtype).at[:, :, dim].set(-1)  # -1: an empty row
    send = send.at[dest, pos].set(rows, mode="drop")
    recv = jax.lax.all_to_all(send, EP, 0, 0).reshape(ep * cap, dim + 1)  # 3. exchange
    recv_x, recv_e = recv[:, :dim], recv[:, dim].astype(jnp.int32)
    received = recv_e >= 0  # 4. experts
    plan = model.plan_dispatch(jnp.maximum(recv_e, 0)[:, None], received, experts_per_rank, block)
    x_sorted = jnp.zeros((plan.rows + 1, dim), tokens.dtype).at[plan.slot].set(recv_x)[:-1]
    y_sorted = model.expert_ffn_grouped(x_sorted, plan, w_gelu, w_value, w_out, block)
    if tp > 1:  # a psum over one device is still a collective in the compiled step, inside the layer loop
        y_sorted = jax.lax.psum(y_sorted, TP)  # float32 partial sums over the FFN slices, as the reference
    y_rows = jnp.take(y_sorted, plan.slot, axis=0, mode="fill", fill_value=0)  # [ep*cap, D]
    back = jax.lax.all_to_all(y_rows.reshape(ep, cap, dim), EP, 0, 0)  # 5. return
    y = jnp.where(kept[:, None], back[jnp.minimum(dest, ep - 1), jnp.minimum(pos, cap - 1)], 0.0)
    y = y.reshape(n, k, dim)
    used = jnp.where(dropped.reshape(n, k), -1, expert_index)
    return model.combine(gates, y), used


# The MoE's own arrays inside the shard_map, named as the params are (sharding.rules maps the names).
TOKEN_AXES = ("moe_tokens", "embed")  # tokens [n, D] and the output
VALID_AXES = ("moe_tokens",)  # valid [n]
CHOICE_AXES = ("moe_tokens", "moe_choices")  # forced and used experts [n, k]


def shard_map_specs(weights: dict, forced: bool):
    """(in_specs, out_specs) of the MoE's shard_map: tokens, valid, [forced experts], then one layer's
    MOE_PARAMS (the stacked L axis is gone, see sharding.rules.layer_specs); out: tokens, used experts."""
    tokens, valid, choices = (logical_spec(axes, "the expert-parallel MoE's inputs")
                              for axes in (TOKEN_AXES, VALID_AXES, CHOICE_AXES))
    return (tokens, valid, *[choices] * forced, *layer_specs(weights).values()), (tokens, choices)


def make_expert_parallel_moe(mesh, *, capacity_factor: float | None = None):
    """An `moe` function for grok1.model.forward that runs experts in parallel over the mesh's `ep` axis."""
    ep, tp = mesh.shape[EP], mesh.shape[TP]

    def moe(x, layer, config, valid, block, override=None):
        batch, steps, dim = x.shape
        k = config.num_selected_experts
        tokens = x.reshape(batch * steps, dim)
        valid = valid.reshape(-1)
        override = None if override is None else override.reshape(batch * steps, k).astype(jnp.int32)
        padding = (-tokens.shape[0]) % ep  # tokens are split over ep: pad to a multiple
        if padding:
            tokens = jnp.pad(tokens, ((0, padding), (0, 0)))
            valid = jnp.pad(valid, (0, padding))
            override = None if override is None else jnp.pad(override, ((0, padding), (0, 0)))
        local_tokens = tokens.shape[0] // ep
        cap = capacity(local_tokens, k, config.num_experts // ep, ep, capacity_factor,
                       distinct_experts=override is None)
        weights = {name: layer[name] for name in MOE_PARAMS}
        forced = () if override is None else (override,)
        in_specs, out_specs = shard_map_specs(weights, bool(forced))

        def local(tokens, valid, *rest):
            forced_here = rest[0] if forced else None
            return _local_moe(tokens, valid, forced_here, *rest[len(forced):], config=config, ep=ep, tp=tp,
                              cap=cap, block=block)

        run = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        out, used = run(tokens, valid, *forced, *weights.values())
        out, used = out[: batch * steps], used[: batch * steps]
        return out.reshape(batch, steps, dim), used.reshape(batch, steps, k)

    return moe
