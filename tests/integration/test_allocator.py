"""The malloc library of the processes that run XLA:CPU steps (workers/allocator.py): chosen from
GROK1_ALLOCATOR, preloaded into the processes the project starts, and reported by them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.allocator import ALLOCATOR_ENV, AllocatorError, allocator_env, allocator_in_use, find_tcmalloc, main
from workers.local_processes import ROOT, run_local_group

TCMALLOC = find_tcmalloc()
needs_tcmalloc = pytest.mark.skipif(TCMALLOC is None, reason="tcmalloc is not installed here "
                                                             "(apt-get install libtcmalloc-minimal4)")


def fake_library(tmp_path, name="libtcmalloc_minimal.so.4"):
    path = tmp_path / name
    path.write_bytes(b"\x7fELF")
    return path


def test_auto_preloads_the_tcmalloc_found_and_keeps_what_is_preloaded(tmp_path):
    library = fake_library(tmp_path)
    env = allocator_env({"LD_PRELOAD": "/opt/libmine.so"}, library_dirs=[str(tmp_path / "none"), str(tmp_path)])
    assert env["LD_PRELOAD"] == f"/opt/libmine.so {library}"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40  # no report per checkpoint tensor
    assert allocator_env({}, library_dirs=[str(tmp_path / "none")]) == {}  # none installed: malloc as it is


def test_system_a_path_and_an_allocator_already_preloaded(tmp_path):
    library = fake_library(tmp_path, "libmymalloc.so")
    assert allocator_env({ALLOCATOR_ENV: "system"}, library_dirs=[str(tmp_path)]) == {}
    assert allocator_env({ALLOCATOR_ENV: str(library)})["LD_PRELOAD"] == str(library)
    fake_library(tmp_path)
    assert allocator_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, library_dirs=[str(tmp_path)]) == {}
    with pytest.raises(AllocatorError, match=ALLOCATOR_ENV):
        allocator_env({ALLOCATOR_ENV: str(tmp_path / "missing.so")})


def test_the_library_in_use_is_read_from_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator_in_use(str(maps)) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 00000000 08:01 124 /usr/lib/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator_in_use(str(maps)) == "libtcmalloc_minimal.so.4.5.10"


REPORT = "from workers.allocator import allocator_in_use; print(allocator_in_use())"


@needs_tcmalloc
def test_a_command_run_under_the_allocator_loads_it(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    out = subprocess.run([sys.executable, "-m", "workers.allocator", sys.executable, "-c", REPORT], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().startswith("libtcmalloc")
    plain = subprocess.run([sys.executable, "-c", REPORT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                           check=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert plain.stdout.strip() == "system"


@needs_tcmalloc
def test_a_local_process_group_runs_with_tcmalloc_unless_told_not_to(monkeypatch):
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    for env, expected in (({}, "libtcmalloc"), ({ALLOCATOR_ENV: "system"}, "system")):
        results = run_local_group("tests.integration.allocator_report", [], 2, env=env, timeout_s=60)
        assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
        assert all(r.stdout.strip().startswith(expected) for r in results), [r.stdout for r in results]


def test_usage_without_a_command():
    with pytest.raises(SystemExit, match="usage"):
        main([])
