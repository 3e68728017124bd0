"""API keys: who may call the generation endpoints.

Keys live in a file, one per line (blank lines and `#` comments ignored), typically a mounted Kubernetes
Secret. The file is re-read when it changes (checked at most once per RELOAD_S), so keys rotate without a
restart: add the new key, move the clients, remove the old one. HTTP sends `Authorization: Bearer <key>`,
gRPC the metadata `authorization: Bearer <key>`.

Without a key file the server answers only clients on loopback: Serve's gRPC proxy binds every interface
whatever the HTTP host is, so "no keys" must not mean "open to the network".
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import threading
import time

RELOAD_S = 1.0


class KeyFileError(ValueError):
    """The key file is missing, unreadable or holds no key."""


def _digest(key: str) -> bytes:
    # Compare fixed-length digests so that neither a key's length nor its prefix shows in the timing.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def read_keys(path: str) -> list[bytes]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"cannot read the API key file {path}: {err}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise KeyFileError(f"the API key file {path} holds no key (one per line)")
    return [_digest(key) for key in keys]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def grpc_peer_host(peer: str | None) -> str | None:
    """The host part of a gRPC peer string: 'ipv4:127.0.0.1:5000', 'ipv6:[::1]:5000', 'unix:...'."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return "localhost" if kind == "unix" else None


def bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class ApiKeys:
    """The accepted keys, from `path` (None: no keys, loopback clients only)."""

    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()
        self._keys: list[bytes] = read_keys(path) if path else []
        self._mtime = self._stat()
        self._checked = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _stat(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except (OSError, TypeError):
            return None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_S:
            return
        with self._lock:
            self._checked = now
            stat = self._stat()
            if stat != self._mtime:
                try:
                    self._keys = read_keys(self.path)
                    self._mtime = stat
                except KeyFileError:
                    pass  # a half-written or briefly missing file (a Secret update): keep the last good keys

    def allows(self, key: str | None) -> bool:
        if not self.enabled or key is None:
            return False
        self._refresh()
        given = _digest(key)
        matched = False
        for accepted in self._keys:  # no early exit: every key is compared
            matched |= hmac.compare_digest(given, accepted)
        return matched

    def check(self, key: str | None, client_host: str | None) -> str | None:
        """None when the caller may proceed, else why not (for a 401 / UNAUTHENTICATED)."""
        if not self.enabled:
            if is_loopback(client_host):
                return None
            return ("this server has no API keys configured and answers only loopback clients; start it with "
                    "an API key file (api_key_file / --api-key-file)")
        if key is None:
            return "an API key is required: send 'Authorization: Bearer <key>'"
        return None if self.allows(key) else "the API key is not valid"
