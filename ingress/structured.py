"""Structured-output requests -> the regex the sampler's token mask enforces (grok1/grammar.py compiles it).

- `response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"?, "description"?}}`
  (OpenAI): the schema is checked against JSON Schema's meta-schema (jsonschema), then turned into a regex by
  outlines-core; a schema it cannot express is refused by name, never loosened silently.
- `response_format: {"type": "json_object"}` (OpenAI): a JSON object whose values are scalars, arrays of
  scalars or objects of scalars (a regular grammar needs a depth bound; deeper structure: use a schema).
- `structured_outputs: {"regex": "..."}` or `{"json": <schema>}` (vLLM's extension, same names): a regex,
  matched in full by the generated text.
Every problem is an ApiError naming the field.
"""

from __future__ import annotations

import json

from ingress.errors import invalid
from ingress.fields import check_text, show

MAX_GRAMMAR_CHARS = 16_384  # a schema's JSON or a regex: compile time grows with it
WHITESPACE = r"[ ]?"  # between JSON tokens: at most one space (random weights would otherwise pad for ever)
_SCALAR = {"type": ["string", "number", "boolean", "null"]}
JSON_OBJECT_SCHEMA = {"type": "object", "additionalProperties": {"anyOf": [
    _SCALAR, {"type": "array", "items": _SCALAR}, {"type": "object", "additionalProperties": _SCALAR}]}}
STRUCTURED_KEYS = ("regex", "json")


def schema_regex(schema, field: str) -> str:
    """A JSON schema (checked against its meta-schema) as the regex of the texts that satisfy it."""
    import jsonschema
    from outlines_core.json_schema import build_regex_from_schema

    if not isinstance(schema, (dict, bool)):
        raise invalid(f"{field} must be a JSON schema (an object), got {show(schema)}", field)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "/".join(str(p) for p in err.path)
        raise invalid(f"{field} is not a valid JSON schema: {err.message[:200]}"
                      + (f" (at {where})" if where else ""), field) from None
    text = json.dumps(schema)
    if len(text) > MAX_GRAMMAR_CHARS:
        raise invalid(f"{field} is {len(text)} characters as JSON; the limit is {MAX_GRAMMAR_CHARS}", field)
    try:
        return build_regex_from_schema(text, WHITESPACE)
    except (ValueError, TypeError, RuntimeError) as err:
        raise invalid(f"{field} is not supported for structured output: {str(err).splitlines()[0][:200]}",
                      field) from None


def _response_format(value) -> str | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid("response_format must be an object with a type", "response_format")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_regex(JSON_OBJECT_SCHEMA, "response_format")
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise invalid("response_format.json_schema must be an object with a schema",
                          "response_format.json_schema")
        name = spec.get("name")
        if name is not None and not (isinstance(name, str) and 0 < len(name) <= 64):
            raise invalid("response_format.json_schema.name must be a string of 1 to 64 characters",
                          "response_format.json_schema.name")
        return schema_regex(spec["schema"], "response_format.json_schema.schema")
    raise invalid(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {show(kind)}",
                  "response_format.type")


def _structured_outputs(value) -> str | None:
    if not isinstance(value, dict):
        raise invalid("structured_outputs must be an object", "structured_outputs")
    given = [k for k in value if value[k] is not None]
    unknown = [k for k in given if k not in STRUCTURED_KEYS]
    if unknown:
        raise invalid(f"structured_outputs.{show(unknown[0])} is not supported (use one of "
                      f"{', '.join(STRUCTURED_KEYS)})", "structured_outputs")
    if len(given) != 1:
        raise invalid("structured_outputs must set exactly one of regex, json", "structured_outputs")
    if given[0] == "json":
        return schema_regex(value["json"], "structured_outputs.json")
    regex = value["regex"]
    if not isinstance(regex, str) or not regex:
        raise invalid("structured_outputs.regex must be a non-empty string", "structured_outputs.regex")
    return check_text(regex, "structured_outputs.regex", MAX_GRAMMAR_CHARS)


def grammar_of(body: dict) -> tuple[str | None, str | None]:
    """(regex, the field it came from) for a request body; (None, None) when no structure is asked for."""
    fmt, structured = body.get("response_format"), body.get("structured_outputs")
    if fmt is not None and structured is not None and _response_format(fmt) is not None:
        raise invalid("set response_format or structured_outputs, not both", "structured_outputs")
    if structured is not None:
        return _structured_outputs(structured), "structured_outputs"
    if fmt is not None:
        regex = _response_format(fmt)
        return regex, (None if regex is None else "response_format")
    return None, None
