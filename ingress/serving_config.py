"""The serving config: the replica's settings (cluster/replica_config.py) and the ingress's own, one model.

`grok1 serve` flags (cli/flags.py derives them, help text included, from the descriptions here),
`build_app(...)` arguments (`serve run ingress.app:build_app ep=2` passes strings; pydantic converts them and
refuses what does not convert) and the manifests' serveConfigV2 `args` (tests/test_deploy.py validates them
against this model) only override the defaults declared below. The ingress fields live here, not in
cluster/, because only the ingress uses them; the router is sent `replica()`, the cluster's part alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field

from cluster.replica_config import ReplicaConfig

if TYPE_CHECKING:
    from grok1.config import Grok1Config

DEFAULT_CONFIG = "configs/grok-1-tiny.yaml"


class ServingConfig(ReplicaConfig):
    """build_app's arguments: one model replica per ingress replica, and how the ingress serves it."""

    config: str = Field(DEFAULT_CONFIG, min_length=1, description="the model config YAML (configs/)")
    checkpoint: str | None = Field(None, min_length=1,
                                   description="checkpoint directory (default: the config's checkpoint.path)")
    tokenizer: str | None = Field(None, min_length=1, description="path to tokenizer.model (default: the "
                                                                  "config's tokenizer, $GROK1_TOKENIZER, ...)")
    random_if_missing: bool = Field(False, description="write a random-weight checkpoint first if the "
                                                       "directory has none (the tiny config's demo)")
    num_replicas: int = Field(1, ge=1, le=1024, description="model replicas (data-parallel), each one ingress "
                                                            "replica with its own router and shard group")
    api_key_file: str | None = Field(None, min_length=1,
                                     description="accept only clients that send one of these keys (one per "
                                                 "line; re-read on change); without it only loopback clients "
                                                 "are served")
    auth_health: bool = Field(False, description="/health and gRPC Health need a key too")
    auth_metrics: bool = Field(False, description="/metrics needs a key too")
    ray_metrics: bool = Field(True, description="also export the metrics through Ray's metrics agent on each "
                                                "node (its metrics export port; names prefixed ray_)")
    stream_interval: int = Field(1, ge=1, le=1024,
                                 description="tokens per streamed chunk (SSE event, gRPC message) of a choice "
                                             "after its first, which goes out at once: n > 1 cuts the "
                                             "ingress's and Serve's proxy's work per token n-fold, for "
                                             "burstier streams (as SGLang's and vLLM's --stream-interval)")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="seconds a client has to send its whole "
                                                                   "request body (HTTP 408 after it)")

    @classmethod
    def of(cls, args) -> "ServingConfig":
        """`args` as a ServingConfig: one already, or a mapping of overrides (strings are converted)."""
        return args if isinstance(args, cls) else cls.from_overrides(args)

    def load_config(self) -> "Grok1Config":
        """The model config, with `checkpoint` (resolved) in place of the config's checkpoint.path."""
        from grok1.config import ConfigError, load_config

        config = load_config(self.config)
        if self.checkpoint:
            config = config.replace(checkpoint={"path": str(Path(self.checkpoint).resolve())})
        if not config.checkpoint.path:
            raise ConfigError(f"{self.config}: checkpoint.path is not set; pass checkpoint=DIR")
        return config

    def resolved(self, checkpoint: str) -> "ServingConfig":
        """Paths made absolute, as every replica (on any node, in any working directory) must see them."""
        api_key_file = str(Path(self.api_key_file).resolve()) if self.api_key_file else None
        return self.model_copy(update={"checkpoint": str(Path(checkpoint).resolve()), "api_key_file": api_key_file,
                                       "config": str(Path(self.config).resolve())})
