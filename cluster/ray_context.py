"""Where the calling code runs in Ray: its node and its actor (None outside Ray)."""

from __future__ import annotations

import ray


def this_node_id() -> str | None:
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def this_actor():
    """This actor's handle (None outside a Ray actor, e.g. a router made in a test's process)."""
    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return None
    return ray.get_runtime_context().current_actor
