"""The sharding planner: will one replica of a config fit on hosts x devices, and with how many decode slots?

Everything here is arithmetic on shapes; no device is touched, so a laptop can plan a 16-GPU layout.
Per-device bytes come from the tables the loader and the mesh layout use, so the plan cannot drift from them:

1. params: the pytree of `grok1.params` (shapes from `layer_shapes`/`top_shapes`, dtypes as
   `grok1.checkpoint.load_checkpoint` returns them) as `ShapeDtypeStruct`s, split by `sharding.rules.param_specs`;
2. decode state: `jax.eval_shape` of `grok1.engine.init_state`, split by `sharding.rules.state_specs` as
   `MeshLayout.state_shardings` is (the KV cache by its logical axes, the rest replicated);
3. activations: an estimate, term by term (see `step_activations`), of the temporaries of the engine's larger
   step: prefill of the longest bucket, or decode of every slot.

Layout rule (`choose_mesh`): one replica spans all hosts x devices. `tp` stays inside a host (it all-reduces
twice per layer, so it wants the fastest links) and is the largest that divides both the devices per host
and the model (larger tp also splits attention and the embedding, which ep replicates); `ep` takes the rest,
across hosts. Explicit `ep`/`tp` override the rule. Decode slots must be a multiple of ep.

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
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

from grok1.config import ConfigError, Grok1Config, ModelConfig
from grok1.params import LAYER_PARAMS, QuantizedWeight, is_quantised, layer_shapes, top_shapes
from sharding.expert_parallel import capacity
from sharding.mesh import MeshShape
from sharding.rules import EP, TP, param_specs, state_specs

# Scale groups G along the input axis in xAI's released checkpoint (the others have one group per column).
RELEASE_SCALE_GROUPS: Mapping[str, int] = {"o_proj": 8, "ffn_out": 8}
# XLA_PYTHON_CLIENT_MEM_FRACTION's default: the share of a GPU's memory JAX preallocates and can use.
JAX_DEFAULT_MEMORY_FRACTION = 0.75


class PlanError(ConfigError):
    """No layout of this config on these devices exists (the mesh does not divide the model, ...)."""


# ------------------------------------------------------------------------------------------ memory sizes

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str, what: str = "memory size") -> int:
    """Bytes in "80GiB", "141GB", "512MiB", "1.5TiB" or "1024" (GB = 10^9 bytes, GiB = 2^30)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size like 80GiB, 141GB or 512MiB")
    number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower() or "b")
    if multiplier is None:
        raise ConfigError(f"{what} {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(number) * multiplier)
    if size <= 0:
        raise ConfigError(f"{what} {text!r} must be more than zero bytes")
    return size


def format_bytes(size: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


# -------------------------------------------------------------------------------------------- the layout


def choose_mesh(config: Grok1Config, hosts: int, devices_per_host: int, ep: int | None = None,
                tp: int | None = None) -> tuple[MeshShape, str]:
    """The ep x tp mesh over all hosts x devices, and a line saying how it was chosen (see the module doc)."""
    if hosts < 1 or devices_per_host < 1:
        raise PlanError(f"hosts ({hosts}) and devices per host ({devices_per_host}) must be positive")
    devices = hosts * devices_per_host
    if ep is not None or tp is not None:
        # The model's rules first: they say more than a device count that does not add up.
        _validated(MeshShape(1 if ep is None else ep, 1 if tp is None else tp), config)
        ep = ep if ep is not None else _exact_quotient(devices, tp, "tp")
        tp = tp if tp is not None else _exact_quotient(devices, ep, "ep")
        if ep * tp != devices:
            raise PlanError(f"mesh ep={ep} x tp={tp} has {ep * tp} devices, but {hosts} hosts x "
                            f"{devices_per_host} devices have {devices}; a replica uses them all")
        return _validated(MeshShape(ep, tp), config), "as given"
    tried = []
    for tp in sorted((d for d in range(1, devices_per_host + 1) if devices_per_host % d == 0), reverse=True):
        try:
            return _validated(MeshShape(devices // tp, tp), config), "tp inside a host, ep across hosts"
        except PlanError as err:
            tried.append(str(err))
    raise PlanError(f"no ep x tp layout of {devices} devices ({hosts} hosts x {devices_per_host}) divides the "
                    f"model with tp inside a host; largest tp tried: {tried[0]}")


def _exact_quotient(devices: int, size: int, axis: str) -> int:
    if size < 1 or devices % size:
        raise PlanError(f"mesh {axis}={size} does not divide the {devices} devices")
    return devices // size


def _validated(mesh: MeshShape, config: Grok1Config) -> MeshShape:
    try:
        return mesh.validate(config)
    except ConfigError as err:
        raise PlanError(str(err)) from None


# ---------------------------------------------------------------------------------- bytes of the pytrees


def param_structs(model: ModelConfig, scale_groups: Mapping[str, int] = RELEASE_SCALE_GROUPS,
                  dequantized: bool = False):
    """The params pytree as `load_checkpoint` returns the release's, as ShapeDtypeStructs: bf16 embedding, f32
    norms and gate, QuantizedWeight(int8 [L, ..., K, N], bf16 scales [L, ..., G, N]) or bf16 if dequantized."""
    layers: dict[str, Any] = {}
    for name, shape in layer_shapes(model).items():
        stacked = (model.num_layers, *shape)
        if not is_quantised(name):
            layers[name] = jax.ShapeDtypeStruct(stacked, np.float32)
        elif dequantized:
            layers[name] = jax.ShapeDtypeStruct(stacked, ml_dtypes.bfloat16)
        else:
            scales = (*stacked[:-2], scale_groups.get(name, 1), stacked[-1])
            layers[name] = QuantizedWeight(jax.ShapeDtypeStruct(stacked, np.int8),
                                           jax.ShapeDtypeStruct(scales, ml_dtypes.bfloat16))
    top = top_shapes(model)
    return {"embedding": jax.ShapeDtypeStruct(top["embedding"], ml_dtypes.bfloat16),
            "final_norm": jax.ShapeDtypeStruct(top["final_norm"], np.float32),
            "layers": {name: layers[name] for name in LAYER_PARAMS}}


def state_structs(config: Grok1Config, slots: int):
    """The engine's DecodeState for `slots` slots as ShapeDtypeStructs (nothing allocated)."""
    from grok1.engine import init_state

    return jax.eval_shape(functools.partial(init_state, config.replace(engine={"max_slots": slots})))


def shard_shape(shape: tuple[int, ...], spec: P, mesh: MeshShape, name: str = "array") -> tuple[int, ...]:
    """The block of `shape` each device holds under `spec`; every split dimension must divide evenly."""
    sizes = {EP: mesh.ep, TP: mesh.tp}
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    block = []
    for axis, (dim, names) in enumerate(zip(shape, entries)):
        names = () if names is None else (names,) if isinstance(names, str) else tuple(names)
        parts = math.prod(sizes[n] for n in names)
        if dim % parts:
            raise PlanError(f"{name}: dimension {axis} of shape {tuple(shape)} ({dim}) does not divide over "
                            f"{'x'.join(f'{n}={sizes[n]}' for n in names)}")
        block.append(dim // parts)
    return tuple(block)


def per_device_bytes(structs, specs, mesh: MeshShape) -> dict[str, int]:
    """Bytes each device holds, by leaf path ("layers/q_proj/weight", ...). Every device holds as many."""
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    flat = jax.tree_util.tree_flatten_with_path(structs)[0]
    out = {}
    for (path, leaf), spec in zip(flat, flat_specs, strict=True):
        name = "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)
        out[name] = math.prod(shard_shape(leaf.shape, spec, mesh, name)) * np.dtype(leaf.dtype).itemsize
    return out


def total_bytes(structs) -> int:
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(structs))


WEIGHT_KINDS = ("int8 weights", "scales (bf16)", "dequantised weights (bf16)", "embedding (bf16)",
                "norms, gate (f32)")  # the plan's lines, in this order


def weight_kind(path: str) -> str:
    """Which of WEIGHT_KINDS a param leaf ("layers/q_proj/weight", "embedding", ...) counts in."""
    if path.endswith("/weight"):
        return "int8 weights"
    if path.endswith("/scales"):
        return "scales (bf16)"
    if path.startswith("layers/") and is_quantised(path.split("/")[1]):
        return "dequantised weights (bf16)"
    if path == "embedding":
        return "embedding (bf16)"
    return "norms, gate (f32)"


# ------------------------------------------------------------------------------------------- activations

# f32 [T, D] copies alive at once in a decoder layer: the residual h, the rms_norm input widened to f32 and
# its output, the attention output's partial sum before the tp all-reduce, and the expert combine's sum.
RESIDUAL_F32_COPIES = 5
# f32 [rows, V] copies in sampling: the widened logits, the penalised ones (grok1.sampling.apply_penalties:
# the logprobs still read the widened ones), the scaled ones, and for top-k/top-p the sorted copy, its
# softmax and cumulative sum (grok1.sampling._filter_top_k_top_p). The [B, V] int32 token counts the
# penalties read are decode state (counted there, updated in place), not a temporary.
SAMPLING_F32_COPIES = 6


def step_activations(model: ModelConfig, mesh: MeshShape, block: int, *, batch: int, tokens: int,
                     kv_len: int, sampled_rows: int) -> dict[str, int]:
    """Per-device bytes of the temporaries of one engine step, term by term, following grok1.model's code.

    batch x tokens are fed, attending to kv_len cached positions; sampled_rows rows of logits are sampled.
    Attention runs data parallel over ep only when the batch splits (a one-slot prefill runs whole on each).
    Layers run one at a time (lax.scan), experts one at a time (expert_ffn_grouped), so only one layer's and
    one expert's dequantised weights exist at once.
    """
    d, k, f = model.emb_size, model.key_size, model.ffn_size
    heads, kv_heads = model.num_q_heads // mesh.tp, model.num_kv_heads // mesh.tp
    rows = batch // mesh.ep if batch % mesh.ep == 0 else batch  # attention rows on one device
    experts_here = model.num_experts // mesh.ep
    local = -(-batch * tokens // mesh.ep)  # tokens each ep rank routes (padded to a multiple of ep)
    sent = mesh.ep * capacity(local, model.num_selected_experts, experts_here, mesh.ep, None)
    sorted_rows = (sent + experts_here * (block - 1) + block - 1) // block * block  # model.plan_dispatch
    return {
        # [B, H, T, S] f32 logits (capped, masked) and their softmax, both alive around the fused softmax.
        "attention scores": 2 * 4 * rows * heads * tokens * kv_len,
        # The layer's cached keys and values gathered for the batch's rows: [B, S, Hkv, K] bf16, twice.
        "cache rows read": 2 * 2 * rows * kv_len * kv_heads * k,
        "q, k, v": 2 * rows * tokens * (heads + 2 * kv_heads) * k,
        "residual stream": RESIDUAL_F32_COPIES * 4 * batch * tokens * d,
        # sharding.expert_parallel: send and receive [ep, C, D] bf16, results and return f32, and the
        # expert-sorted buffers (bf16 in, f32 out).
        "expert dispatch": sent * d * (2 + 2 + 4 + 4) + sorted_rows * d * (2 + 4),
        # One expert's gelu and value matrices in bf16 and its output matrix in f32, and one layer's q, k,
        # v and o projections in bf16.
        "dequantised weights": d * (f // mesh.tp) * (2 + 2 + 4) + 2 * d * (heads + 2 * kv_heads + heads) * k,
        "logits": SAMPLING_F32_COPIES * 4 * sampled_rows * model.vocab_size,
    }


def headroom_terms(config: Grok1Config, mesh: MeshShape, slots: int) -> tuple[str, dict[str, int]]:
    """The larger of the two steps' temporaries: prefill of the longest bucket, or decode of every slot."""
    engine = config.engine
    longest = engine.buckets_up_to_max_len()[-1]
    prefill = step_activations(config.model, mesh, engine.moe_block_size, batch=1, tokens=longest,
                               kv_len=longest, sampled_rows=1)
    decode = step_activations(config.model, mesh, engine.moe_block_size, batch=slots, tokens=1,
                              kv_len=engine.max_len, sampled_rows=slots)
    if sum(prefill.values()) >= sum(decode.values()):
        return f"prefill of {longest} tokens", prefill
    return f"decode of {slots} slots", decode


# ------------------------------------------------------------------------------------------------- plan


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
    problem: str | None = None  # why this layout is infeasible

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
                "feasible": self.feasible}

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
        ]
        width = max(len(label) for label, _, _ in lines) + 2
        value_width = max(len(value) for _, value, _ in lines) + 2
        text = [f"{label:<{width}}{value:<{value_width}}{note}".rstrip() for label, value, note in lines]
        text.append(f"feasible: no: {self.problem}" if self.problem else "feasible: yes")
        return "\n".join(text)


def plan(config: Grok1Config, hosts: int, devices_per_host: int, device_memory: int, *,
         slots: int | None = None, max_len: int | None = None, ep: int | None = None, tp: int | None = None,
         memory_fraction: float | None = None,
         scale_groups: Mapping[str, int] = RELEASE_SCALE_GROUPS) -> Plan:
    """Lay one replica of `config` over hosts x devices_per_host devices of `device_memory` bytes.

    Raises PlanError when no layout exists; returns a Plan whose `problem` says why when the layout exists
    but does not fit (weights alone too large, no slot fits, the requested slots do not fit).
    memory_fraction: the share of each device XLA may use (None: JAX's default, see the module doc).
    """
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
                max_slots=max_slots, problem=problem)


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
