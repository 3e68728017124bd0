"""Full-width Grok-1 decoder layers on one device: decode step time per layer and the memory bandwidth reached.

Grok-1's layer as released (emb 6144, 48 query / 8 KV heads of 128, 8 experts of FFN 32768, top-2, int8
weights with one scale group), random weights made on the device, as many layers as fit its memory (--layers,
default from the device's memory), through grok1.model.run_layers (the engine's decode path, no unembedding).
For 1, 32 and 256 active sequences at --context live positions: step time, time per layer, the bytes a
layer must read (attention weights, the experts the step selected, the KV attended: benchmarks.roofline's
model) and the fraction of the device's read bandwidth (measured in the same run) that is.

    python -m benchmarks.bench_gpu                      # on a GPU: full width
    python -m benchmarks.bench_gpu --layers 1 --emb 64 --q-heads 4 --kv-heads 2 --key-size 16 --ffn 128 \\
        --max-len 32 --context 8 --batches 1 4 --json  # anywhere, in seconds (tests/test_bench_gpu.py)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.roofline import decode_step_cost, measure_machine
from grok1 import model
from grok1.config import ModelConfig
from grok1.params import QuantizedWeight, is_quantised, layer_shapes

MEMORY_HEADROOM = 0.85  # of the device's memory for weights + KV cache; the rest for activations and XLA


def model_config(args, layers: int) -> ModelConfig:
    """The layer's architecture; the FFN size goes through Grok-1's widening factor (ffn = 2/3 x factor x emb)."""
    config = ModelConfig(vocab_size=args.vocab, emb_size=args.emb, key_size=args.key_size, num_q_heads=args.q_heads,
                         num_kv_heads=args.kv_heads, num_layers=layers, widening_factor=args.ffn * 1.5 / args.emb,
                         num_experts=args.experts, sequence_len=args.max_len,
                         attn_output_multiplier=args.key_size ** -0.5).validate()
    if config.ffn_size != args.ffn:
        raise ValueError(f"--ffn {args.ffn}: not reachable as 2/3 x widening x emb (a multiple of 8 is)")
    return config


def layer_bytes(config: ModelConfig) -> int:
    """Bytes of one stored layer: int8 matrices + bfloat16 scales (one group), float32 norms and gate."""
    total = 0
    for name, shape in layer_shapes(config).items():
        if is_quantised(name):
            total += int(np.prod(shape)) + 2 * int(np.prod(shape[:-2])) * shape[-1]
        else:
            total += 4 * int(np.prod(shape))
    return total


def kv_bytes_per_layer(config: ModelConfig, batch: int, max_len: int) -> int:
    return batch * max_len * 2 * config.num_kv_heads * config.key_size * 2


def device_memory_bytes(device) -> int:
    """The device's memory (a GPU's bytes_limit), or for a CPU a quarter of the host's."""
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def default_layers(config: ModelConfig, memory: int, largest_batch: int, max_len: int) -> int:
    """As many layers as fit MEMORY_HEADROOM of `memory` with the KV cache of the largest batch (at least 1)."""
    per_layer = layer_bytes(config) + kv_bytes_per_layer(config, largest_batch, max_len)
    return max(1, int(MEMORY_HEADROOM * memory) // per_layer)


def random_params(config: ModelConfig, seed: int = 0):
    """Random int8 layers made on the device, one leaf at a time (a full-width layer is ~5 GB)."""
    key = jax.random.PRNGKey(seed)
    layers = {}
    for index, (name, shape) in enumerate(layer_shapes(config).items()):
        full = (config.num_layers, *shape)
        leaf_key = jax.random.fold_in(key, index)
        if is_quantised(name):
            weight = jax.jit(lambda k, s=full: jax.random.randint(k, s, -127, 128, jnp.int8))(leaf_key)
            scales = jnp.full((*full[:-2], 1, full[-1]), 0.5 / (127 * np.sqrt(shape[-2])), jnp.bfloat16)
            layers[name] = QuantizedWeight(weight, scales)
        elif name == "gate":
            layers[name] = jax.random.normal(leaf_key, full, jnp.float32) * 0.1
        else:
            layers[name] = jnp.ones(full, jnp.float32)
    embedding = jax.random.normal(key, (config.vocab_size, config.emb_size), jnp.bfloat16) * 0.02
    return {"embedding": embedding, "final_norm": jnp.ones(config.emb_size, jnp.float32), "layers": layers}


def time_batch(params, config: ModelConfig, batch: int, args) -> tuple[float, np.ndarray]:
    """Median seconds of one decode step of every layer for `batch` sequences, and experts selected per layer."""
    cache = model.KVCache.zeros(config, batch, args.max_len)
    tokens = jnp.asarray(np.random.default_rng(batch).integers(0, config.vocab_size, (batch, 1)), jnp.int32)
    positions = jnp.full((batch, 1), args.context, jnp.int32)

    @functools.partial(jax.jit, donate_argnums=(2,))  # the cache is updated in place, as in the engine
    def step(params, tokens, cache):
        h, cache, experts = model.run_layers(params, config, tokens, positions, cache, None, kv_len=args.max_len,
                                             block=args.block)
        return h, cache, experts

    h, cache, experts = step(params, tokens, cache)
    jax.block_until_ready(h)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        h, cache, experts = step(params, tokens, cache)
        jax.block_until_ready(h)
        times.append(time.perf_counter() - started)
    one_hot = jax.nn.one_hot(np.asarray(experts).reshape(config.num_layers, -1), config.num_experts)
    return statistics.median(times), np.asarray(one_hot.sum(axis=1) > 0).sum(axis=1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=None, help="default: as many as fit the device's memory")
    parser.add_argument("--emb", type=int, default=6144)
    parser.add_argument("--q-heads", type=int, default=48)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--key-size", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=1024, help="embedding rows (layers only: no unembedding)")
    parser.add_argument("--max-len", type=int, default=1024, help="KV cache positions per sequence")
    parser.add_argument("--context", type=int, default=512, help="live positions attended by each sequence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--block", type=int, default=16, help="MoE block size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.context < args.max_len:
        parser.error(f"--context {args.context} must be in [1, --max-len {args.max_len})")
    device = jax.devices()[0]
    layers = args.layers or default_layers(model_config(args, 1), device_memory_bytes(device), max(args.batches),
                                           args.max_len)
    config = model_config(args, layers)
    machine = measure_machine(read_mib=min(1024, max(16, layer_bytes(config) // 2**20)))
    params = random_params(config)
    report = {"device": device.device_kind, "platform": device.platform, "layers": layers,
              "layer_MB": layer_bytes(config) / 1e6, "machine": machine.as_dict(), "batches": {}}
    for batch in args.batches:
        seconds, selected = time_batch(params, config, batch, args)
        cost = decode_step_cost(params, config, np.full(batch, args.context + 1), selected)
        layer_read = cost.weight_bytes + cost.expert_bytes + cost.kv_bytes  # no unembedding here
        report["batches"][str(batch)] = {
            "step_ms": 1e3 * seconds, "ms_per_layer": 1e3 * seconds / layers,
            "MB_per_layer": layer_read / layers / 1e6, "experts_per_layer": float(np.mean(selected)),
            "bandwidth_fraction": layer_read / seconds / machine.read_bytes_per_s,
            "flop_fraction": (cost.flops - batch * 2 * config.vocab_size * config.emb_size) / seconds
            / machine.flops_per_s}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{layers} Grok-1 layers (emb {args.emb}, {args.q_heads}/{args.kv_heads} heads of {args.key_size}, "
              f"{args.experts} experts of {args.ffn}, int8) on {device.device_kind}; read "
              f"{machine.read_bytes_per_s / 1e9:.0f} GB/s, matmul {machine.flops_per_s / 1e12:.1f} TFLOP/s; "
              f"context {args.context}\n")
        print("| active | step ms | ms per layer | MB read per layer | experts per layer | bandwidth fraction "
              "| FLOP fraction |")
        print("|---|---|---|---|---|---|---|")
        for batch, r in report["batches"].items():
            print(f"| {batch} | {r['step_ms']:.2f} | {r['ms_per_layer']:.3f} | {r['MB_per_layer']:.1f} "
                  f"| {r['experts_per_layer']:.1f} | {r['bandwidth_fraction']:.1%} | {r['flop_fraction']:.1%} |")
    return report


if __name__ == "__main__":
    main()
