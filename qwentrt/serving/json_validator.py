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
