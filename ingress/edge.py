"""What Serve's HTTP proxy must not take from clients: its per-request control headers.

Serve's proxy honours `x-request-timeout-seconds` (a non-positive value disables the timeout) and
`x-request-disconnect-disabled: ?1` (keep running after the client has gone) from any client. Those are
meant for a trusted load balancer in front of Serve, so here they are removed before the proxy reads them;
deadlines come from the request's own `timeout_s`, bounded by the ingress.

Serve loads this through $RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (see `PROXY_ENV`), in every proxy process.
"""

from __future__ import annotations

import os

STRIPPED_HEADERS = frozenset({b"x-request-timeout-seconds", b"x-request-disconnect-disabled"})
GRPC_MAX_MESSAGE_BYTES = 4 << 20  # gRPC's own default; a full context of token ids is ~40 KiB

# Set in the environment of every Ray node that runs a Serve proxy (before `ray start` / `ray.init`).
PROXY_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "ingress.edge:proxy_middlewares",
    "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE_BYTES),
}


def apply_proxy_env() -> None:
    """Put PROXY_ENV into this process's environment (values already set win): call it before this process
    starts Ray, whose processes (the Serve proxies among them) inherit it."""
    for name, value in PROXY_ENV.items():
        os.environ.setdefault(name, value)


class StripControlHeaders:
    """A pure ASGI middleware: the request's headers without STRIPPED_HEADERS."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") in ("http", "websocket"):
            headers = scope.get("headers") or []
            if any(name.lower() in STRIPPED_HEADERS for name, _ in headers):
                scope = {**scope, "headers": [(n, v) for n, v in headers if n.lower() not in STRIPPED_HEADERS]}
        await self.app(scope, receive, send)


def proxy_middlewares():
    from starlette.middleware import Middleware

    return [Middleware(StripControlHeaders)]
