"""Sentences for pydantic validation errors: the key path, the expected type, the value.

Shared by the config schema (:mod:`icam_med.config`) and the geometry options
(:mod:`icam_med.io.validation`), so both speak alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

__all__ = ["describe_error"]

_EXPECTED = {
    "bool_type": "true or false (a YAML boolean, unquoted)",
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
}


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _section_keys(loc: tuple[Any, ...], root: Any) -> list[str]:
    """The known keys of the section at ``loc`` (for close-match suggestions)."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fld = getattr(cls, "model_fields", {}).get(part)
        if fld is None:
            return []
        ann = fld.annotation
        args = getattr(ann, "__args__", ()) or ()
        candidates = [ann, *args]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)),
                   None)
        if cls is None:
            inner = [a for c in candidates for a in getattr(c, "__args__", ()) or ()]
            cls = next((c for c in inner if isinstance(c, type) and issubclass(c, BaseModel)),
                       None)
        if cls is None:
            return []
    return list(getattr(cls, "model_fields", {}))


def describe_error(err: Mapping[str, Any], root: Any, prefix: tuple[str, ...] = ()) -> str:
    """One pydantic error as a sentence: the key path, the expected type, the value given.

    Args:
        err: an item of ``ValidationError.errors()``.
        root: the pydantic model validated (for close matches of unknown keys).
        prefix: the path of ``root`` in the config file (e.g. ``("geometry",)``).
    """
    inner = tuple(err.get("loc", ()))
    loc = (*prefix, *inner)
    kind = err.get("type", "")
    value = err.get("input")
    where = f"'{_key_path(loc)}'"
    got = f"got {value!r} ({type(value).__name__})"
    if len(got) > 120:
        got = got[:117] + "..."
    if kind == "extra_forbidden":
        key = str(loc[-1])
        known = _section_keys(inner[:-1], root)
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        section = _key_path(loc[:-1]) if len(loc) > 1 else "the top level"
        return (f"unknown key(s) [{key!r}] in {section}{hint}; expected some of {sorted(known)}"
                if known else f"unknown key {where}{hint}")
    if kind == "missing":
        return f"missing required key {where}"
    if kind in _EXPECTED:
        return f"{where} must be {_EXPECTED[kind]}, {got}"
    if kind == "string_pattern_mismatch" and loc and loc[-1] == "weights_sha256":
        return f"{where} must be a 64-character hex string (SHA-256), {got}"
    return f"{where}: {err.get('msg', 'invalid value')}, {got}"
