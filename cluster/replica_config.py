"""A model replica's serving settings: one typed record, validated once, with a description per field.

Where the defaults live, and why here: a replica is made in cluster/ (`start_router`), and this is the lowest
layer that needs all of its settings: the router reads the backend, queue bound and health timeout, and it
builds the shard group's `workers.group.GroupSpec` from the mesh, placement and step timeouts
(`ReplicaConfig.group_spec`). GroupSpec keeps no defaults of its own, so workers/ (below) never declares a
setting twice, and the model config (grok1/) stays about the model: `engine.max_slots` and `max_len` size the
KV cache, so they are the model config's, not a serving knob.

The ingress's own settings (API keys, body timeout, replicas, which config and checkpoint) extend this
model in ingress/serving_config.py (`ServingConfig`). That one model is what `grok1 serve` flags,
`build_app(...)` arguments (strings, from `serve run ... key=value`) and the manifests' serveConfigV2 `args`
override; nothing else declares a default. No JAX and no Ray: the CLI and the tests validate without either.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sharding.mesh_shape import MeshShape
from workers.cpu_binding import check_setting
from workers.group import GroupSpec

if TYPE_CHECKING:
    from grok1.config import Grok1Config

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
NONE_WORDS = ("", "none", "None", "null")  # how `serve run ... checkpoint=none` spells "not set"


class ServingConfigError(ValueError):
    """A serving setting is unknown or has a bad value; the message names each field and what it got."""


def _allows_none(annotation) -> bool:
    return annotation is type(None) or type(None) in typing.get_args(annotation)


class ReplicaConfig(BaseModel):
    """One model replica: its router, and the shard group the router starts and rebuilds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ep: int = Field(2, ge=1, le=4096, description="expert-parallel shards per model replica (the mesh is "
                                                  "ep x tp devices; ep must divide the experts and the slots)")
    tp: int = Field(1, ge=1, le=4096, description="tensor-parallel size per model replica (divides the KV heads)")
    placement_strategy: PlacementStrategy = Field(
        "PACK", description="how Ray places the shard workers: PACK fills a node before the next (a tp group "
                            "stays on one host), SPREAD puts them on different nodes; STRICT_ fails instead")
    backend: Literal["ray", "local"] = Field(
        "ray", description="ray: one Ray actor per shard process; local: the engine inside the router's "
                           "process (one device; tests)")
    max_queue: int = Field(256, ge=0, le=1_000_000,
                           description="requests that may wait beyond the free decode slots; more are "
                                       "refused at once (HTTP 429, gRPC RESOURCE_EXHAUSTED)")
    use_gpus: bool = Field(False, description="place the shard workers on GPUs (devices_per_process each)")
    devices_per_process: int = Field(1, ge=1, le=64,
                                     description="devices per shard worker process: GPUs on GPU nodes, "
                                                 "virtual CPU devices otherwise")
    capacity_factor: float | None = Field(
        None, gt=0, le=64, description="expert capacity per step as a multiple of the even share of tokens "
                                       "(tokens over it are dropped); none: dropless")
    start_timeout_s: float = Field(600, gt=0, le=86_400,
                                   description="seconds for the shard group to start: placement, joining the "
                                               "mesh and loading the weights (the real checkpoint takes minutes)")
    step_timeout_s: float = Field(120, gt=0, le=3600,
                                  description="seconds one prefill or decode step may take before the group is "
                                              "declared failed and rebuilt")
    health_timeout_s: float = Field(30, gt=0, le=600,
                                    description="seconds a health probe (a 1-token generation) may take")
    resume_timeout_s: float = Field(
        120, gt=0, le=86_400, description="seconds a request may wait for a failed shard group to be rebuilt "
                                          "(running ones then resume where they were, queued ones start); "
                                          "past it, it ends with the retriable error")
    drain_grace_s: float = Field(
        60, gt=0, le=3600, description="on replica shutdown: seconds running requests may take to finish "
                                       "(new ones get HTTP 503 meanwhile); the rest then end with the "
                                       "retriable error. Serve's graceful_shutdown_timeout_s and the pods' "
                                       "terminationGracePeriodSeconds are set above it")
    pipelined: bool = Field(True, description="start decode step k+1 before reading step k's tokens")
    cpu_bind: str = Field(
        "all", max_length=4096,
        description="CPU workers only: auto splits a node's CPUs evenly among its shard workers (each runs "
                    "XLA's threads on its own cores), all shares them, \"0-3|4-7\" names each worker's CPUs "
                    "in rank order (workers/cpu_binding.py)")

    @field_validator("cpu_bind")
    @classmethod
    def _cpu_bind(cls, value: str) -> str:
        return check_setting(value)

    @model_validator(mode="before")
    @classmethod
    def _none_words(cls, data):
        """Strings that say "not set" become None for the fields that may be None (and only those)."""
        if not isinstance(data, Mapping):
            return data
        fields = cls.model_fields
        return {name: None if name in fields and _allows_none(fields[name].annotation) and
                isinstance(value, str) and value in NONE_WORDS else value for name, value in data.items()}

    @classmethod
    def from_overrides(cls, overrides: Mapping | None = None, *, base: "ReplicaConfig | None" = None,
                       strict: bool = False):
        """The defaults (or `base`), overridden by `overrides`; a ServingConfigError names each bad field.
        `strict`: values must have the field's own type (a manifest's YAML), not a string to convert."""
        inherited = base.model_dump(include=set(cls.model_fields)) if base is not None else {}
        values = {**inherited, **dict(overrides or {})}
        try:
            return cls.model_validate(values, strict=strict)
        except ValidationError as err:
            raise ServingConfigError(describe(err, cls)) from None

    def override(self, **changes) -> "ReplicaConfig":
        """A copy with `changes` applied, validated (pydantic's model_copy(update=...) would not check them)."""
        return type(self).from_overrides(changes, base=self)

    def replica(self) -> "ReplicaConfig":
        """Only the replica's settings, as this class (what travels to the router actor)."""
        return ReplicaConfig.from_overrides(base=self)

    def group_spec(self, config: "Grok1Config", checkpoint: str, env: Mapping[str, str] | None = None,
                   placement_name: str | None = None) -> GroupSpec:
        """The shard group for `config`'s model and `checkpoint`, checked against the model (mesh sizes);
        `placement_name` names its placement group (one per replica, so a stale one can be found)."""
        return GroupSpec(config=config, checkpoint=str(checkpoint), mesh=MeshShape(self.ep, self.tp),
                         strategy=self.placement_strategy, devices_per_process=self.devices_per_process,
                         use_gpus=self.use_gpus, capacity_factor=self.capacity_factor,
                         start_timeout_s=self.start_timeout_s, step_timeout_s=self.step_timeout_s,
                         env=tuple(sorted((env or {}).items())), cpu_bind=self.cpu_bind,
                         placement_name=placement_name,
                         progress_to=None).validate()


def describe(err: ValidationError, model: type[BaseModel]) -> str:
    """One clause per problem: `field: what is wrong (got value)`, a close known name for an unknown one."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(the arguments)"
        if problem["type"] == "extra_forbidden":
            close = difflib.get_close_matches(field, list(model.model_fields), n=1)
            lines.append(f"{field}: unknown setting" + (f" (did you mean {close[0]}?)" if close else ""))
        else:
            lines.append(f"{field}: {problem['msg']} (got {problem.get('input')!r})")
    return f"{model.__name__}: " + "; ".join(lines)
