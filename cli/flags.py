"""Command-line flags derived from a pydantic settings model: one flag per field, its help the field's
description (and default), its choices a Literal's values.

Flags only override: every flag defaults to None (not given), and `overrides` returns just the flags that were
given, so the model's defaults stay the one place defaults are declared; the model converts and range-checks
the values and its error names the field.
"""

from __future__ import annotations

import argparse
import typing
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from pydantic import BaseModel


def flag_name(field: str, renamed: dict[str, str]) -> str:
    return renamed.get(field, "--" + field.replace("_", "-"))


def _kind(annotation):
    """(argparse type, choices) for a field's annotation; Optional[X] is X (None is 'not given')."""
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    if len(args) == 1 and typing.get_origin(args[0]) is Literal:
        return str, list(typing.get_args(args[0]))
    return (args[0] if args[0] in (int, float, str, bool) else str), None


def add_model_flags(parser: argparse.ArgumentParser, model: type["BaseModel"],
                    renamed: dict[str, str] | None = None) -> None:
    """Add `--field-name` for every field of `model` (`renamed` maps a field to another flag)."""
    renamed = renamed or {}
    for name, field in model.model_fields.items():
        kind, choices = _kind(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "" if default is None else f" (default: {str(default).lower() if kind is bool else default})"
        help_text = (field.description or name).replace("%", "%%") + shown
        if kind is bool:
            parser.add_argument(flag_name(name, renamed), dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            parser.add_argument(flag_name(name, renamed), dest=name, type=kind, choices=choices, default=None,
                                help=help_text)


def overrides(args: argparse.Namespace, model: type["BaseModel"]) -> dict:
    """The fields of `model` that were given on the command line."""
    return {name: getattr(args, name) for name in model.model_fields if getattr(args, name, None) is not None}
