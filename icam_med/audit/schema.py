"""The audit record's JSON Schema, shipped in the package, and validation against it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

__all__ = ["RECORD_SCHEMA_FILE", "RECORD_SCHEMA_VERSION", "load_record_schema", "schema_path",
           "validate_record"]

RECORD_SCHEMA_VERSION = "1.0"
RECORD_SCHEMA_FILE = "audit-record-v1.schema.json"


def schema_path() -> Path:
    """Where the record schema file is (``icam_med/schemas/`` inside the package)."""
    return Path(__file__).resolve().parent.parent / "schemas" / RECORD_SCHEMA_FILE


@functools.cache
def load_record_schema() -> dict[str, Any]:
    """The record schema (JSON Schema draft 2020-12) from ``icam_med/schemas``."""
    return json.loads(schema_path().read_text("utf-8"))


@functools.cache
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    schema = load_record_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_record(record: Any) -> None:
    """Check a record against the schema.

    Raises:
        ValueError: listing every violation with its location in the record.
    """
    errors = sorted(_validator().iter_errors(record), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{'.'.join(str(p) for p in e.absolute_path) or '<record>'}: {e.message}"
                 for e in errors[:20]]
        more = f" (and {len(errors) - 20} more)" if len(errors) > 20 else ""
        raise ValueError(
            f"audit record does not match schema {RECORD_SCHEMA_FILE}: " + "; ".join(lines) + more
        )
