"""Which CPUs each CPU shard worker runs on: the workers of one node split its cores instead of sharing them.

Why: XLA:CPU sizes its thread pool from the process's CPU affinity when its client is created (there is no flag
for it), so every worker of a node otherwise runs a pool as wide as the node. Two workers on the same cores then
time-slice each other's threads, and each of a step's collectives waits for a peer that is descheduled
(docs/benchmarks.md, session 15: an ep=2 group on 2 cores stepped 10-20% faster with a core each). vLLM's CPU
workers bind the same way (`VLLM_CPU_OMP_THREADS_BIND`: "auto", "all", or "0-31|32-63").

Settings (`ReplicaConfig.cpu_bind`):
- "all": no binding; every worker may use every CPU it was allowed.
- "auto": the CPUs a node's workers are allowed are split into contiguous, equal slices, one per worker of
  that node in rank order (a node with one worker keeps all of its CPUs).
- "0-3|4-7": explicit CPU lists, one per worker of a node in rank order, "|" between them.

Pure functions plus `bind`, which a worker calls before its JAX backend exists. No JAX and no Ray.
"""

from __future__ import annotations

import os
import re

_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
MAX_CPU = 1 << 16  # no machine has more; a bound keeps "0-999999999" from building a huge set


def parse_cpu_list(text: str) -> frozenset[int]:
    """"0-3,8" -> {0, 1, 2, 3, 8}; ValueError on anything else (empty, reversed or unbounded ranges)."""
    if not _CPU_LIST.match(text):
        raise ValueError(f"{text!r} is not a CPU list like 0-3,8")
    cpus = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if low > high or high >= MAX_CPU:
            raise ValueError(f"{part!r} in {text!r} is not a CPU range (low-high, below {MAX_CPU})")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def check_setting(setting: str) -> str:
    """The setting itself if it is "all", "auto" or "|"-separated CPU lists; ValueError naming the problem."""
    if setting not in ("all", "auto"):
        for cpu_list in setting.split("|"):
            parse_cpu_list(cpu_list)
    return setting


def node_ranks(node_ids: list[str]) -> list[tuple[int, int]]:
    """For each worker (in group order), (its rank among the workers on its node, how many share that node)."""
    seen: dict[str, int] = {}
    ranks = []
    for node in node_ids:
        ranks.append(seen.get(node, 0))
        seen[node] = ranks[-1] + 1
    return [(rank, seen[node]) for rank, node in zip(ranks, node_ids)]


def worker_cpus(setting: str, allowed: frozenset[int], node_rank: int, node_workers: int) -> frozenset[int] | None:
    """The CPUs the worker of rank `node_rank` among `node_workers` on a node binds to; None: do not bind.

    "auto" with fewer allowed CPUs than workers does not bind (the workers would share cores either way). An
    explicit list must name a list per worker of the node, each within the CPUs the worker is allowed."""
    check_setting(setting)
    if setting == "all":
        return None
    if setting == "auto":
        if node_workers <= 1 or len(allowed) < node_workers:
            return None
        ordered = sorted(allowed)
        share = len(ordered) // node_workers
        return frozenset(ordered[node_rank * share:(node_rank + 1) * share])
    lists = setting.split("|")
    if len(lists) != node_workers:
        raise ValueError(f"cpu_bind {setting!r} names {len(lists)} CPU lists for {node_workers} workers on a node")
    cpus = parse_cpu_list(lists[node_rank])
    if not cpus <= allowed:
        raise ValueError(f"cpu_bind {setting!r}: CPUs {sorted(cpus - allowed)} are not allowed on this node "
                         f"(allowed: {sorted(allowed)})")
    return cpus


def allowed_cpus() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0))


def bind(cpus: frozenset[int] | None) -> frozenset[int]:
    """Restrict this process to `cpus` (None: leave it) and return the CPUs it may use. Call it before the JAX
    backend is created: threads started earlier keep their old affinity, and XLA:CPU reads it once."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    return allowed_cpus()
