"""benchmarks/bench_gpu.py runs anywhere with a small layer: one JSON report with a figure per batch size."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import bench_gpu

SMALL = ["--layers", "1", "--emb", "64", "--q-heads", "4", "--kv-heads", "2", "--key-size", "16", "--experts", "4",
         "--ffn", "128", "--vocab", "64", "--max-len", "32", "--context", "8", "--batches", "1", "4", "--steps", "2"]


def test_small_layers_report_every_batch(capsys):
    report = bench_gpu.main([*SMALL, "--json"])
    assert json.loads(capsys.readouterr().out) == report
    assert report["layers"] == 1 and set(report["batches"]) == {"1", "4"}
    for batch, figures in report["batches"].items():
        assert figures["step_ms"] > 0 and figures["ms_per_layer"] == figures["step_ms"]
        assert figures["MB_per_layer"] > 0 and figures["bandwidth_fraction"] > 0
        assert 1 <= figures["experts_per_layer"] <= min(4, 2 * int(batch))


def test_default_layers_fit_the_memory_with_the_largest_batch():
    full = argparse.Namespace(vocab=1024, emb=6144, key_size=128, q_heads=48, kv_heads=8, ffn=32768, experts=8,
                              max_len=1024)
    config = bench_gpu.model_config(full, 1)
    layer = bench_gpu.layer_bytes(config)
    assert 4.8e9 < layer < 5.0e9  # Grok-1's layer: 3 x 8 x 6144 x 32768 int8 experts + attention
    kv = bench_gpu.kv_bytes_per_layer(config, 256, 1024)
    layers = bench_gpu.default_layers(config, 141 * 2**30, 256, 1024)
    assert layers * (layer + kv) <= bench_gpu.MEMORY_HEADROOM * 141 * 2**30 < (layers + 1) * (layer + kv)
    assert bench_gpu.default_layers(config, 2**30, 256, 1024) == 1  # never 0


def with_flag(flag: str, value: str) -> list[str]:
    args = list(SMALL)
    args[args.index(flag) + 1] = value
    return args


def test_unreachable_ffn_size_and_context_are_refused():
    with pytest.raises(SystemExit):
        bench_gpu.main(with_flag("--context", "40"))  # past --max-len
    with pytest.raises(ValueError, match="--ffn"):
        bench_gpu.main(with_flag("--ffn", "100"))
