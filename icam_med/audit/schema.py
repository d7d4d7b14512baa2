"""The JSON Schemas of the audit record and the ledger entry, shipped in the package, and
validation against them.

Every failure is one error type per document kind, both :class:`ValueError` subclasses
that name the file (and ledger line) and the first offending field:
:class:`RecordError` for records, :class:`LedgerError` for ledger entries.

Every document is first checked by a compiled validator (``fastjsonschema``: the schema turned into Python
code once per process, about 15x faster than ``jsonschema`` on a record). A document it
accepts is valid; one it refuses (or that makes it fail in any way) is checked again by
``jsonschema``'s draft 2020-12 validator, the reference, which decides and words every
violation. ``verify`` of a large folder spends its time in the first check only.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "LEDGER_SCHEMA_FILE",
    "RECORD_SCHEMA_FILE",
    "RECORD_SCHEMA_VERSION",
    "RECORD_SCHEMA_VERSIONS",
    "AuditFormatError",
    "LedgerError",
    "RecordError",
    "load_record_schema",
    "schema_path",
    "validate_entry",
    "validate_record",
]

#: The version new records are written in. 1.1 added optional fields only
#: (``method.target.region``, ``method.sliding_window``, ...); see docs/audit.md.
RECORD_SCHEMA_VERSION = "1.1"
#: Every record version the schema (and so ``verify``) accepts.
RECORD_SCHEMA_VERSIONS = ("1.0", "1.1")
RECORD_SCHEMA_FILE = "audit-record-v1.schema.json"
LEDGER_SCHEMA_FILE = "ledger-entry-v1.schema.json"
_MAX_ERRORS = 20


class AuditFormatError(ValueError):
    """An audit document (record or ledger entry) that is not what the format says.

    The message is ``"<where>: <detail>"``.

    Attributes:
        detail: what is wrong, without the location.
        path: the file, when known.
        field: the dotted location of the first offending field (``"<record>"`` or
            ``"<entry>"`` for the document as a whole).
    """

    def __init__(self, detail: str, *, path: str | Path | None = None,
                 field: str | None = None) -> None:
        self.detail = detail
        self.path = Path(path) if path is not None else None
        self.field = field
        where = self._where()
        super().__init__(f"{where}: {detail}" if where else detail)

    def _where(self) -> str:
        return str(self.path) if self.path is not None else ""


class RecordError(AuditFormatError):
    """An audit record that cannot be read: missing, not JSON, not an object, empty, or not
    a record of the schema."""

    def _where(self) -> str:
        return f"audit record {self.path}" if self.path is not None else "audit record"


class LedgerError(AuditFormatError):
    """A ledger line that is not a ledger entry.

    Attributes:
        line: the 1-based line number in ``ledger.jsonl``, when known.
    """

    def __init__(self, detail: str, *, path: str | Path | None = None,
                 field: str | None = None, line: int | None = None) -> None:
        self.line = line
        super().__init__(detail, path=path, field=field)

    def _where(self) -> str:
        where = f"ledger {self.path}" if self.path is not None else "ledger"
        return where + (f", line {self.line}" if self.line is not None else "")


def schema_path(name: str = RECORD_SCHEMA_FILE) -> Path:
    """Where a schema file is (``icam_med/schemas/`` inside the package)."""
    return Path(__file__).resolve().parent.parent / "schemas" / name


@functools.cache
def _load(name: str) -> dict[str, Any]:
    return json.loads(schema_path(name).read_text("utf-8"))


def load_record_schema() -> dict[str, Any]:
    """The record schema (JSON Schema draft 2020-12) from ``icam_med/schemas``."""
    return _load(RECORD_SCHEMA_FILE)


@functools.cache
def _validator(name: str) -> Any:
    """The reference validator (``jsonschema``, draft 2020-12): built, and the schema
    checked, once per process, and only when a document fails the compiled check."""
    from jsonschema import Draft202012Validator

    schema = _load(name)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@functools.cache
def _compiled(name: str) -> Any:
    """The schema compiled to Python by ``fastjsonschema`` (once per process, ~0.15 s).

    The schemas use only keywords that mean the same in draft 7, which fastjsonschema
    implements, and in draft 2020-12 (``type``, ``properties``, ``required``,
    ``additionalProperties``, ``items`` with one schema, ``enum``, ``const``, ``pattern``,
    ``minimum``, ``oneOf``, ``if``/``then``, ``$ref`` to ``#/$defs/...``); a test checks
    that both validators agree on every single-field change to real records and entries.
    """
    import fastjsonschema

    return fastjsonschema.compile(_load(name))


def _passes(name: str, document: Any) -> bool:
    """Whether the compiled validator accepts ``document`` (``False`` on any failure of
    its own, so that the reference validator decides)."""
    try:
        _compiled(name)(document)
    except Exception:  # its JsonSchemaValueException, or anything odd input makes it raise
        return False
    return True


_REQUIRED = re.compile(r"^'([^']*)' is a required property$")


def _field(error: Any, whole: str) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":  # name the missing field itself
        m = _REQUIRED.match(error.message)
        if m:
            parts.append(m.group(1))
    return ".".join(parts) or whole


def _errors(name: str, document: Any, whole: str) -> tuple[str | None, list[str]]:
    """``(first field, messages)`` of every violation, sorted by location."""
    if _passes(name, document):
        return None, []
    errors = sorted(_validator(name).iter_errors(document),
                    key=lambda e: [str(p) for p in e.absolute_path])
    lines = [f"{'.'.join(str(p) for p in e.absolute_path) or whole}: {e.message}"
             for e in errors[:_MAX_ERRORS]]
    if len(errors) > _MAX_ERRORS:
        lines.append(f"(and {len(errors) - _MAX_ERRORS} more)")
    return (_field(errors[0], whole) if errors else None), lines


def validate_record(record: Any, *, path: str | Path | None = None) -> None:
    """Check a record against the schema.

    Args:
        record: the parsed record.
        path: the file it came from, named in the error.

    Raises:
        RecordError: listing every violation with its location in the record.
    """
    first, lines = _errors(RECORD_SCHEMA_FILE, record, "<record>")
    if lines:
        raise RecordError(f"does not match schema {RECORD_SCHEMA_FILE}: " + "; ".join(lines),
                          path=path, field=first)


def validate_entry(entry: Any, *, path: str | Path | None = None,
                   line: int | None = None) -> None:
    """Check a ledger entry against the ledger-entry schema.

    Raises:
        LedgerError: listing every violation with its location in the entry.
    """
    first, lines = _errors(LEDGER_SCHEMA_FILE, entry, "<entry>")
    if lines:
        raise LedgerError(f"not a ledger entry of schema {LEDGER_SCHEMA_FILE}: "
                          + "; ".join(lines), path=path, field=first, line=line)
