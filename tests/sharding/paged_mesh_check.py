"""Run by test_paged_mesh.py with 8 virtual CPU devices: the paged engine on every mesh shape vs one device.

For each ep x tp mesh the golden prompts are generated greedily (all at once, prefill chunked by a token
budget) through the paged engine laid out on the mesh, and through the contiguous engine on one device. Prints
one JSON line: per mesh, both token lists (the paged engine runs the first prompt twice, the second a fork),
how many pool blocks each device holds (the pool is split over ep: kv_blocks / ep) and whether its compiled
decode step makes an array of the whole pool (it must not), how many all-to-alls it holds, which collectives
follow its layers, and whether its h and expert counts equal those of the same step with XLA's own collectives;
and, of its compiled unembedding and sampling at every slot, how many rows each device unembeds, which
collectives move vocabulary-wide arrays outside the sampler's optional branches and which collectives run at
every step; and the tokens, logprobs and top logprobs of a batch of rows that take the sampler's optional
branches.
"""

import dataclasses
import functools
import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cluster.driver import Driver  # noqa: E402
from cluster.scheduler import Request, Scheduler  # noqa: E402
from grok1.checkpoint import load_checkpoint  # noqa: E402
from grok1.config import load_config  # noqa: E402
from grok1.engine import Engine  # noqa: E402
from grok1.engine_api import Sampling  # noqa: E402
from grok1.paged_engine import PagedEngine  # noqa: E402
from sharding.layout import MeshLayout  # noqa: E402
from sharding.mesh import MeshShape  # noqa: E402

MESHES = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (8, 1)]
ENGINE = {"max_slots": 8, "max_len": 64, "prefill_buckets": [16, 32], "moe_block_size": 8}
PAGED = {**ENGINE, "kv_blocks": 48, "kv_block_size": 8, "token_budget": 24}
TOKENS = 8


def generate(engine, prompts):
    """(greedy tokens per prompt, prompt tokens a prefix hit or a fork saved)."""
    scheduler = Scheduler.for_config(engine.config, kv_ranks=getattr(engine, "kv_ranks", 1))
    done = Driver(engine, scheduler).generate(
        [Request(f"g{k}", p, TOKENS, ignore_eos=True) for k, p in enumerate(prompts)])
    return [c.tokens for c in done], scheduler.cached_tokens


FORCED = 1000  # a token id a logit bias of +100 forces


def mixed_requests(prompts) -> list[Request]:
    """Rows that take the sampler's optional branches, in one batch: top logprobs on a greedy row, a logit bias,
    and a draw (temperature, top-k, a presence penalty) that reports its top 5."""
    return [Request("top", prompts[0], TOKENS, Sampling(top_logprobs=3), ignore_eos=True),
            Request("forced", prompts[1], TOKENS, Sampling(logit_bias=((FORCED, 100.0),)), ignore_eos=True),
            Request("drawn", prompts[0], TOKENS, Sampling(temperature=1.0, top_k=5, seed=11, presence_penalty=0.5,
                                                          top_logprobs=5), ignore_eos=True)]


def generate_mixed(engine, prompts) -> dict:
    """{request id: {"tokens", "logprobs", "top_ids"}} of mixed_requests, with their decode steps' top logprobs."""
    scheduler = Scheduler.for_config(engine.config, kv_ranks=getattr(engine, "kv_ranks", 1))
    out = {r.request_id: {"tokens": [], "logprobs": [], "top_ids": [], "top_values": []}
           for r in mixed_requests(prompts)}

    def on_event(event):
        row = out[event.request_id]
        row["tokens"].append(event.token)
        row["logprobs"].append(event.logprob)
        row["top_ids"].append([i for i, _ in event.top_logprobs])
        row["top_values"].append([v for _, v in event.top_logprobs])

    Driver(engine, scheduler, on_event).generate(mixed_requests(prompts))
    return out


def gathers_the_pool(engine) -> bool:
    """Whether the compiled decode step makes any array of the whole pool's blocks (each device holds
    kv_blocks / ep: such an array means the shares were gathered across ranks)."""
    m = engine.config.model
    hlo = compiled_decode(engine)
    return bool(re.search(rf"\[{m.num_layers},{PAGED['kv_blocks']},{PAGED['kv_block_size']},", hlo))


