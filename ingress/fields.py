"""A request body as JSON, and its fields read with types and ranges: the JSON half of request parsing,
with no OpenAI semantics (ingress/protocol.py) and no web framework. Every problem is an `ApiError` naming
the field, with the client's value shown short (`show`): a client's value is never echoed unbounded.
"""

from __future__ import annotations

import json
import math
import reprlib

from ingress.errors import ApiError, invalid

MAX_INT_DIGITS = 40  # integer literals longer than this are never converted (see HugeInt)
MAX_BODY_BYTES = 1 << 20  # 1 MiB: a full 8,192-token context is ~60 KiB as JSON ids, less as text


class HugeInt:
    """An integer literal of more than MAX_INT_DIGITS digits: kept as text so that Python never builds it (over
    4,300 digits int() raises; a few hundred already overflow float()); every field check refuses it by name."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {len(self.digits)} digits>"


def parse_json_body(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError("too_large", f"the request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise invalid(f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        body = json.loads(text, parse_int=lambda s: int(s) if len(s) <= MAX_INT_DIGITS else HugeInt(s))
    except json.JSONDecodeError as err:
        raise invalid(f"the request body is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})") \
            from None
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    return body


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 40, 40, 40


def show(value) -> str:
    """A short, safe rendering of a client's value for an error message (bounded depth and length)."""
    return _REPR.repr(value)


def number(body, name, default, lo, hi):
    """A finite number in [lo, hi] (a float; JSON integers are accepted)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"{name} must be a number, got {show(value)}", name)
    if isinstance(value, int) and not -(10 ** 18) < value < 10 ** 18 or not math.isfinite(value):
        raise invalid(f"{name} must be a finite number in [{lo}, {hi}], got {show(value)}", name)
    value = float(value)
    if not lo <= value <= hi:
        raise invalid(f"{name} must be in [{lo}, {hi}], got {value}", name)
    return value


def integer(body, name, default, lo, hi):
    """An integer in [lo, hi] (a float with an integral value, such as 5.0, is accepted)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{name} must be an integer, got {show(value)}", name)
    if not lo <= value <= hi:
        raise invalid(f"{name} must be an integer in [{lo}, {hi}], got {show(value)}", name)
    return value


def boolean(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, got {show(value)}", name)
    return value


def check_text(text: str, name: str, max_chars: int) -> str:
    """A client's string: bounded in length and encodable as UTF-8 (JSON can carry lone UTF-16 surrogates)."""
    if len(text) > max_chars:
        raise invalid(f"{name} is {len(text)} characters; the limit is {max_chars}", name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise invalid(f"{name} contains a lone UTF-16 surrogate at character {err.start}", name) from None
    return text
