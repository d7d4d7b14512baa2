"""Audit records, the hash-chained run ledger and folder verification.

Every explanation map gets a record ``<map-name>.icam.json`` (JSON Schema:
``icam_med/schemas/audit-record-v1.schema.json``) and an entry in its output folder's
``ledger.jsonl``; :func:`verify_folder` checks both. Records hold no patient identifiers:
inputs are identified by voxel hashes and, with a site key, keyed hashes of DICOM UIDs.
Records are read only through :meth:`AuditRecord.load` and ledger lines only through
:meth:`LedgerEntry.parse`; both fail with one error type (:class:`RecordError`,
:class:`LedgerError`) that names the file, the line and the field. See docs/audit.md.
"""

from __future__ import annotations

from icam_med.audit.hashing import canonical_json, sha256_file, sha256_json, voxel_sha256
from icam_med.audit.ledger import LEDGER_NAME, FolderLock, Ledger, LedgerEntry, LedgerError
from icam_med.audit.phi import (
    SiteKey,
    check_no_phi,
    find_phi,
    hash_uid,
    identifiers_from_scan,
    load_site_key,
)
from icam_med.audit.record import (
    RECORD_SUFFIX,
    AuditRecord,
    OutputRef,
    RecordError,
    activity_section,
    build_record,
    file_ref,
    geometry_summary,
    input_from_scan,
    input_section,
    method_section,
    model_section,
    preprocessing_section,
    record_sha256,
    resolve_inside,
    runtime_section,
    seal_record,
    utc_now,
    voxel_digest,
)
from icam_med.audit.schema import load_record_schema, validate_record
from icam_med.audit.signing import (
    SIGNATURES_NAME,
    generate_signing_key,
    load_public_key,
    load_signing_key,
)
from icam_med.audit.trail import AuditContext, record_explanation
from icam_med.audit.verify import Problem, VerifyReport, verify_folder

__all__ = [
    "LEDGER_NAME",
    "RECORD_SUFFIX",
    "SIGNATURES_NAME",
    "AuditContext",
    "AuditRecord",
    "FolderLock",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "OutputRef",
    "Problem",
    "RecordError",
    "SiteKey",
    "VerifyReport",
    "activity_section",
    "build_record",
    "canonical_json",
    "check_no_phi",
    "file_ref",
    "find_phi",
    "generate_signing_key",
    "geometry_summary",
    "hash_uid",
    "identifiers_from_scan",
    "input_from_scan",
    "input_section",
    "load_public_key",
    "load_record_schema",
    "load_signing_key",
    "load_site_key",
    "method_section",
    "model_section",
    "preprocessing_section",
    "record_explanation",
    "record_sha256",
    "resolve_inside",
    "runtime_section",
    "seal_record",
    "sha256_file",
    "sha256_json",
    "utc_now",
    "validate_record",
    "verify_folder",
    "voxel_digest",
    "voxel_sha256",
]
