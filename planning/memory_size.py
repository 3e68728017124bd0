"""Memory sizes as a deployment writes them ("80GiB", "141GB") and as the plan prints them."""

from __future__ import annotations

import re

from grok1.config import ConfigError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str, what: str = "memory size") -> int:
    """Bytes in "80GiB", "141GB", "512MiB", "1.5TiB" or "1024" (GB = 10^9 bytes, GiB = 2^30)."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{what} {text!r} is not a size like 80GiB, 141GB or 512MiB")
    number, unit = match.groups()
    multiplier = _UNITS.get(unit.lower() or "b")
    if multiplier is None:
        raise ConfigError(f"{what} {text!r}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    size = int(float(number) * multiplier)
    if size <= 0:
        raise ConfigError(f"{what} {text!r} must be more than zero bytes")
    return size


def format_bytes(size: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(size) >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