@functools.cache  # one compile per engine for the three questions asked of it
def compiled_decode(engine) -> str:
    tables = engine.by_rank(np.full((engine.max_slots, engine.table_width), -1, np.int32))
    return engine._decode_forward.lower(engine.params, engine.state, None, tables, kv_len=16).compile().as_text()


def all_to_alls(engine) -> int:
    """all-to-all ops in the compiled decode step: the layers run in one loop, whose body appears once."""
    return len(re.findall(r" all-to-all(?:-start)?\(", compiled_decode(engine)))


def forward_collectives(engine) -> list[str]:
    """The compiled decode forward's collectives outside its layer loop (the loop's all-to-alls: all_to_alls)."""
    return entry_collectives(compiled_decode(engine))


def forward_packing_is_lossless(engine) -> bool:
    """Whether the decode forward, run for every slot, gives the h and expert counts that the same forward gives
    with XLA's own collectives (steps.gathered_forward off: an all-reduce of the counts beside h's all-gather)."""
    from grok1.steps import decode_forward, step_outputs

    state = dataclasses.replace(engine.state, active=np.ones(engine.max_slots, bool),
                                next_token=np.arange(engine.max_slots, dtype=np.int32) * 97)
    tables = engine.by_rank(np.full((engine.max_slots, engine.table_width), -1, np.int32))
    plain = jax.jit(functools.partial(decode_forward, config=engine.config, moe_fn=engine.layout.moe_fn),
                    static_argnames=("kv_len",), **step_outputs(engine.layout, engine.state, 2))
    packed = jax.jit(functools.partial(decode_forward, config=engine.config, moe_fn=engine.layout.moe_fn,
                                       place=engine.layout.constrain, ranks=engine.layout.shape.ep),
                     static_argnames=("kv_len",), **step_outputs(engine.layout, engine.state, 2))
    (_, h_plain, counts_plain), (_, h_packed, counts_packed) = (
        step(engine.params, state, None, tables, kv_len=16) for step in (plain, packed))
    return bool(np.array_equal(np.asarray(h_plain, np.float32), np.asarray(h_packed, np.float32))
                and np.array_equal(counts_plain, counts_packed) and int(np.sum(counts_packed)) == 2 * engine.max_slots
                * engine.config.model.num_layers)


def entry_collectives(hlo: str) -> list[str]:
    """'kind shape' of each collective in the ENTRY computation of a compiled program."""
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[: entry.index("\n}\n")]
    collectives = re.findall(r"= (\(?\w+\[[\d,]*\].*?) (all-reduce|all-gather|all-to-all|collective-permute)"
                             r"(?:-start)?\(", entry)
    return [f"{kind} {shape.split('{')[0]}" for shape, kind in collectives]


def all_reduces(hlo: str) -> list[str]:
    """The shapes of every all-reduce anywhere in a compiled program (the branches of its conds included), each
    operand of a combined (tuple) all-reduce apart."""
    results = re.findall(r"= (\(.*?\)|\w+\[[\d,]*\])\S* all-reduce(?:-start)?\(", hlo)
    return [shape for result in results for shape in re.findall(r"\w+\[[\d,]*\]", result)]


def recording_prefill_collectives(engine) -> dict[str, list[str]]:
    """Wrap the engine's prefill and mixed steps so that their first call also compiles them for these
    arguments and notes the compiled program's all-reduces; returns the dict they fill ({step: shapes})."""
    found: dict[str, list[str]] = {}

    def recording(name, jitted):
        def call(*args, **kwargs):
            if name not in found:
                found[name] = all_reduces(jitted.lower(*args, **kwargs).compile().as_text())
            return jitted(*args, **kwargs)
        return call

    for name in ("_prefill", "_mixed"):
        setattr(engine, name, recording(name, getattr(engine, name)))
    return found


