"""The activation headroom: per-device bytes of an engine step's temporaries, estimated term by term."""

from __future__ import annotations

from grok1.config import Grok1Config, ModelConfig
from sharding.expert_parallel import capacity
from sharding.mesh_shape import MeshShape

# f32 [T, D] copies alive at once in a decoder layer: the residual h, the rms_norm input widened to f32 and
# its output, the attention output's partial sum before the tp all-reduce, and the expert combine's sum.
RESIDUAL_F32_COPIES = 5
# f32 [rows, V] copies in sampling: the widened logits, the penalised ones (grok1.sampling.apply_penalties:
# the logprobs still read the widened ones), the scaled ones, and for top-k/top-p the sorted copy, its
# softmax and cumulative sum (grok1.sampling._filter_top_k_top_p). The [B, V] int32 token counts the
# penalties read are decode state (counted there, updated in place), not a temporary.
SAMPLING_F32_COPIES = 6


def step_activations(model: ModelConfig, mesh: MeshShape, block: int, *, batch: int, tokens: int,
                     kv_len: int, sampled_rows: int) -> dict[str, int]:
    """Per-device bytes of the temporaries of one engine step, term by term, following grok1.model's code.

    batch x tokens are fed, attending to kv_len cached positions; sampled_rows rows of logits are sampled.
    Attention runs data parallel over ep only when the batch splits (a one-slot prefill runs whole on each).
    Layers run one at a time (lax.scan), experts one at a time (expert_ffn_grouped), so only one layer's and
    one expert's dequantised weights exist at once.
    """
    d, k, f = model.emb_size, model.key_size, model.ffn_size
    heads, kv_heads = model.num_q_heads // mesh.tp, model.num_kv_heads // mesh.tp
    rows = batch // mesh.ep if batch % mesh.ep == 0 else batch  # attention rows on one device
    experts_here = model.num_experts // mesh.ep
    local = -(-batch * tokens // mesh.ep)  # tokens each ep rank routes (padded to a multiple of ep)
    sent = mesh.ep * capacity(local, model.num_selected_experts, experts_here, mesh.ep, None)
    sorted_rows = (sent + experts_here * (block - 1) + block - 1) // block * block  # model.plan_dispatch
    return {
        # [B, H, T, S] f32 logits (capped, masked) and their softmax, both alive around the fused softmax.
        "attention scores": 2 * 4 * rows * heads * tokens * kv_len,
        # The layer's cached keys and values gathered for the batch's rows: [B, S, Hkv, K] bf16, twice.
        "cache rows read": 2 * 2 * rows * kv_len * kv_heads * k,
        "q, k, v": 2 * rows * tokens * (heads + 2 * kv_heads) * k,
        "residual stream": RESIDUAL_F32_COPIES * 4 * batch * tokens * d,
        # sharding.expert_parallel: send and receive [ep, C, D] bf16, results and return f32, and the
        # expert-sorted buffers (bf16 in, f32 out).
        "expert dispatch": sent * d * (2 + 2 + 4 + 4) + sorted_rows * d * (2 + 4),
        # One expert's gelu and value matrices in bf16 and its output matrix in f32, and one layer's q, k,
        # v and o projections in bf16.
        "dequantised weights": d * (f // mesh.tp) * (2 + 2 + 4) + 2 * d * (heads + 2 * kv_heads + heads) * k,
        "logits": SAMPLING_F32_COPIES * 4 * sampled_rows * model.vocab_size,
    }


def headroom_terms(config: Grok1Config, mesh: MeshShape, slots: int) -> tuple[str, dict[str, int]]:
    """The larger of the two steps' temporaries: prefill of the longest bucket, or decode of every slot."""
    engine = config.engine
    longest = engine.buckets_up_to_max_len()[-1]
    prefill = step_activations(config.model, mesh, engine.moe_block_size, batch=1, tokens=longest,
                               kv_len=longest, sampled_rows=1)
    decode = step_activations(config.model, mesh, engine.moe_block_size, batch=slots, tokens=1,
                              kv_len=engine.max_len, sampled_rows=slots)
    if sum(prefill.values()) >= sum(decode.values()):
        return f"prefill of {longest} tokens", prefill
    return f"decode of {slots} slots", decode
