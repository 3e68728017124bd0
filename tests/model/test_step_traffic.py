"""What a compiled decode step moves through memory, read off the program XLA builds for this backend.

Defects profiles of the decode step found (docs/benchmarks.md), each invisible in the numbers:
- the scan over layers sliced every layer's stacked expert weights, so XLA copied all E experts of a layer
  ([E, D, F] int8) every step to run the two a token picks (grok1.model.StackedWeight);
- writing one token per row into the bfloat16 KV cache made XLA:CPU convert the whole [L, B, S, Hkv, K]
  cache to float32 and back in every layer (grok1.paged_attention.kv_bits);
- the sampler's conds passed the [n, V] logits in and out for steps that need none of their branches, and
  XLA:CPU copies such operands and results (grok1.sampling.sample_scored).
Each test here compiles the step and fails if any instruction still produces such an array.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from grok1.config import ModelConfig, load_config
from grok1.engine import Engine
from grok1.paged_engine import PagedEngine
from grok1.random_weights import random_params

SMALL = ModelConfig(vocab_size=512, pad_token=0, eos_token=2, sequence_len=64, emb_size=64, key_size=16,
                    num_q_heads=4, num_kv_heads=2, num_layers=3, widening_factor=2.0, num_experts=8,
                    num_selected_experts=2, attn_output_multiplier=0.25, embedding_multiplier_scale=1.0,
                    output_multiplier_scale=1.0)
SLOTS, MAX_LEN = 8, 64


@pytest.fixture(scope="module")
def config():
    return load_config("configs/grok-1-tiny.yaml").replace(model=SMALL, engine={"max_slots": SLOTS, "max_len": MAX_LEN})


@pytest.fixture(scope="module")
def params(config):
    return random_params(config.model)


def shapes_made(hlo: str) -> set[str]:
    """Every `dtype[dims]` an instruction of the optimised program produces (fused computations included)."""
    return set(re.findall(r"= ([a-z0-9]+\[[0-9,]*\])", hlo))


def decode_program(engine, **inputs) -> str:
    return engine._decode_forward.lower(engine.params, engine.state, None, **inputs).compile().as_text()


def expert_stacks(config) -> set[str]:
    """One layer's experts, all of them: int8 [E, D, F] and [E, F, D]."""
    e, d, f = config.model.num_experts, config.model.emb_size, config.model.ffn_size
    return {f"s8[{e},{d},{f}]", f"s8[{e},{f},{d}]"}


def test_the_contiguous_decode_step_copies_no_expert_stack_and_no_float32_cache(config, params):
    engine = Engine(config, params)
    made = shapes_made(decode_program(engine, kv_len=16))
    m = config.model
    whole_cache = f"f32[{m.num_layers},{SLOTS},{MAX_LEN},{m.num_kv_heads},{m.key_size}]"
    assert whole_cache not in made, "the KV cache is converted to float32 around its update"
    assert not made & expert_stacks(config), "a layer's whole expert stack is copied every step"


def test_the_paged_decode_step_copies_no_expert_stack_and_no_float32_pool(config, params):
    blocks, block_size = 16, 8
    engine = PagedEngine(config.replace(engine={"kv_blocks": blocks, "kv_block_size": block_size}), params)
    tables = np.full((SLOTS, engine.table_width), -1, np.int32)
    made = shapes_made(decode_program(engine, tables=tables, kv_len=16))
    m = config.model
    whole_pool = f"f32[{m.num_layers},{blocks},{block_size},{m.num_kv_heads},{m.key_size}]"
    assert whole_pool not in made, "the KV pool is converted to float32 around its update"
    assert not made & expert_stacks(config), "a layer's whole expert stack is copied every step"


def entry_shapes_made(hlo: str) -> set[str]:
    """The `dtype[dims]` the program's top level (its ENTRY computation) produces: what runs every call, not
    inside a branch taken only sometimes."""
    entry = hlo[hlo.index("\nENTRY "):]
    return shapes_made(entry[: entry.index("\n}")])


def test_a_greedy_step_without_penalties_does_not_gather_the_token_counts(config, params):
    """The penalties read each row's generated-token counts [n, V]; gathering them for the step's rows is a pass
    over 16 MB per step at 32 rows of Grok-1's vocabulary. It must happen only in the branch that applies them."""
    engine = Engine(config, params)
    rows = np.array([0, SLOTS], np.int32)  # one active slot and a padding row: n = 2, not the engine's SLOTS
    _, h, _ = engine._decode_forward(engine.params, engine.state, None, kv_len=16)
    hlo = engine._decode_sample.lower(engine.params, engine.state, h, rows).compile().as_text()
    gathered = f"s32[{len(rows)},{config.model.vocab_size}]"
    assert gathered in shapes_made(hlo), "the penalty branch no longer reads the counts: this test checks nothing"
    assert gathered not in entry_shapes_made(hlo), "every step gathers the rows' token counts"


def entry_arrays_of_shape(hlo: str, dims: str) -> list[str]:
    """The instructions of the program's top level that produce an array of exactly `dims` ("2,512")."""
    entry = hlo[hlo.index("\nENTRY "):]
    entry = entry[: entry.index("\n}")]
    return [line.strip() for line in entry.splitlines() if re.search(rf"= [a-z0-9]+\[{dims}\]", line)]


def test_a_plain_greedy_step_makes_only_the_logits_at_its_top_level(config, params):
    """A greedy step without penalties, grammar or top logprobs (the common one) needs two passes over its
    [n, V] logits: their maximum and their log-sum-exp. The general sampler's conds pass [n, V] operands and
    results, which XLA:CPU copies (36 ms of a 32-row step over Grok-1's vocabulary, against ~6 for the plain
    path). So the top level holds only the unembedding product and its rounding; the rest runs in a branch."""
    engine = Engine(config, params)
    rows = np.array([0, SLOTS], np.int32)
    _, h, _ = engine._decode_forward(engine.params, engine.state, None, kv_len=16)
    hlo = engine._decode_sample.lower(engine.params, engine.state, h, rows).compile().as_text()
    made = entry_arrays_of_shape(hlo, f"{len(rows)},{config.model.vocab_size}")
    assert len(made) <= 2, "the top level makes more [n, V] arrays than the logits:\n" + "\n".join(made)
