"""The model across processes: N plain subprocesses (no Ray) form one JAX group over gloo and one mesh.

Each run is tests/integration/multiprocess_check.py, started N times by run_local_group. Checked:
- a group of N processes computes bit for bit what one process computes on a mesh of the same shape made of N
  virtual devices (forced-routing logits, free-routing experts, greedy tokens, expert counts): the processes
  and gloo add nothing;
- against the golden logits the teacher-forced criterion holds (forced routing within 4% relative L2);
- against the single-device engine (mesh 1x1) the free-routing experts and the greedy tokens are equal (see
  model.combine for the one XLA:CPU fusion that made them differ by a bf16 ulp, and how it is avoided);
- the paged engine (a pool of KV blocks, chunked prefill, a prefix hit) across N processes gives the greedy
  tokens of the contiguous engine in one process;
- loading a sliceable checkpoint, each of N processes holds and reads about 1/N of the weights (the peak
  memory it adds while loading is its slices plus the file pages they came from).
"""

from __future__ import annotations

import json

import pytest
import yaml

from workers.local_processes import run_local_group

pytestmark = pytest.mark.slow

FORCED_REL_L2 = 0.04  # golden criterion for forced routing

# (processes, ep, tp, devices per process)
GROUPS = [(2, 2, 1, 1), (4, 4, 1, 1), (4, 2, 2, 1)]


def run_group(mode: str, processes: int, ep: int, tp: int, local_devices: int, args: list[str]) -> list[dict]:
    results = run_local_group("tests.integration.multiprocess_check", [mode, *args, "--ep", str(ep), "--tp", str(tp)],
                              processes, local_devices=local_devices, timeout_s=540)
    failed = [r for r in results if r.returncode != 0]
    assert not failed, "\n".join(f"process {r.process_id} exited {r.returncode}:\n{r.stderr[-4000:]}" for r in failed)
    outputs = [json.loads(line[len("RESULT "):]) for r in results for line in r.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert len(outputs) == processes
    return outputs


@pytest.fixture(scope="module")
def golden_args(golden_dir) -> list[str]:
    return ["--checkpoint", str(golden_dir), "--config", str(golden_dir / "config.json"),
            "--golden-dir", str(golden_dir)]


@pytest.fixture(scope="module")
def single_device(golden_args) -> dict:
    [out] = run_group("golden", 1, 1, 1, 1, golden_args)
    return out


@pytest.mark.parametrize("processes,ep,tp,local_devices", GROUPS, ids=lambda v: str(v))
def test_group_equals_one_process_on_the_same_mesh(golden_args, single_device, processes, ep, tp, local_devices):
    group = run_group("golden", processes, ep, tp, local_devices, golden_args)
    [one_process] = run_group("golden", 1, ep, tp, processes * local_devices, golden_args)
    assert {o["info"]["pid"] for o in group}.__len__() == processes
    assert all(o["info"]["global_devices"] == ep * tp for o in group)
    for out in group:  # every process of the group saw the same replicated results
        for key in ("rel_to_golden", "experts", "greedy", "expert_counts"):
            assert out[key] == one_process[key], f"process {out['process_id']}: {key} differs from one process"
    out = group[0]
    assert max(out["rel_to_golden"]) < FORCED_REL_L2, out["rel_to_golden"]
    assert out["experts"] == single_device["experts"], "free-routing experts differ from the single device"
    assert out["greedy"] == single_device["greedy"], "greedy tokens differ from the single-device engine"


@pytest.mark.parametrize("processes,ep,tp,local_devices", [(2, 2, 1, 1), (4, 2, 2, 1)], ids=lambda v: str(v))
def test_paged_engine_across_processes_equals_one_process(golden_args, single_device, processes, ep, tp,
                                                           local_devices):
    group = run_group("paged", processes, ep, tp, local_devices, golden_args)
    for out in group:  # every process handed out the same tokens
        assert out["greedy"] == single_device["greedy"], f"process {out['process_id']}: paged greedy differs"
        assert out["again"] == single_device["greedy"][-1], "the prefix hit's tokens differ from a cold run"
        assert out["cached_tokens"] >= 8, "the repeated prompt did not reuse its cached blocks"


def tiny_moe_config(tmp_path) -> str:
    """A config whose weights (~50 MB) are almost all experts, so 1/N of the experts shows in the RSS."""
    config = {
        "name": "memory-check",
        "model": {"vocab_size": 1024, "emb_size": 256, "key_size": 64, "num_q_heads": 4, "num_kv_heads": 2,
                  "num_layers": 2, "widening_factor": 24.0, "num_experts": 8, "num_selected_experts": 2,
                  "sequence_len": 128},
        "engine": {"max_slots": 16, "max_len": 128, "prefill_buckets": [16], "moe_block_size": 8},
    }
    path = tmp_path / "memory-check.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_each_process_loads_about_one_nth_of_the_experts(tmp_path):
    from grok1.checkpoint import write_random_checkpoint
    from grok1.config import load_config
    from grok1.sliceable import sliceable_bytes
    from grok1.sliceable_convert import convert

    config_path = tiny_moe_config(tmp_path)
    model = load_config(config_path).model
    released = write_random_checkpoint(tmp_path / "released", model, seed=1)
    sliceable = convert(released, tmp_path / "sliceable", model)
    args = ["--checkpoint", str(sliceable), "--config", config_path]
    total = sliceable_bytes(sliceable)
    for n in (2, 4):
        for out in run_group("load", n, n, 1, 1, args):
            held, grew = out["local_param_bytes"], out["load_peak_growth"]
            # What a process holds: its 1/n of the experts and the replicated rest (~7% of this model).
            assert held < 1.1 * total / n, (n, held, total)
            # Its peak memory grows by what it holds plus the file pages it read for that (each process maps
            # only its own slices), and a small fixed overhead: about 2/n of the checkpoint, never all of it.
            assert grew < 2.2 * total / n + 16 * 2**20, (n, grew, held, total)


def test_two_processes_warm_up_a_32_slot_engine_without_a_collective_mismatch(golden_args):
    # With XLA:CPU's concurrency-optimised scheduler on, gloo aborted this every time ("op.preamble.length <=
    # op.nbytes ... collective mismatch"): sharding.distributed turns it off for multi-process CPU groups.
    group = run_group("warmup", 2, 2, 1, 1, golden_args)
    assert sorted(o["process_id"] for o in group) == [0, 1]
    assert all(o["info"]["global_devices"] == 2 for o in group)
