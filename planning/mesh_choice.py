"""Which ep x tp mesh one replica gets on hosts x devices, or why none fits the model.

Layout rule (`choose_mesh`): one replica spans all hosts x devices. `tp` stays inside a host (it all-reduces
twice per layer, so it wants the fastest links) and is the largest that divides both the devices per host
and the model (larger tp also splits attention and the embedding, which ep replicates); `ep` takes the rest,
across hosts. Explicit `ep`/`tp` override the rule. Decode slots must be a multiple of ep.
"""

from __future__ import annotations

from grok1.config import ConfigError, Grok1Config
from sharding.mesh_shape import MeshShape


class PlanError(ConfigError):
    """No layout of this config on these devices exists (the mesh does not divide the model, ...)."""


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
