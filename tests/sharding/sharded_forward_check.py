"""Run in a subprocess by test_sharding.py with 8 virtual CPU devices: sharded vs unsharded forward.

Prints one JSON object: per mesh shape and golden case, the relative L2 of the sharded logits to the unsharded
ones and to the golden logits (forced routing), whether the experts agree, and the capacity-factor drop check.
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from grok1 import model  # noqa: E402
from grok1.checkpoint import load_checkpoint  # noqa: E402
from grok1.config import load_config  # noqa: E402
from sharding.expert_parallel import capacity, make_expert_parallel_moe  # noqa: E402
from sharding.mesh import MeshShape, make_mesh  # noqa: E402
from sharding.rules import layer_specs, named_shardings, param_shardings  # noqa: E402

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (8, 1)]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main(golden_dir: Path) -> dict:
    config = load_config(golden_dir / "config.json").model
    host_params = load_checkpoint(golden_dir, config)
    cases = json.loads((golden_dir / "golden.json").read_text())
    golden_logits = np.load(golden_dir / "golden_logits.npz")
    base = jax.tree.map(jnp.asarray, host_params)
    results = {"meshes": [], "drops": []}
    # One batch of all cases, right-padded to a common length (causal attention and per-token experts:
    # padding changes no earlier position), so each mesh compiles twice rather than per case.
    lengths = [len(s) for s in cases["sequence_ids"]]
    width = max(lengths)
    tokens = jnp.asarray([s + [1] * (width - len(s)) for s in cases["sequence_ids"]])
    forced = jnp.stack([jnp.pad(jnp.asarray(r), ((0, 0), (0, width - n), (0, 0)))
                        for r, n in zip(cases["router_top2"], lengths)], axis=1)  # [L, B, T, 2]

    def run(params, moe_fn, override):
        return jax.jit(lambda p, t, o: model.full_forward(p, config, t, routing_override=o, moe_fn=moe_fn))(
            params, tokens, override)

    single = run(base, model.moe, forced)
    free_single = run(base, model.moe, None)
    for ep, tp in MESHES:
        if config.num_experts % ep or config.num_kv_heads % tp:
            continue
        mesh = make_mesh(MeshShape(ep, tp), jax.devices()[: ep * tp])
        params = jax.device_put(host_params, param_shardings(host_params, mesh))
        moe_fn = make_expert_parallel_moe(mesh)
        sharded = run(params, moe_fn, forced)
        free_sharded = run(params, moe_fn, None)
        for index, n in enumerate(lengths):
            logits = np.asarray(sharded.logits[index, :n], np.float32)
            experts = np.asarray(free_sharded.expert_index[:, index, :n])
            results["meshes"].append({
                "ep": ep, "tp": tp, "case": index,
                "rel_to_single": rel(logits, np.asarray(single.logits[index, :n], np.float32)),
                "rel_to_golden": rel(logits, golden_logits[f"logits_{index}"].astype(np.float32)),
                "free_rel_to_single": rel(np.asarray(free_sharded.logits[index, :n], np.float32),
                                          np.asarray(free_single.logits[index, :n], np.float32)),
                "experts_equal": bool((experts == np.asarray(free_single.expert_index[:, index, :n])).all()),
            })
    # Capacity factor: dropped assignments are reported as expert -1; count them against a plain count.
    for ep, factor in [(2, 0.5), (4, 0.25), (4, 1.0)]:
        mesh = make_mesh(MeshShape(ep, 1), jax.devices()[:ep])
        layer = jax.tree.map(lambda a: a[0], host_params["layers"])
        layer = jax.device_put(layer, named_shardings(layer_specs(layer), mesh))
        tokens = jax.random.normal(jax.random.PRNGKey(ep), (1, 64, config.emb_size), jnp.bfloat16)
        valid = jnp.ones((1, 64), bool)
        _, used = make_expert_parallel_moe(mesh, capacity_factor=factor)(tokens, layer, config, valid, 8)
        _, chosen = model.select_experts(tokens[0], layer["gate"], config.num_selected_experts)
        owner = np.asarray(chosen) // (config.num_experts // ep)  # [64, k]
        local = 64 // ep
        cap = capacity(local, config.num_selected_experts, config.num_experts // ep, ep, factor)
        expected = 0
        for rank in range(ep):
            counts = np.bincount(owner[rank * local:(rank + 1) * local].reshape(-1), minlength=ep)
            expected += int(np.maximum(counts - cap, 0).sum())
        results["drops"].append({"ep": ep, "factor": factor, "capacity": cap, "expected": expected,
                                 "reported": int((np.asarray(used) == -1).sum())})
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
