"""Run by test_paged_mesh.py with 8 virtual CPU devices: the paged engine on every mesh shape vs one device.

For each ep x tp mesh the golden prompts are generated greedily (all at once, prefill chunked by a token
budget) through the paged engine laid out on the mesh, and through the contiguous engine on one device. Prints
one JSON line: per mesh, both token lists, and how many pool blocks each device holds (the pool is split over
ep: kv_blocks / ep).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

from cluster.driver import Driver  # noqa: E402
from cluster.scheduler import Request, Scheduler  # noqa: E402
from grok1.checkpoint import load_checkpoint  # noqa: E402
from grok1.config import load_config  # noqa: E402
from grok1.engine import Engine  # noqa: E402
from grok1.paged_engine import PagedEngine  # noqa: E402
from sharding.layout import MeshLayout  # noqa: E402
from sharding.mesh import MeshShape  # noqa: E402

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (8, 1)]
ENGINE = {"max_slots": 8, "max_len": 64, "prefill_buckets": [16, 32], "moe_block_size": 8}
PAGED = {**ENGINE, "kv_blocks": 48, "kv_block_size": 8, "token_budget": 24}
TOKENS = 8


def generate(engine, prompts):
    scheduler = Scheduler.for_config(engine.config, kv_ranks=getattr(engine, "kv_ranks", 1))
    done = Driver(engine, scheduler).generate(
        [Request(f"g{k}", p, TOKENS, ignore_eos=True) for k, p in enumerate(prompts)])
    return [c.tokens for c in done]


def main(golden_dir: Path) -> dict:
    config = load_config(golden_dir / "config.json")
    params = load_checkpoint(golden_dir, config.model)
    cases = json.loads((golden_dir / "golden.json").read_text())
    prompts = [list(p) for p in cases["prompt_ids"]]
    contiguous = generate(Engine(config.replace(engine=ENGINE), jax.tree.map(jax.numpy.asarray, params)), prompts)
    results = {"contiguous": contiguous, "meshes": []}
    paged_config = config.replace(engine=PAGED)
    for ep, tp in MESHES:
        if config.model.num_experts % ep or config.model.num_kv_heads % tp:
            continue
        layout = MeshLayout(paged_config, MeshShape(ep, tp), jax.devices()[: ep * tp])
        engine = PagedEngine(paged_config, params, layout)
        tokens = generate(engine, prompts)
        shards = {tuple(shard.data.shape[1:2]) for shard in engine.state.cache.k.addressable_shards}
        results["meshes"].append({"ep": ep, "tp": tp, "tokens": tokens, "blocks_per_device": sorted(shards)})
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
