"""Serve's direct ingress: each ingress replica serves HTTP and gRPC on its own ports, so a request and its
stream reach the replica with no Serve proxy in between.

Through the proxy every streamed chunk crosses one more process (HTTP -> proxy -> Ray stream -> replica); on
a small machine that hop costs as much CPU as the replica itself (docs/benchmarks.md, session 9: HTTP at 32
streams keeps 57-66% of the router's tokens/s through the proxy, 71-89% direct).

Ray 2.60 marks direct ingress experimental and reads it, with its port ranges, from the environment of every
Serve process: `DirectIngress.env()` must be in each node's environment before Ray starts there (`grok1 serve
--direct-ingress` sets it for the local instance it starts). The replicas of one node take the ports
`http_port`, `http_port + 1`, ... (and likewise for gRPC); a restarted replica gets its port back. Serve still
runs its proxy on the head node, on ports of its own, as a slower second way in.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass(frozen=True)
class DirectIngress:
    http_port: int
    grpc_port: int
    replicas_per_node: int = 1

    def __post_init__(self):
        http, grpc = self.http_ports, self.grpc_ports
        if self.replicas_per_node < 1:
            raise ValueError(f"replicas_per_node must be >= 1, got {self.replicas_per_node}")
        if not (0 < http.start and http.stop <= 65536 and 0 < grpc.start and grpc.stop <= 65536):
            raise ValueError(f"ports out of range: HTTP {_span(http)}, gRPC {_span(grpc)}")
        if set(http) & set(grpc):
            raise ValueError(f"the HTTP ports {_span(http)} and the gRPC ports {_span(grpc)} overlap")

    @property
    def http_ports(self) -> range:
        return range(self.http_port, self.http_port + self.replicas_per_node)

    @property
    def grpc_ports(self) -> range:
        return range(self.grpc_port, self.grpc_port + self.replicas_per_node)

    def env(self) -> dict[str, str]:
        """The environment every Serve process needs (Serve's port pools are [min, max))."""
        return {
            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.http_ports.start),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.http_ports.stop),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(self.grpc_ports.start),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(self.grpc_ports.stop),
            # Serve holds a freed port back for HAProxy's sake (150 s); with no HAProxy in front, a replica
            # that restarts takes its port back at once, so clients keep one address.
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            # Nor is there a load balancer to deregister from: a stopping replica drains its running
            # requests and stops, instead of holding on for Serve's default 30 s.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
        }


def wait_listening(host: str, port: int, timeout_s: float, *, interval_s: float = 0.2) -> None:
    """Return once GET /health on host:port answers 200; TimeoutError naming the port after timeout_s."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health"
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=max(0.1, min(5.0, deadline - time.monotonic()))) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(interval_s)
    raise TimeoutError(f"direct ingress: {url} did not answer 200 within {timeout_s:.0f}s ({last}); "
                       f"was Ray started with DirectIngress.env() in its environment?")


def _span(ports: range) -> str:
    return f"{ports.start}-{ports.stop - 1}" if len(ports) > 1 else str(ports.start)
