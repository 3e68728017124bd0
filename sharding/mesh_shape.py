"""The device mesh's shape, `ep` (expert parallel) x `tp` (tensor parallel), chosen from config and validated;
without JAX, since the router and the workers' group need it before any device exists.

Decisions, so that every layout that is accepted runs the same numbers as one device:
- `ep` must divide the experts (8 for Grok-1), the decode slots (attention runs data parallel over ep) and a
  paged pool's blocks (each rank holds the blocks of its own slots' sequences).
- `tp` must divide the KV heads (8 for Grok-1): KV heads are split, never replicated, so tp is 1, 2, 4 or 8.
  It must also divide the query heads, the FFN size and the vocabulary, and any scale groups (the release
  has G = 8 on the attention output and the experts' output matrices).
"""

from __future__ import annotations

from dataclasses import dataclass

from grok1.config import ConfigError, Grok1Config

EP, TP = "ep", "tp"  # the mesh's axis names: expert parallel, tensor parallel


@dataclass(frozen=True)
class MeshShape:
    ep: int = 1
    tp: int = 1

    @property
    def size(self) -> int:
        return self.ep * self.tp

    def validate(self, config: Grok1Config) -> "MeshShape":
        model = config.model
        if self.ep < 1 or self.tp < 1:
            raise ConfigError(f"mesh ep={self.ep} tp={self.tp}: both must be positive")
        checks = [
            (EP, self.ep, model.num_experts, "model.num_experts"),
            (EP, self.ep, config.engine.max_slots, "engine.max_slots (decode slots are split over ep)"),
            (TP, self.tp, model.num_kv_heads, "model.num_kv_heads (KV heads are split, not replicated)"),
            (TP, self.tp, model.num_q_heads, "model.num_q_heads"),
            (TP, self.tp, model.ffn_size, "the FFN size"),
            (TP, self.tp, model.vocab_size, "model.vocab_size"),
        ]
        if config.engine.paged:
            checks.append((EP, self.ep, config.engine.kv_blocks,
                           "engine.kv_blocks (the paged pool is split over ep, one share per rank)"))
        for axis, size, total, what in checks:
            if total % size:
                raise ConfigError(f"mesh {axis}={size} does not divide {what} = {total}")
        return self
