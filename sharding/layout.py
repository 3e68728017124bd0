"""Where one replica's params and decode state live on a mesh, and the MoE that matches: one small place.

The model stays unchanged (gpt-fast's `apply_tp` idea): the engine's jitted steps get these shardings as
their inputs' and outputs' layouts, XLA's partitioner splits the attention and FFN matmuls accordingly, and
the experts run through sharding.expert_parallel's all-to-all.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from grok1.config import Grok1Config
from sharding.expert_parallel import make_expert_parallel_moe
from sharding.mesh import MeshShape, make_mesh
from sharding.rules import logical_spec, named_shardings, param_shardings, state_specs


class MeshLayout:
    """A replica's mesh and the shardings of its params and decode state on it (not a Ray placement group)."""

    def __init__(self, config: Grok1Config, shape: MeshShape, devices=None,
                 capacity_factor: float | None = None):
        self.shape = shape.validate(config)
        self.mesh = make_mesh(shape, devices)
        self.moe_fn = make_expert_parallel_moe(self.mesh, capacity_factor=capacity_factor)
        self.replicated = NamedSharding(self.mesh, P())

    def param_shardings(self, params):
        return param_shardings(params, self.mesh)

    def put_params(self, params):
        """Place host (numpy) or device params; arrays already laid out on this mesh are left as they are."""
        return jax.device_put(params, self.param_shardings(params))

    def state_shardings(self, state):
        """The decode state, laid out by sharding.rules.state_specs (the KV cache split, the rest replicated)."""
        return named_shardings(state_specs(state), self.mesh)

    def constrain(self, x, axes: tuple):
        """x (inside a jitted step) laid out by its logical `axes`; a dimension that a mesh axis splits must
        divide evenly (a row bucket smaller than ep, e.g. one row, stays as XLA places it)."""
        spec = logical_spec(axes, f"an array with axes {axes}")
        if any(axis is not None and dim % self.mesh.shape[axis] for dim, axis in zip(x.shape, spec)):
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))
