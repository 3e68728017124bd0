"""Typed, validated configuration for the Grok-1 model and the engine around it.

A config file (YAML or JSON) has up to four sections::

    name: grok-1
    model:      {...}   # the architecture, as in xAI's release (`ModelConfig`)
    engine:     {...}   # decode slots, context per slot, prefill buckets (`EngineConfig`)
    checkpoint: {...}   # where the weights are and how to hold them (`CheckpointConfig`)
    tokenizer:  path    # optional; see grok1.tokenizer for the lookup order

Unknown keys and impossible values raise `ConfigError` naming the key (e.g. ``model.num_kv_heads``).
`load_config` also accepts the flat `config.json` of a golden set (the reference's field names).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping


class ConfigError(ValueError):
    """A config key is unknown, missing or has an impossible value; the message names the key."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's `true` is not a size


def reference_ffn_size(emb_size: int, widening_factor: float) -> int:
    """FFN hidden size exactly as xAI's `model.py::ffn_size`: 2/3 of the widened size, rounded up to 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclass(frozen=True)
class ModelConfig:
    """The architecture. Defaults are the released Grok-1; every field is a key of `model:`."""

    vocab_size: int = 131072
    pad_token: int = 0
    eos_token: int = 2
    sequence_len: int = 8192  # context the model was trained for
    emb_size: int = 6144
    key_size: int = 128  # per-head size of queries, keys and values
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    widening_factor: float = 8.0
    num_experts: int = 8
    num_selected_experts: int = 2
    # From the release: logits of attention are scaled by this (1/sqrt(key_size) for Grok-1) before the
    # 30*tanh(x/30) soft cap.
    attn_output_multiplier: float = 0.08838834764831845
    # From the release: token embeddings are multiplied by this (about sqrt(6144)) on the way in ...
    embedding_multiplier_scale: float = 78.38367176906169
    # ... and the tied output projection's logits by this (1/sqrt(3)) on the way out.
    output_multiplier_scale: float = 0.5773502691896257
    # Only used to initialise random weights (the reference's init scale for the embedding).
    embedding_init_scale: float = 1.0

    @property
    def ffn_size(self) -> int:
        return reference_ffn_size(self.emb_size, self.widening_factor)

    @property
    def q_per_kv(self) -> int:
        return self.num_q_heads // self.num_kv_heads

    def validate(self, prefix: str = "model") -> "ModelConfig":
        positive = ["vocab_size", "sequence_len", "emb_size", "key_size", "num_q_heads", "num_kv_heads",
                    "num_layers", "num_experts", "num_selected_experts"]
        for name in positive:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{prefix}.{name} must be a positive integer, got {value!r}")
        for name in ["widening_factor", "attn_output_multiplier", "embedding_multiplier_scale",
                     "output_multiplier_scale", "embedding_init_scale"]:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{prefix}.{name} must be a positive number, got {value!r}")
        for name in ["pad_token", "eos_token"]:
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"{prefix}.{name} must be a token id in [0, vocab_size), got {value!r}")
        if self.num_q_heads % self.num_kv_heads:
            raise ConfigError(f"{prefix}.num_kv_heads ({self.num_kv_heads}) must divide "
                              f"num_q_heads ({self.num_q_heads})")
        if self.key_size % 2:
            raise ConfigError(f"{prefix}.key_size must be even for rotary embeddings, got {self.key_size}")
        if self.num_selected_experts > self.num_experts:
            raise ConfigError(f"{prefix}.num_selected_experts ({self.num_selected_experts}) exceeds "
                              f"num_experts ({self.num_experts})")
        return self

    def param_count(self) -> int:
        """Number of weights (int8 matrices count one per element; scales are not counted)."""
        d, f, e, k = self.emb_size, self.ffn_size, self.num_experts, self.key_size
        attn = d * k * (self.num_q_heads + 2 * self.num_kv_heads) + self.num_q_heads * k * d
        moe = e * 3 * d * f + d * e
        norms = 4 * d
        return self.vocab_size * d + d + self.num_layers * (attn + moe + norms)


@dataclass(frozen=True)
class EngineConfig:
    """The serving engine: how many sequences decode together and how long each may grow."""

    max_slots: int = 8  # concurrent sequences in one decode step
    max_len: int = 1024  # KV-cache length per slot (prompt + generated); at most model.sequence_len
    prefill_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    # Tokens per block of the grouped expert matmul: every expert's tokens are padded to a multiple of it.
    moe_block_size: int = 16
    # The paged KV cache (grok1/paged_engine.py): kv_blocks blocks of kv_block_size token positions per layer,
    # shared by all sequences; 0 keeps the contiguous cache of max_slots x max_len positions.
    kv_blocks: int = 0
    kv_block_size: int = 16
    # Tokens one paged step runs, decode and prefill chunks together (0: whole prompts, no chunking).
    token_budget: int = 0

    def validate(self, model: ModelConfig, prefix: str = "engine") -> "EngineConfig":
        for name in ["max_slots", "max_len", "moe_block_size"]:
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"{prefix}.{name} must be a positive integer, got {value!r}")
        for name in ["kv_blocks", "token_budget"]:
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ConfigError(f"{prefix}.{name} must be a non-negative integer, got {value!r}")
        if not _is_int(self.kv_block_size) or self.kv_block_size <= 0:
            raise ConfigError(f"{prefix}.kv_block_size must be a positive integer, got {self.kv_block_size!r}")
        if self.token_budget and (not self.kv_blocks or self.token_budget <= self.max_slots):
            raise ConfigError(f"{prefix}.token_budget ({self.token_budget}) needs a paged cache (kv_blocks) and "
                              f"must exceed max_slots ({self.max_slots}), so that every step has room to prefill")
        if self.max_len > model.sequence_len:
            raise ConfigError(f"{prefix}.max_len ({self.max_len}) exceeds model.sequence_len "
                              f"({model.sequence_len})")
        buckets = tuple(self.prefill_buckets)
        if not buckets or any(not _is_int(b) or b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
            raise ConfigError(f"{prefix}.prefill_buckets must be increasing positive integers, got {buckets!r}")
        return self

    @property
    def paged(self) -> bool:
        return self.kv_blocks > 0

    def buckets_up_to_max_len(self) -> tuple[int, ...]:
        """Prefill lengths in use: the configured buckets below max_len, and max_len itself."""
        return tuple(b for b in self.prefill_buckets if b < self.max_len) + (self.max_len,)


@dataclass(frozen=True)
class CheckpointConfig:
    path: str | None = None  # a directory holding ckpt-0/ (released layout)
    dequantize_on_load: bool = False  # False: keep int8 + scales in memory, dequantise inside matmuls

    def validate(self, prefix: str = "checkpoint") -> "CheckpointConfig":
        if self.path is not None and not isinstance(self.path, str):
            raise ConfigError(f"{prefix}.path must be a string, got {self.path!r}")
        if not isinstance(self.dequantize_on_load, bool):
            raise ConfigError(f"{prefix}.dequantize_on_load must be true or false")
        return self


@dataclass(frozen=True)
class Grok1Config:
    name: str = "grok-1"
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tokenizer: str | None = None

    def validate(self) -> "Grok1Config":
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            raise ConfigError(f"tokenizer must be a path, got {self.tokenizer!r}")
        self.model.validate()
        self.engine.validate(self.model)
        self.checkpoint.validate()
        return self

    def replace(self, **sections: Any) -> "Grok1Config":
        """A copy with whole sections or fields of sections replaced, e.g. replace(engine={"max_slots": 4})."""
        updates = {}
        for key, value in sections.items():
            current = getattr(self, key)
            if isinstance(value, Mapping) and dataclasses.is_dataclass(current):
                value = _build(type(current), {**dataclasses.asdict(current), **value}, key)
            updates[key] = value
        return dataclasses.replace(self, **updates).validate()


def _build(cls, data: Mapping[str, Any], prefix: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown key {prefix}.{key} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for key, value in data.items():
        default = known[key].default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key == "prefill_buckets" and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Grok1Config:
    """Build and validate a config from its parsed file content."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the config must be a mapping")
    if "model" not in data and "emb_size" in data:
        # A golden set's config.json: the reference's flat field names, model only.
        data = {"name": Path(source).parent.name or "golden", "model": dict(data)}
    sections = {"name", "model", "engine", "checkpoint", "tokenizer"}
    for key in data:
        if key not in sections:
            raise ConfigError(f"{source}: unknown key {key} (known: {', '.join(sorted(sections))})")
    model = _build(ModelConfig, data.get("model") or {}, "model")
    engine_data = dict(data.get("engine") or {})
    engine_data.setdefault("max_len", min(EngineConfig.max_len, model.sequence_len))
    engine = _build(EngineConfig, engine_data, "engine")
    checkpoint = _build(CheckpointConfig, data.get("checkpoint") or {}, "checkpoint")
    try:
        return Grok1Config(name=str(data.get("name", "grok-1")), model=model, engine=engine,
                           checkpoint=checkpoint, tokenizer=data.get("tokenizer")).validate()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | os.PathLike) -> Grok1Config:
    """Load a YAML or JSON config file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    try:
        return config_from_dict(data, str(path))
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
