"""The deployment planner (`grok1 plan`): will one replica of a config fit on hosts x devices, and with how
many decode slots?

Everything here is arithmetic on shapes; no device is touched, so a laptop can plan a 16-GPU layout.
Per-device bytes come from the tables the loader and the mesh layout use, so the plan cannot drift from them:

1. params and decode state: planning.footprint (split by sharding.rules' logical-axis table);
2. activations: an estimate, term by term (planning.activations), of the temporaries of the engine's larger
   step: prefill of the longest bucket, or decode of every slot;
3. the mesh: planning.mesh_choice.

Memory per device that the plan may use is `device_memory * memory_fraction`. The default fraction, 0.75, is
JAX's default GPU preallocation (XLA_PYTHON_CLIENT_MEM_FRACTION): XLA's allocator never hands out more unless
the deployment raises that variable (the rest is left to the CUDA context and libraries). Pass the
deployment's value when it sets one. No other margin is added: the activation estimate is meant as an upper
bound of XLA's temporaries, term by term from grok1.model's code. It is not calibrated on a GPU yet, and
XLA:CPU's `compiled.memory_analysis()` cannot calibrate it: XLA:CPU widens bf16 dot operands and scatters to
f32 (for the tiny config, a 64 MiB f32 copy of the embedding for the output projection), which XLA:GPU does
not. On a GPU, compare `temp_size_in_bytes` of the engine's prefill and decode steps with `headroom_terms`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from grok1.config import Grok1Config
from planning.activations import headroom_terms
from planning.footprint import (
    RELEASE_SCALE_GROUPS,
    WEIGHT_KINDS,
    param_structs,
    per_device_bytes,
    state_structs,
    total_bytes,
    weight_kind,
)
from planning.memory_size import format_bytes
from planning.mesh_choice import PlanError, choose_mesh
from sharding.mesh_shape import MeshShape
from sharding.rules import param_specs, state_specs

# XLA_PYTHON_CLIENT_MEM_FRACTION's default: the share of a GPU's memory JAX preallocates and can use.
JAX_DEFAULT_MEMORY_FRACTION = 0.75


@dataclass
class Plan:
    config_name: str
    hosts: int
    devices_per_host: int
    device_memory: int
    memory_fraction: float
    mesh: MeshShape
    layout_rule: str
    max_len: int
    slots: int  # requested (or the config's)
    model_bytes: int  # one copy of every weight
    weight_bytes: dict[str, int]  # per device, by kind
    kv_bytes_per_slot: int  # whole replica
    state_bytes_per_slot: int  # whole replica, besides the KV cache
    state_bytes_per_device: int  # for `slots` slots
    headroom_step: str
    headroom: dict[str, int]  # per device, by term, at `slots`
    max_slots: int  # largest multiple of ep that fits (0: none)
    # A paged KV cache (engine.kv_blocks): every token costs the same KV wherever it is, so capacity is in
    # tokens. The pool is split over ep (each rank holds its own slots' blocks) and its KV heads over tp.
    kv_bytes_per_token: int = 0  # whole replica, every layer, keys and values
    kv_capacity_tokens: int = 0  # what the memory left after weights, headroom and `slots`' other state holds
    mean_len: int = 0  # the mean sequence length the concurrency is counted at
    problem: str | None = None  # why this layout is infeasible

    @property
    def paged_concurrency(self) -> int:
        """Sequences a paged pool of kv_capacity_tokens holds at mean_len tokens each."""
        return self.kv_capacity_tokens // self.mean_len if self.mean_len else 0

    @property
    def usable_bytes(self) -> int:
        return int(self.device_memory * self.memory_fraction)

    @property
    def weights_per_device(self) -> int:
        return sum(self.weight_bytes.values())

    @property
    def headroom_bytes(self) -> int:
        return sum(self.headroom.values())

    @property
    def used_per_device(self) -> int:
        return self.weights_per_device + self.state_bytes_per_device + self.headroom_bytes

    @property
    def feasible(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "mesh": {"ep": self.mesh.ep, "tp": self.mesh.tp},
                "usable_bytes": self.usable_bytes, "weights_per_device": self.weights_per_device,
                "headroom_bytes": self.headroom_bytes, "used_per_device": self.used_per_device,
                "paged_concurrency": self.paged_concurrency, "feasible": self.feasible}

    def format(self) -> str:
        devices = self.hosts * self.devices_per_host
        kv_device = self.kv_bytes_per_slot // self.mesh.tp
        lines = [
            ("config", self.config_name, f"max_len {self.max_len}"),
            ("devices", f"{self.hosts} host{'s' * (self.hosts != 1)} x {self.devices_per_host} = {devices}",
             f"{format_bytes(self.device_memory)} each, {format_bytes(self.usable_bytes)} usable "
             f"(fraction {self.memory_fraction:g})"),
            ("layout", f"ep={self.mesh.ep} x tp={self.mesh.tp}", self.layout_rule),
            ("weights, whole model", format_bytes(self.model_bytes), f"{self.model_bytes:,} B"),
            ("weights per device", format_bytes(self.weights_per_device), f"{self.weights_per_device:,} B"),
            *[(f"  {kind}", format_bytes(size), f"{size:,} B") for kind, size in self.weight_bytes.items()],
            ("KV cache per slot", format_bytes(self.kv_bytes_per_slot),
             f"{format_bytes(kv_device)} on each of the slot's {self.mesh.tp} devices (tp)"),
            ("KV cache, all slots", format_bytes(self.kv_bytes_per_slot * self.slots),
             f"{self.slots} slots, {self.slots // self.mesh.ep} per ep rank"),
            ("decode state per device", format_bytes(self.state_bytes_per_device),
             f"KV cache + {self.state_bytes_per_slot} B per slot of lengths, tokens, sampling, token counts"),
            ("activation headroom", format_bytes(self.headroom_bytes), self.headroom_step),
            *[(f"  {term}", format_bytes(size), "") for term, size in self.headroom.items()],
            ("used per device", format_bytes(self.used_per_device),
             f"{100 * self.used_per_device / self.usable_bytes:.1f}% of usable"),
            ("largest slot count", str(self.max_slots),
             f"a multiple of ep={self.mesh.ep} at max_len {self.max_len}"),
            ("paged KV capacity", f"{self.kv_capacity_tokens:,} tokens",
             f"{format_bytes(self.kv_bytes_per_token)} per token; the pool split over ep and tp"),
            ("paged concurrency", str(self.paged_concurrency), f"sequences at a mean length of {self.mean_len}"),
        ]
        width = max(len(label) for label, _, _ in lines) + 2
        value_width = max(len(value) for _, value, _ in lines) + 2
        text = [f"{label:<{width}}{value:<{value_width}}{note}".rstrip() for label, value, note in lines]
        text.append(f"feasible: no: {self.problem}" if self.problem else "feasible: yes")
        return "\n".join(text)


def plan(config: Grok1Config, hosts: int, devices_per_host: int, device_memory: int, *,
         slots: int | None = None, max_len: int | None = None, ep: int | None = None, tp: int | None = None,
         memory_fraction: float | None = None, mean_len: int = 1024,
         scale_groups: Mapping[str, int] = RELEASE_SCALE_GROUPS) -> Plan:
    """Lay one replica of `config` over hosts x devices_per_host devices of `device_memory` bytes.

    Raises PlanError when no layout exists; returns a Plan whose `problem` says why when the layout exists
    but does not fit (weights alone too large, no slot fits, the requested slots do not fit).
    memory_fraction: the share of each device XLA may use (None: JAX's default, see the module doc).
    mean_len: the mean sequence length (prompt + output) at which the paged cache's concurrency is counted.
    """
    if mean_len < 1:
        raise PlanError(f"mean length must be at least 1 token, got {mean_len}")
    memory_fraction = JAX_DEFAULT_MEMORY_FRACTION if memory_fraction is None else memory_fraction
    if not 0 < memory_fraction <= 1:
        raise PlanError(f"memory fraction must be in (0, 1], got {memory_fraction}")
    engine = {"max_slots": slots} if slots is not None else {}
    if max_len is not None:
        engine["max_len"] = max_len
    config = config.replace(engine=engine) if engine else config
    slots = config.engine.max_slots
    mesh, rule = choose_mesh(config, hosts, devices_per_host, ep, tp)

    params = param_structs(config.model, scale_groups, config.checkpoint.dequantize_on_load)
    by_leaf = per_device_bytes(params, param_specs(params), mesh)
    weight_bytes = {kind: sum(size for path, size in by_leaf.items() if weight_kind(path) == kind)
                    for kind in WEIGHT_KINDS}
    weight_bytes = {kind: size for kind, size in weight_bytes.items() if size}

    def state_per_device(count: int) -> int:
        state = state_structs(config, count)
        return sum(per_device_bytes(state, state_specs(state), mesh).values())

    one_slot = state_structs(config, mesh.ep)  # the smallest state the mesh splits evenly
    kv_per_slot = total_bytes(one_slot.cache) // mesh.ep
    other_per_slot = (total_bytes(one_slot) - total_bytes(one_slot.cache)) // mesh.ep
    usable = int(device_memory * memory_fraction)
    weights = sum(weight_bytes.values())

    def needed(count: int) -> int:
        return weights + state_per_device(count) + sum(headroom_terms(config, mesh, count)[1].values())

    max_slots = _largest_fitting(needed, usable, mesh.ep)
    kv_per_token = kv_per_slot // config.engine.max_len
    # Left for a paged pool once `slots` slots' other state (sampling, token counts) and headroom are placed.
    contiguous_kv_device = kv_per_slot * slots // (mesh.ep * mesh.tp)
    left = usable - needed(slots) + contiguous_kv_device
    # Each device holds a 1/tp slice of the heads of its rank's share of the pool: ep shares per replica.
    kv_capacity = max(left, 0) // max(kv_per_token // mesh.tp, 1) * mesh.ep
    step, headroom = headroom_terms(config, mesh, slots)
    problem = None
    if weights > usable:
        problem = (f"weights alone exceed memory: {format_bytes(weights)} per device > "
                   f"{format_bytes(usable)} usable on ep={mesh.ep} x tp={mesh.tp}")
    elif max_slots == 0:
        problem = (f"no slot fits: weights {format_bytes(weights)} + activations and KV cache of {mesh.ep} "
                   f"slot(s) at max_len {config.engine.max_len} need {format_bytes(needed(mesh.ep))} > "
                   f"{format_bytes(usable)} usable")
    elif slots > max_slots:
        problem = (f"the requested {slots} slots do not fit: they need {format_bytes(needed(slots))} per device "
                   f"> {format_bytes(usable)} usable; at most {max_slots} slots fit at max_len "
                   f"{config.engine.max_len}")
    return Plan(config_name=config.name, hosts=hosts, devices_per_host=devices_per_host,
                device_memory=device_memory, memory_fraction=memory_fraction, mesh=mesh, layout_rule=rule,
                max_len=config.engine.max_len, slots=slots, model_bytes=total_bytes(params),
                weight_bytes=weight_bytes, kv_bytes_per_slot=kv_per_slot, state_bytes_per_slot=other_per_slot,
                state_bytes_per_device=state_per_device(slots), headroom_step=step, headroom=headroom,
                max_slots=max_slots, kv_bytes_per_token=kv_per_token, kv_capacity_tokens=kv_capacity,
                mean_len=mean_len, problem=problem)


def _largest_fitting(needed, usable: int, step: int, limit: int = 1 << 20) -> int:
    """The largest multiple of `step` (up to `limit`) whose `needed(count)` fits; 0 if none. needed grows."""
    if needed(step) > usable:
        return 0
    low, high = 1, 2  # in units of step: low fits, high is unknown until tried
    while high * step <= limit and needed(high * step) <= usable:
        low, high = high, high * 2
    high = min(high, limit // step + 1)
    while high - low > 1:  # low fits, high does not (or is past the limit)
        middle = (low + high) // 2
        if needed(middle * step) <= usable:
            low = middle
        else:
            high = middle
    return low * step
