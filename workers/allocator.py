"""The memory allocator of the processes that run XLA:CPU steps: tcmalloc where it is installed.

Why: XLA:CPU allocates each execution's temporaries with malloc, in one block. glibc's malloc serves a block
over its mmap threshold (32 MiB at most) with a fresh `mmap`, and a thread's arena holds at most 64 MiB, so a
decode step whose temporaries are larger (grok-1-tiny at 32 rows: 128 MiB, the [rows, V] logits and the
sampler's passes over them) gets new pages from the kernel every step: mapped, faulted in 4 KiB at a time,
zeroed, unmapped. `perf` put a third of that step's CPU time in the kernel. tcmalloc keeps freed spans and
hands them out again. vLLM's CPU backend preloads tcmalloc for the same reason; figures in docs/benchmarks.md
("The allocator").

A library can only be preloaded when a process starts, so this module gives the environment for the
processes the project starts itself (Ray shard workers and a router that hosts the engine, through their
runtime_env; local process groups), and `python -m workers.allocator CMD...` runs a command under it (the
Makefile's single-process jobs). `GROK1_ALLOCATOR` chooses: `auto` (default) preloads tcmalloc when found in
the system's library directories, `system` leaves malloc alone, a path preloads that library. GPU workers
keep the system allocator: their step's buffers are device memory, which XLA manages itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ALLOCATOR_ENV = "GROK1_ALLOCATOR"
# Debian/Ubuntu's libtcmalloc-minimal4 (and the full gperftools library), RHEL's gperftools-libs.
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
# Allocators a user may already preload; then theirs stays and ours is not added.
KNOWN_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
# gperftools reports every allocation over 1 GiB on stderr; loading a full-size checkpoint makes many.
LARGE_ALLOC_REPORT = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))


class AllocatorError(ValueError):
    pass


def find_tcmalloc(library_dirs=LIBRARY_DIRS) -> str | None:
    for directory in library_dirs:
        for name in TCMALLOC_NAMES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def allocator_env(environ=None, library_dirs=LIBRARY_DIRS) -> dict[str, str]:
    """Environment variables to add to a process that runs XLA:CPU steps (empty: leave malloc as it is)."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ALLOCATOR_ENV, "auto").strip() or "auto"
    preloaded = environ.get("LD_PRELOAD", "")
    if choice == "system" or any(name in preloaded for name in KNOWN_ALLOCATORS):
        return {}
    if choice == "auto":
        path = find_tcmalloc(library_dirs)
        if path is None:
            return {}
    else:
        path = choice
        if not os.path.isfile(path):
            raise AllocatorError(f"{ALLOCATOR_ENV}={choice!r}: no such file; give auto, system or the path of a "
                                 f"malloc library such as {TCMALLOC_NAMES[0]}")
    env = {"LD_PRELOAD": f"{preloaded} {path}".strip()}
    if LARGE_ALLOC_REPORT[0] not in environ:
        env[LARGE_ALLOC_REPORT[0]] = LARGE_ALLOC_REPORT[1]
    return env


def allocator_actor_options(extra_env=None) -> dict:
    """Ray actor options that start a CPU actor with the allocator: {"runtime_env": ...}, or {} for malloc as it
    is. `extra_env`: the environment the actor is given besides this process's (it may set GROK1_ALLOCATOR)."""
    env = allocator_env({**os.environ, **(extra_env or {})})
    return {"runtime_env": {"env_vars": env}} if env else {}


def allocator_in_use(maps: str = "/proc/self/maps") -> str:
    """The file name of the preloaded malloc library this process runs with, or "system"."""
    try:
        text = Path(maps).read_text()
    except OSError:
        return "unknown"
    for line in text.splitlines():
        fields = line.split()  # address perms offset dev inode [path]
        name = Path(fields[5]).name if len(fields) >= 6 else ""
        if any(allocator in name for allocator in KNOWN_ALLOCATORS):
            return name
    return "system"


def main(argv=None) -> None:
    """`python -m workers.allocator CMD [ARGS...]`: run CMD with the allocator (this process is replaced)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m workers.allocator CMD [ARGS...]")
    os.execvpe(argv[0], argv, {**os.environ, **allocator_env()})


if __name__ == "__main__":
    main()
