"""Run in a subprocess by test_planner.py with 8 virtual CPU devices: what the mesh layout really allocates.

For each config and mesh, loads params the way the engine gets them (the tiny config through a written and
re-read checkpoint, the larger CPU config from `random_params`, which builds the same dtypes without the disk
round trip), places them and the decode state with `Engine(config, params, MeshLayout(...))`, and prints one
JSON object: per case, the bytes of params and of state on each device (sums of addressable shards).
"""

import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
ROOT = Path(__file__).resolve().parents[2]

import jax  # noqa: E402

from grok1.checkpoint import load_checkpoint, write_random_checkpoint  # noqa: E402
from grok1.config import load_config  # noqa: E402
from grok1.engine import Engine  # noqa: E402
from grok1.random_weights import random_params  # noqa: E402
from planning.footprint import RELEASE_SCALE_GROUPS  # noqa: E402
from sharding.layout import MeshLayout  # noqa: E402
from sharding.mesh import MeshShape  # noqa: E402

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2)]


def bytes_per_device(tree) -> list[int]:
    """Bytes each device holds of a pytree of placed arrays, in jax.devices() order."""
    held = {device: 0 for device in jax.devices()}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            held[shard.device] += shard.data.nbytes
    return list(held.values())


def placed(config, params, ep: int, tp: int) -> dict:
    engine = Engine(config, params, MeshLayout(config, MeshShape(ep, tp), jax.devices()[: ep * tp]))
    devices = ep * tp  # the mesh uses the first ep*tp devices; the rest must hold nothing
    weights, state = bytes_per_device(engine.params), bytes_per_device(engine.state)
    assert not any(weights[devices:]) and not any(state[devices:])
    return {"ep": ep, "tp": tp, "params": weights[:devices], "state": state[:devices]}


def main() -> dict:
    groups = dict(RELEASE_SCALE_GROUPS)
    cases = []
    tiny = load_config(ROOT / "configs" / "grok-1-tiny.yaml")
    with tempfile.TemporaryDirectory() as directory:
        write_random_checkpoint(directory, tiny.model, scale_groups=groups)
        for dequantized in (False, True):
            params = load_checkpoint(directory, tiny.model, dequantize=dequantized)
            config = tiny.replace(checkpoint={"dequantize_on_load": dequantized})
            for ep, tp in MESHES:
                cases.append({"config": "grok-1-tiny.yaml", "dequantized": dequantized, "scale_groups": groups,
                              **placed(config, params, ep, tp)})
    cpu = load_config(ROOT / "configs" / "grok-1-cpu.yaml")
    for scale_groups in (groups, {}):
        params = random_params(cpu.model, scale_groups=scale_groups)
        for ep, tp in MESHES:
            cases.append({"config": "grok-1-cpu.yaml", "dequantized": False, "scale_groups": scale_groups,
                          **placed(cpu, params, ep, tp)})
    return {"devices": len(jax.devices()), "cases": cases}


if __name__ == "__main__":
    print(json.dumps(main()))
