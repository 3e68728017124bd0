"""The paged engine on every mesh shape the sharding tests cover gives the contiguous engine's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


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
        assert mesh["vocab_collectives"] == [], mesh
        if mesh["ep"] > 1:
            assert not mesh["step_gathers_the_pool"], f"ep={mesh['ep']} tp={mesh['tp']}: the step gathers the pool"
            # the MoE's exchange (rows with their expert ids in one buffer) and its return: two per layer
            assert mesh["all_to_alls"] == 2, mesh
