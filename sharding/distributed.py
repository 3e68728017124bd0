"""Joining N processes into one JAX runtime, so that one mesh spans them all (the data plane).

Every process calls `initialize` with the same coordinator address and its own process id before it touches
JAX; afterwards `jax.devices()` lists the devices of all processes and a jitted step over a mesh of them runs
its collectives (the expert-parallel all-to-all, the tensor-parallel all-reduces) process to process: over
gloo on CPU, over NCCL on GPU. Nothing here knows about Ray: the Ray shard workers (workers/) and the plain
subprocesses of the tests call the same function.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

PLATFORMS = ("cpu", "gpu")


@dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a group of `num_processes` that form one JAX runtime."""

    coordinator_address: str  # "host:port" of the coordinator service, which process 0 hosts
    num_processes: int
    process_id: int
    platform: str = "cpu"  # "cpu": collectives over gloo; "gpu": NCCL
    local_device_count: int | None = None  # CPU only: devices this process exposes (default 1)
    timeout_s: int = 120  # how long to wait for every process to join before giving up

    def __post_init__(self):
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {self.platform!r}")
        if not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id {self.process_id} outside [0, {self.num_processes})")
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator_address must be host:port, got {self.coordinator_address!r}")


def pick_free_port(host: str = "") -> int:
    """A TCP port free on this host now (process 0 picks it and hands it to the others)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def node_ip() -> str:
    """This host's address as the other hosts reach it (Ray's view when Ray runs, else the route to the net)."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return sock.getsockname()[0]
        except OSError:
            return "127.0.0.1"


def configure_platform(platform: str, local_device_count: int | None = None) -> None:
    """Backend settings that must be in place before JAX creates its first device."""
    import jax

    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if local_device_count:
            jax.config.update("jax_num_cpu_devices", local_device_count)
        if (local_device_count or 1) > 1:
            # Several devices in one process meet in XLA's in-process communicator, where the reordering below
            # deadlocks instead: each device's thread waits in a different collective until the 40 s rendezvous
            # timeout kills the process (seen in a one-process 4-device mesh on 2 cores).
            serialise_cpu_collectives()
    else:
        # NCCL carries the collectives; keep XLA from grabbing 75% of a GPU before the weights are placed.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


# XLA:CPU's concurrency-optimised scheduler (jax 0.10.2) lets two processes of one group run a step's
# collectives in different orders: gloo then aborts the group ("op.preamble.length <= op.nbytes ... collective
# mismatch"). Seen every time in a 2-process warm-up at 32 slots x 256 positions (a 16-prompt prefill), and now
# and then under load at the tests' sizes; never with this scheduler off (tests/integration/test_multiprocess.py).
CPU_COLLECTIVE_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def serialise_cpu_collectives() -> None:
    """Add CPU_COLLECTIVE_FLAGS to XLA_FLAGS (before the CPU backend is created, which reads them)."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    names = {flag.split("=")[0] for flag in flags}
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in CPU_COLLECTIVE_FLAGS if f.split("=")[0] not in names])


def initialize(group: ProcessGroup) -> None:
    """Join the group. Raises (rather than hanging) if the others don't join within `group.timeout_s`."""
    import jax

    configure_platform(group.platform, group.local_device_count)
    if group.num_processes == 1:
        return  # one process needs no coordinator
    if group.platform == "cpu":
        serialise_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=group.coordinator_address, num_processes=group.num_processes,
        process_id=group.process_id, initialization_timeout=group.timeout_s,
        # A lost peer is noticed by the coordinator's heartbeat; the router notices sooner (Ray reports the
        # dead actor) and rebuilds the whole group, since a collective cannot continue without a member.
        heartbeat_timeout_seconds=30, shutdown_timeout_seconds=10)