def compiled_sample(engine, rows: int | None = None) -> str:
    """The decode step's sampler compiled for `rows` rows (default: every slot)."""
    h = jax.numpy.zeros((engine.max_slots, engine.config.model.emb_size), jax.numpy.bfloat16)
    rows = np.arange(rows or engine.max_slots, dtype=np.int32) % engine.max_slots
    return engine._decode_sample.lower(engine.params, engine.state, h, rows).compile().as_text()


def unembed_rows(hlo: str, vocab: int) -> list[int]:
    """The row counts of the unembedding's matmuls ([rows, vocab] dots) in a compiled program, on one device."""
    return sorted({int(rows) for rows in re.findall(r"= \w+\[(\d+),(?:1,)?" + str(vocab) + r"\]\{[^}]*\} dot\(", hlo)})


def smallest_buckets_unembed_rows(engine) -> dict[str, list[int]]:
    """Per device, the unembedding's rows at the two smallest decode row buckets (where a bucket split over ep can
    leave a rank one row: XLA:CPU's matrix-vector slow path)."""
    vocab = engine.config.model.vocab_size // engine.layout.shape.tp
    return {str(rows): unembed_rows(compiled_sample(engine, rows), vocab) for rows in engine.decode_row_buckets()[:2]}


def sample_split(engine) -> dict:
    """Rows of the unembedding's matmul on one device (max_slots / ep when the rows are split over ep) and the
    shapes of the entry computation's collectives over [*, V/tp] arrays (the counts' [B, V] all-reduce, say;
    a branch taken only for top logprobs is a nested computation and not counted)."""
    hlo = compiled_sample(engine)
    vocab = engine.config.model.vocab_size // engine.layout.shape.tp
    entry = hlo[hlo.index("ENTRY"):]
    entry = entry[: entry.index("\n}\n")]
    wide = re.findall(r"= (\w+\[[\d,]*" + str(vocab) + r"\])\{[^}]*\} (?:all-reduce|all-gather)(?:-start)?\(",
                      entry)
    return {"unembed_rows": unembed_rows(hlo, vocab), "vocab_collectives": wide,
            "step_collectives": entry_collectives(hlo)}


def main(golden_dir: Path) -> dict:
    config = load_config(golden_dir / "config.json")
    params = load_checkpoint(golden_dir, config.model)
    cases = json.loads((golden_dir / "golden.json").read_text())
    prompts = [list(p) for p in cases["prompt_ids"]]
    single = Engine(config.replace(engine=ENGINE), jax.tree.map(jax.numpy.asarray, params))
    contiguous, _ = generate(single, prompts)
    results = {"contiguous": contiguous, "contiguous_mixed": generate_mixed(single, prompts), "forced": FORCED,
               "emb_size": config.model.emb_size, "expert_counts": config.model.num_layers * config.model.num_experts,
               "expert_counts_shape": f"s32[{config.model.num_layers},{config.model.num_experts}]",
               "meshes": []}
    paged_config = config.replace(engine=PAGED)
    for ep, tp in MESHES:
        if config.model.num_experts % ep or config.model.num_kv_heads % tp:
            continue
        layout = MeshLayout(paged_config, MeshShape(ep, tp), jax.devices()[: ep * tp])
        engine = PagedEngine(paged_config, params, layout)
        prefill_all_reduces = recording_prefill_collectives(engine)
        # The first prompt twice, admitted together: the second forks the first's blocks on its rank, and the
        # first decode write into their shared partial block copies it (copy-on-write, within the rank).
        tokens, cached = generate(engine, prompts[:1] + prompts)
        shards = {tuple(shard.data.shape[1:2]) for shard in engine.state.cache.k.addressable_shards}
        results["meshes"].append({"ep": ep, "tp": tp, "tokens": tokens, "cached_tokens": cached,
                                  "blocks_per_device": sorted(shards),
                                  "step_gathers_the_pool": gathers_the_pool(engine),
                                  "all_to_alls": all_to_alls(engine), **sample_split(engine),
                                  "smallest_buckets_unembed_rows": smallest_buckets_unembed_rows(engine),
                                  "forward_collectives": forward_collectives(engine),
                                  "forward_lossless": ep == 1 or forward_packing_is_lossless(engine),
                                  "mixed": generate_mixed(engine, prompts),
                                  "prefill_all_reduces": prefill_all_reduces})
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
