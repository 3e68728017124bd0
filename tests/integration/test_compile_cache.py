"""The persistent compilation cache: a second process building the same engine loads its steps, same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# One process: build the tiny engine through the path the workers use, warm it up, generate greedily, and
# report JAX's own cache events (jax.monitoring) with the tokens.
BUILD_AND_GENERATE = """
import json, sys
from pathlib import Path
import jax
from jax import monitoring
events = {}
monitoring.register_event_listener(lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
from grok1.compile_cache import enable_compile_cache
from grok1.config import load_config
from grok1.engine import Engine, Sampling
from grok1.random_weights import random_params
print(json.dumps({"dir": str(enable_compile_cache())}), file=sys.stderr)
config = load_config("configs/grok-1-tiny.yaml")
engine = Engine(config, random_params(config.model, seed=3))
engine.warmup()
tokens = [int(engine.prefill(0, [5, 6, 7], Sampling()).tokens[0])]
for _ in range(4):
    tokens.append(int(engine.decode().tokens[0]))
print(json.dumps({"tokens": tokens, "hits": events.get("/jax/compilation_cache/cache_hits", 0),
                  "misses": events.get("/jax/compilation_cache/cache_misses", 0)}))
"""


def _run(cache: str) -> dict:
    env = {**os.environ, "GROK1_COMPILE_CACHE": cache, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", BUILD_AND_GENERATE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_second_process_loads_the_compiled_steps(tmp_path):
    cold = _run(str(tmp_path / "cache"))
    assert cold["misses"] > 0  # (a program compiled twice in one process may already hit)
    assert any((tmp_path / "cache").iterdir())
    warm = _run(str(tmp_path / "cache"))
    assert warm["hits"] > cold["hits"] and warm["misses"] < cold["misses"], (cold, warm)
    assert warm["tokens"] == cold["tokens"]

