"""Shared fixtures: the golden set of xAI's reference outputs, and a tolerance-checking `assert_close`.

The golden set (default ``<repo>/../shared/golden/grok1-tiny``, or ``$GROK1_GOLDEN_DIR``) holds a config.json,
a released-layout checkpoint, golden.json (per-case token ids, routing, greedy tokens) and golden_logits.npz.
Everything here is derived from those files, so another golden set of the same format works unchanged.

Test modules import the helpers by package (tests/ is a package, so pytest imports this as tests.conftest):

    from tests.conftest import assert_close
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from grok1.checkpoint import load_checkpoint
from grok1.config import Grok1Config, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GOLDEN_DIR = REPO_ROOT / ".." / "shared" / "golden" / "grok1-tiny"
GOLDEN_FILES = ("config.json", "golden.json", "golden_logits.npz", "ckpt-0")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")


# ------------------------------------------------------------------------------------------- tolerances

# (rtol, atol) for comparing arrays of a dtype with a reference: a few units in the last place of that dtype.
TOLERANCES = {
    np.dtype(ml_dtypes.bfloat16): (2e-2, 2e-2),
    np.dtype(np.float16): (2e-3, 2e-3),
    np.dtype(np.float32): (1e-5, 1e-5),
    np.dtype(np.float64): (1e-12, 1e-12),
}


def _tolerance_dtype(*arrays) -> np.dtype:
    """The least precise floating dtype among the arrays (the comparison cannot be tighter than it)."""
    floats = [np.dtype(a.dtype) for a in arrays if np.dtype(a.dtype) in TOLERANCES]
    if not floats:
        return np.dtype(np.float32)
    return max(floats, key=lambda d: TOLERANCES[d][0])


def assert_close(actual, expected, rtol: float | None = None, atol: float | None = None, name: str = "array"):
    """Assert `actual` is finite and within rtol/atol of `expected` (defaults from the less precise dtype).

    In the style of MaxText's moe_test: a finite check first (NaN/inf never pass as 'close'), then
    |actual - expected| <= atol + rtol * |expected| elementwise; the message gives the max abs difference,
    where it is, and the tolerance used.
    """
    actual_np = np.asarray(actual)
    expected_np = np.asarray(expected)
    assert actual_np.shape == expected_np.shape, f"{name}: shape {actual_np.shape} != expected {expected_np.shape}"
    default_rtol, default_atol = TOLERANCES[_tolerance_dtype(actual_np, expected_np)]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    a = actual_np.astype(np.float64)
    e = expected_np.astype(np.float64)
    bad = ~np.isfinite(a)
    assert not bad.any(), (f"{name}: {int(bad.sum())} non-finite values of {a.size}, "
                           f"first at index {np.unravel_index(np.argmax(bad), a.shape)}")
    assert np.isfinite(e).all(), f"{name}: the expected values are not all finite"
    diff = np.abs(a - e)
    allowed = atol + rtol * np.abs(e)
    if diff.size and not (diff <= allowed).all():
        worst = np.unravel_index(np.argmax(diff - allowed), diff.shape)
        raise AssertionError(
            f"{name}: {int((diff > allowed).sum())} of {diff.size} values outside rtol={rtol:g} atol={atol:g}; "
            f"max abs difference {diff.max():.6g}; worst at {worst}: actual {a[worst]:.6g} vs expected {e[worst]:.6g}")


def relative_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


# ---------------------------------------------------------------------------------------------- golden


def golden_dir_path() -> Path:
    return Path(os.environ.get("GROK1_GOLDEN_DIR", DEFAULT_GOLDEN_DIR))


def is_public_golden_set(directory: Path) -> bool:
    """True if `directory` is the public golden set (the default one), or one whose config.json is the same:
    only then does configs/grok-1-tiny.yaml describe its model."""
    public = DEFAULT_GOLDEN_DIR / "config.json"
    if not public.is_file():
        return False
    if directory.resolve() == DEFAULT_GOLDEN_DIR.resolve():
        return True
    try:
        return json.loads((directory / "config.json").read_text()) == json.loads(public.read_text())
    except (OSError, ValueError):
        return False


def _missing_golden_files(directory: Path) -> list[str]:
    return [name for name in GOLDEN_FILES if not (directory / name).exists()]


def _golden_case_count() -> int | None:
    """Number of cases in golden.json, or None if the golden set is missing (read at collection time)."""
    directory = golden_dir_path()
    if _missing_golden_files(directory):
        return None
    with open(directory / "golden.json") as file:
        return len(json.load(file)["sequence_ids"])


def pytest_generate_tests(metafunc):
    """Tests taking a `case` argument run once per case of golden.json (case0, case1, ...)."""
    if "case" not in metafunc.fixturenames:
        return
    count = _golden_case_count()
    if count is None:
        params = [pytest.param(None, marks=pytest.mark.skip(
            reason=f"golden set not found at {golden_dir_path()} (set GROK1_GOLDEN_DIR)"))]
        metafunc.parametrize("case", params, ids=["no-golden"])
    else:
        metafunc.parametrize("case", range(count), ids=[f"case{k}" for k in range(count)])


@dataclass(frozen=True)
class GoldenCase:
    """One entry of golden.json, as arrays; logits are the reference's, widened to float32."""

    index: int
    prompt_ids: np.ndarray  # [P]
    sequence_ids: np.ndarray  # [T] = prompt + greedy tokens
    stable_prefix: int
    router_top2: np.ndarray  # [L, T, 2]
    greedy_full_recompute: np.ndarray  # [steps]
    greedy_top2_margins: np.ndarray  # [steps]
    logits: np.ndarray  # [T, V] float32

    @property
    def length(self) -> int:
        return len(self.sequence_ids)


@dataclass
class Golden:
    directory: Path
    config: Grok1Config  # .model is the ModelConfig
    params: Any  # our params pytree of jnp arrays
    cases: dict[str, list]  # golden.json as parsed
    logits: Any  # the npz (logits_{k})

    @property
    def num_cases(self) -> int:
        return len(self.cases["sequence_ids"])

    @cached_property
    def _case_cache(self) -> dict[int, GoldenCase]:
        return {}

    def case(self, k: int) -> GoldenCase:
        if k not in self._case_cache:
            c = self.cases
            self._case_cache[k] = GoldenCase(
                index=k,
                prompt_ids=np.asarray(c["prompt_ids"][k], np.int32),
                sequence_ids=np.asarray(c["sequence_ids"][k], np.int32),
                stable_prefix=int(c["stable_prefix"][k]),
                router_top2=np.asarray(c["router_top2"][k], np.int32),
                greedy_full_recompute=np.asarray(c["greedy_full_recompute"][k], np.int32),
                greedy_top2_margins=np.asarray(c["greedy_top2_margins"][k], np.float32),
                logits=np.asarray(self.logits[f"logits_{k}"], np.float32),
            )
        return self._case_cache[k]


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    directory = golden_dir_path()
    missing = _missing_golden_files(directory)
    if missing:
        pytest.skip(f"golden set not found at {directory} (missing {', '.join(missing)}; set GROK1_GOLDEN_DIR)")
    return directory


@pytest.fixture(scope="session")
def golden(golden_dir) -> Golden:
    config = load_config(golden_dir / "config.json")
    params = jax.tree.map(jnp.asarray, load_checkpoint(golden_dir, config.model))
    with open(golden_dir / "golden.json") as file:
        cases = json.load(file)
    logits = dict(np.load(golden_dir / "golden_logits.npz"))
    return Golden(golden_dir, config, params, cases, logits)
