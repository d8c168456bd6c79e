"""The `json_validator` model's logic: does a text parse as JSON and satisfy a JSON schema?"""

from __future__ import annotations

import json

MAX_ERRORS = 5


class InvalidSchema(ValueError):
    """The schema itself is not a valid JSON schema (INVALID_ARG)."""


def validate(text: str, schema_text: str) -> tuple[bool, list[str]]:
    from jsonschema import Draft202012Validator, SchemaError

    try:
        schema = json.loads(schema_text)
    except json.JSONDecodeError as e:
        raise InvalidSchema(f"schema: not valid JSON ({e.msg} at {e.pos})") from None
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise InvalidSchema(f"schema: invalid JSON schema: {e.message}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return False, [f"text is not JSON: {e.msg} at {e.pos}"]
    errors = sorted(Draft202012Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    return not errors, [f"{'/'.join(map(str, e.path)) or '(root)'}: {e.message}" for e in errors[:MAX_ERRORS]]


_TYPES = {"null", "boolean", "object", "array", "number", "string", "integer"}


def _types(schema: dict) -> set[str]:
    t = schema.get("type")
    types = _TYPES if t is None else {t} if isinstance(t, str) else set(t)
    return types | ({"integer"} if "number" in types else set())


def admits_nothing(schema, path: str = "(root)") -> str | None:
    """Why no JSON value can satisfy `schema` (a checked JSON schema), or None when some might (or when we
    cannot tell: the common contradictions only). Guided decoding could never finish such a request."""
    if schema is False:
        return f"{path}: the schema is false"
    if not isinstance(schema, dict):
        return None
    if schema.get("not") in ({}, True):
        return f"{path}: \"not\" of a schema that admits everything"
    if "type" in schema and not _types(schema):
        return f"{path}: \"type\" lists no type"
    for key in ("enum", "const"):
        if key in schema:
            values = schema["enum"] if key == "enum" else [schema["const"]]
            rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
            from jsonschema import Draft202012Validator
            if not values:
                return f"{path}: \"enum\" is empty"
            if not any(Draft202012Validator(rest).is_valid(v) for v in values):
                return f"{path}: no value of \"{key}\" satisfies the rest of the schema"
    subs = schema.get("allOf", [])
    types = _types(schema)
    for i, sub in enumerate(subs):
        why = admits_nothing(sub, f"{path}/allOf/{i}")
        if why:
            return why
        if isinstance(sub, dict):
            types &= _types(sub)
    if not types:
        return f"{path}: \"allOf\" asks for types that no value has at once"
    for key in ("anyOf", "oneOf"):
        if key in schema and all(admits_nothing(s, f"{path}/{key}/{i}") for i, s in enumerate(schema[key])):
            return f"{path}: no branch of \"{key}\" admits a value"
    required = schema.get("required", [])
    props = schema.get("properties", {})
    if types == {"object"} and "patternProperties" not in schema:
        for name in required:
            sub = props.get(name, schema.get("additionalProperties", True) if name not in props else True)
            why = admits_nothing(sub, f"{path}/properties/{name}")
            if why:
                return why
    return None
