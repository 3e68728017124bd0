"""The paged engine on every mesh shape the sharding tests cover gives the contiguous engine's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from grok1.limits import MAX_TOP_LOGPROBS


def check_mixed(mesh: dict, single: dict, forced: int) -> None:
    """A batch whose rows take the sampler's optional branches gives on the mesh what it gives on one device: the
    greedy row's tokens, its token's logprob as the first of its top logprobs, the forced token, and a top-k draw
    among its row's top k."""
    label = f"ep={mesh['ep']} tp={mesh['tp']}"
    top, drawn = mesh["mixed"]["top"], mesh["mixed"]["drawn"]
    assert top["tokens"] == single["top"]["tokens"], label
    for token, logprob, ids, values, expected in zip(top["tokens"], top["logprobs"], top["top_ids"],
                                                     top["top_values"], single["top"]["logprobs"]):
        assert len(ids) == 3 and ids[0] == token and values[0] == pytest.approx(logprob, abs=1e-6), label
        assert logprob == pytest.approx(expected, abs=0.05), label
    assert mesh["mixed"]["forced"]["tokens"] == [forced] * len(single["forced"]["tokens"]), label
    assert all(token in ids for token, ids in zip(drawn["tokens"][1:], drawn["top_ids"][1:])), label


@pytest.mark.slow
def test_paged_engine_on_every_mesh_shape_equals_the_contiguous_engine(golden_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.sharding.paged_mesh_check", str(golden_dir)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert {(m["ep"], m["tp"]) for m in results["meshes"]} >= {(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (8, 1)}
    for mesh in results["meshes"]:
        assert mesh["tokens"] == results["contiguous"][:1] + results["contiguous"], f"ep={mesh['ep']} tp={mesh['tp']}"
        if mesh["ep"] < 8:  # the repeated prompt forked (at ep = 8 a rank has one slot: it runs on another)
            assert mesh["cached_tokens"] > 0, mesh
        assert mesh["blocks_per_device"] == [[48 // mesh["ep"]]], mesh  # each rank holds only its own share
        # each rank unembeds and samples only its share of the rows, and gathers no vocabulary-wide array
        assert mesh["unembed_rows"] == [8 // mesh["ep"]], mesh
        # and never one row at the smallest buckets (the slow matrix-vector path: a bucket of 2 rows over ep=2
        # gave each rank one, 21 ms steps where 13 with two)
        assert all(min(rows) >= 2 for rows in mesh["smallest_buckets_unembed_rows"].values()), mesh
        assert mesh["vocab_collectives"] == [], mesh
        check_mixed(mesh, results["contiguous_mixed"], results["forced"])
        if mesh["ep"] > 1:
            assert not mesh["step_gathers_the_pool"], f"ep={mesh['ep']} tp={mesh['tp']}: the step gathers the pool"
            # The sampler's results come back to every rank in one all-gather, and its branch decisions cost
            # none: every rank takes them from the replicated settings (before: 2 all-reduces of predicates and
            # 5 all-gathers every step, each a round trip over gloo).
            packed = f"all-gather s32[8,{2 + 2 * MAX_TOP_LOGPROBS}]"
            assert mesh["step_collectives"] == [packed], mesh["step_collectives"]
            # the MoE's exchange (rows with their expert ids in one buffer) and its return: two per layer
            assert mesh["all_to_alls"] == 2, mesh
            # and after the layers, h and the expert counts in one all-gather of each rank's share (its 8 / ep slots'
            # h, then its [L, E] counts in rows of h's width): before, an all-reduce of the counts beside it
            width, count_words = results["emb_size"], results["expert_counts"]
            share = f"all-gather f32[{mesh['ep']},{8 // mesh['ep'] + -(-count_words // width)},{width}]"
            # (with tp > 1 the embedding's vocabulary is split: each rank's lookup of its share is summed over tp)
            lookup = [f"all-reduce f32[{8 // mesh['ep']},1,{width}]"] if mesh["tp"] > 1 else []
            assert mesh["forward_collectives"] == lookup + [share], mesh["forward_collectives"]
            assert mesh["forward_lossless"], mesh
            # A prefill (and a step that mixes chunks with decode tokens) samples every chunk's row on every rank
            # from h gathered first: its branch predicates and the [B, V] counts' scatter are then computed on
            # each rank alone. Before: 5 pred[] all-reduces in each (the argmax's NaN test on split rows, in
            # every branch), the contiguous prefill also a [B, V] all-reduce of the counts. Left: the chunks'
            # expert counts [L, E].
            assert set(mesh["prefill_all_reduces"]) == {"_prefill", "_mixed"}, mesh["prefill_all_reduces"]
            if mesh["tp"] == 1:
                for step, shapes in mesh["prefill_all_reduces"].items():
                    assert set(shapes) <= {results["expert_counts_shape"]}, (step, shapes)
