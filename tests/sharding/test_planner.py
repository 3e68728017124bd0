"""The deployment planner (planning/) and `grok1 plan`: its bytes equal what placement allocates, the
released model's totals, which layouts it accepts and refuses (with the reason), and memory-size parsing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import main
from grok1.config import ConfigError, load_config
from grok1.params import is_quantised, layer_shapes, top_shapes
from planning.footprint import RELEASE_SCALE_GROUPS
from planning.memory_size import parse_memory_size
from planning.mesh_choice import PlanError, choose_mesh
from planning.plan import plan

ROOT = Path(__file__).resolve().parents[2]
GROK1 = load_config(ROOT / "configs" / "grok-1.yaml")
GIB = 2**30

# xAI's release: int8 weights + bf16 scales (G groups: 8 on o_proj and ffn_out, else 1), bf16 embedding as
# loaded, f32 norms and gate. Summed in `released_bytes` below; pinned here as a number too.
RELEASED_TOTAL_BYTES = 316_629_082_112


def released_bytes(config) -> int:
    """Bytes of the loaded params, from the shapes alone (not through the planner's pytree)."""
    model = config.model
    total = math.prod(top_shapes(model)["embedding"]) * 2 + math.prod(top_shapes(model)["final_norm"]) * 4
    for name, shape in layer_shapes(model).items():
        if is_quantised(name):
            *lead, _, n = shape
            scales = math.prod(lead) * RELEASE_SCALE_GROUPS.get(name, 1) * n
            total += model.num_layers * (math.prod(shape) + 2 * scales)
        else:
            total += model.num_layers * math.prod(shape) * 4
    return total


# ------------------------------------------------------------------- bytes equal what placement allocates


@pytest.mark.slow
def test_planned_bytes_equal_what_placement_allocates_on_every_mesh():
    """Tiny (through a real checkpoint, int8 and dequantised) and CPU configs on 1x1, 2x1, 1x2, 2x2."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "tests.sharding.planner_memory_check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout.strip().splitlines()[-1])["cases"]
    meshes = [(1, 1), (2, 1), (1, 2), (2, 2)]
    assert {(c["config"], c["ep"], c["tp"]) for c in cases} >= {
        (name, ep, tp) for name in ("grok-1-tiny.yaml", "grok-1-cpu.yaml") for ep, tp in meshes}
    for case in cases:
        config = load_config(ROOT / "configs" / case["config"]).replace(
            checkpoint={"dequantize_on_load": case["dequantized"]})
        devices = case["ep"] * case["tp"]
        planned = plan(config, 1, devices, 1024 * GIB, ep=case["ep"], tp=case["tp"],
                       scale_groups=case["scale_groups"])
        label = f"{case['config']} ep={case['ep']} tp={case['tp']} dequantized={case['dequantized']}"
        assert case["params"] == [planned.weights_per_device] * devices, label
        assert case["state"] == [planned.state_bytes_per_device] * devices, label


# ---------------------------------------------------------------------------------- the released model


def test_release_total_is_the_exact_int8_and_scales_total():
    assert released_bytes(GROK1) == RELEASED_TOTAL_BYTES
    assert plan(GROK1, 2, 8, 80 * GIB).model_bytes == RELEASED_TOTAL_BYTES


def test_two_hosts_of_eight_80gib_devices_fit_with_a_slot_count():
    two_hosts = plan(GROK1, 2, 8, parse_memory_size("80GiB"))
    assert two_hosts.feasible, two_hosts.problem
    assert (two_hosts.mesh.ep, two_hosts.mesh.tp) == (2, 8)
    # Experts split 16 ways, attention 8 ways (replicated over ep): well under the whole model / 8.
    assert RELEASED_TOTAL_BYTES / 16 < two_hosts.weights_per_device < RELEASED_TOTAL_BYTES / 8
    assert two_hosts.kv_bytes_per_slot == 2 * 64 * 8192 * 8 * 128 * 2  # k and v, [L, S, Hkv, K] bf16
    assert two_hosts.max_slots >= GROK1.engine.max_slots and two_hosts.max_slots % 2 == 0
    assert f"largest slot count       {two_hosts.max_slots}" in two_hosts.format()


def test_largest_slot_count_fits_and_one_more_step_does_not():
    largest = plan(GROK1, 2, 8, 80 * GIB).max_slots
    assert plan(GROK1, 2, 8, 80 * GIB, slots=largest).feasible
    too_many = plan(GROK1, 2, 8, 80 * GIB, slots=largest + 2)
    assert not too_many.feasible
    assert f"the requested {largest + 2} slots do not fit" in too_many.problem
    assert f"at most {largest} slots fit" in too_many.problem


def test_weights_that_exceed_memory_are_refused_with_the_reason():
    # One host of 8 x 80 GiB holds Grok-1 in int8 (36.9 GiB per device); half of one does not.
    assert plan(GROK1, 1, 8, 80 * GIB).feasible
    half = plan(GROK1, 1, 4, 80 * GIB)
    assert not half.feasible
    assert half.problem.startswith("weights alone exceed memory: 73.73 GiB per device > 60.00 GiB usable")
    assert half.format().endswith(f"feasible: no: {half.problem}")
    dequantized = plan(GROK1.replace(checkpoint={"dequantize_on_load": True}), 1, 8, 80 * GIB)
    assert dequantized.problem.startswith("weights alone exceed memory")  # bf16 doubles the experts


@pytest.mark.parametrize("hosts,per_host,axes,message", [
    (2, 8, {"tp": 3}, "mesh tp=3 does not divide model.num_kv_heads"),
    (2, 8, {"ep": 3}, "mesh ep=3 does not divide model.num_experts"),
    (2, 8, {"ep": 4, "tp": 2}, "mesh ep=4 x tp=2 has 8 devices, but 2 hosts x 8 devices have 16"),
    (3, 8, {}, "no ep x tp layout of 24 devices .* ep=3 does not divide model.num_experts"),
    (16, 8, {}, "no ep x tp layout of 128 devices .* ep=16 does not divide model.num_experts"),
])
def test_layouts_that_do_not_divide_the_model_are_refused_naming_the_rule(hosts, per_host, axes, message):
    with pytest.raises(PlanError, match=message):
        plan(GROK1, hosts, per_host, 80 * GIB, **axes)


def test_slots_must_split_over_ep():
    with pytest.raises(PlanError, match="ep=2 does not divide engine.max_slots"):
        plan(GROK1, 2, 8, 80 * GIB, slots=3)


@pytest.mark.parametrize("hosts,per_host,ep,tp", [
    (1, 1, 1, 1), (1, 8, 1, 8), (2, 8, 2, 8), (4, 8, 4, 8), (8, 8, 8, 8),
    (2, 4, 2, 4),  # tp stays inside a host of 4
    (1, 16, 2, 8),  # tp is at most the 8 KV heads
])
def test_the_chosen_layout_keeps_tp_inside_a_host(hosts, per_host, ep, tp):
    mesh, _ = choose_mesh(GROK1, hosts, per_host)
    assert (mesh.ep, mesh.tp) == (ep, tp)


# ------------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "plan", "--config", "configs/grok-1.yaml", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_cli_prints_a_feasible_plan_and_exits_zero():
    done = run_cli("--hosts", "2", "--devices-per-host", "8", "--device-memory", "80GiB", "--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["feasible"] and printed["mesh"] == {"ep": 2, "tp": 8}
    assert printed["max_slots"] == plan(GROK1, 2, 8, 80 * GIB).max_slots


def test_cli_exits_nonzero_with_the_reason_when_infeasible():
    done = run_cli("--hosts", "1", "--devices-per-host", "4", "--device-memory", "80GiB")
    assert done.returncode == 1
    assert "feasible: no: weights alone exceed memory" in done.stdout
    assert "grok1: infeasible: weights alone exceed memory" in done.stderr


def test_cli_refuses_a_mesh_that_does_not_divide_the_model(capsys):
    code = main(["plan", "--config", "configs/grok-1.yaml", "--hosts", "2", "--devices-per-host", "8",
                 "--device-memory", "80GiB", "--tp", "3"])
    assert code == 2
    assert "tp=3 does not divide model.num_kv_heads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ memory sizes


@pytest.mark.parametrize("text,size", [
    ("80GiB", 80 * 2**30), ("141GB", 141 * 10**9), ("512MiB", 512 * 2**20), ("1.5TiB", 3 * 2**39),
    ("64 kb", 64_000), ("4096", 4096), ("7B", 7),
])
def test_memory_sizes_parse(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize("text,message", [
    ("80GX", "'80GX': unknown unit 'GX'"),
    ("GiB", "'GiB' is not a size"),
    ("-1GiB", "'-1GiB' is not a size"),
    ("0GiB", "'0GiB' must be more than zero"),
    ("", "'' is not a size"),
])
def test_memory_size_errors_name_the_bad_value(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_memory_size(text, "--device-memory")


def test_paged_capacity_is_the_memory_left_in_tokens_and_the_concurrency_at_a_mean_length():
    two_hosts = plan(GROK1, 2, 8, 80 * GIB, mean_len=1500)
    m = GROK1.model
    assert two_hosts.kv_bytes_per_token == m.num_layers * 2 * m.num_kv_heads * m.key_size * 2  # k, v bf16
    per_device = two_hosts.kv_bytes_per_token // two_hosts.mesh.tp
    contiguous = two_hosts.kv_bytes_per_slot * two_hosts.slots // (two_hosts.mesh.ep * two_hosts.mesh.tp)
    left = two_hosts.usable_bytes - two_hosts.used_per_device + contiguous
    # The pool is split over ep: each rank's devices hold their share's tokens.
    assert two_hosts.kv_capacity_tokens == left // per_device * two_hosts.mesh.ep > 0
    assert two_hosts.paged_concurrency == two_hosts.kv_capacity_tokens // 1500
    assert "paged KV capacity" in two_hosts.format() and two_hosts.to_dict()["paged_concurrency"] > 0
