"""The record schema's version, and the two validators behind every schema check.

* New records say ``schema_version`` 1.1; a folder written by the 1.0 writer (the code of
  2026-11-22, kept in ``tests/data/audit_v1_0``) still verifies and reads.
* The compiled validator (fastjsonschema) decides only what it accepts; everything it
  refuses goes to ``jsonschema``, the reference. It must never accept a document the
  reference refuses: checked here on every single-field change to a real record and to
  real ledger entries.
* ``verify`` still refuses a record outside the schema when every hash around it agrees
  (a chain rebuilt by someone without the signing key).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _audit_util import tiny_model_config, write_scan_outputs

from icam_med import cli
from icam_med.audit import AuditRecord, Ledger, RecordError, validate_record, verify_folder
from icam_med.audit.hashing import canonical_json, sha256_file
from icam_med.audit.ledger import entry_sha256
from icam_med.audit.record import seal_record
from icam_med.audit.schema import (
    LEDGER_SCHEMA_FILE,
    RECORD_SCHEMA_FILE,
    RECORD_SCHEMA_VERSION,
    RECORD_SCHEMA_VERSIONS,
    _passes,
    _validator,
    load_record_schema,
    validate_entry,
)

V1_0 = Path(__file__).parent / "data" / "audit_v1_0"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    """A folder with one scan written by this version (ledger of one entry)."""
    base = tmp_path_factory.mktemp("schema")
    out = base / "out"
    out.mkdir()
    write_scan_outputs(out, "scan-1", model_cfg=tiny_model_config(base))
    return out


@pytest.fixture
def folder(written, tmp_path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(written, dst)
    return dst


# -- versions ------------------------------------------------------------------------------
def test_new_records_are_version_1_1_and_the_schema_reads_both(folder):
    assert RECORD_SCHEMA_VERSION == "1.1" and RECORD_SCHEMA_VERSIONS == ("1.0", "1.1")
    assert load_record_schema()["properties"]["schema_version"]["enum"] == ["1.0", "1.1"]
    rec = AuditRecord.load(folder / "scan-1" / "icam.icam.json")
    assert rec.data["schema_version"] == "1.1"
    assert verify_folder(folder).ok


def test_a_folder_written_by_the_1_0_writer_still_verifies_and_reads(tmp_path, capsys):
    folder = tmp_path / "v1.0"
    shutil.copytree(V1_0, folder)
    report = verify_folder(folder)
    assert report.ok, report.problems
    assert report.n_scans == 1 and report.n_files == 3
    rec = AuditRecord.load(folder / "cam.icam.json")
    assert rec.data["schema_version"] == "1.0" and rec.self_hash_ok()
    assert rec.method.region is None and rec.method.sliding_window is None  # 1.1 fields
    assert rec.map_path == (folder / "cam.nii.gz").resolve()
    assert cli.main(["verify", str(folder)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {folder.resolve()}: 1 ledger entries")
    # the old folder's hashes are really checked: one changed byte in its map is caught
    data = bytearray((folder / "cam.nii.gz").read_bytes())
    data[-1] ^= 0xFF
    (folder / "cam.nii.gz").write_bytes(bytes(data))
    report = verify_folder(folder)
    assert not report.ok and "'cam.nii.gz' was changed" in str(report.first_problem)


def _rebuild_chain(folder: Path, change) -> None:
    """Change the only record, re-seal it and rewrite its ledger entry so that every hash
    agrees: what someone rewriting a whole unsigned folder can do."""
    rec_path = folder / "scan-1" / "icam.icam.json"
    record = json.loads(rec_path.read_text())
    change(record)
    integrity = record.pop("integrity")
    sealed = seal_record(record, integrity["sequence"], integrity["previous_entry_sha256"])
    rec_path.write_text(json.dumps(sealed, indent=2, sort_keys=True) + "\n")
    ledger = folder / "ledger.jsonl"
    [line] = ledger.read_bytes().splitlines()
    entry = json.loads(line)
    entry["record"].update(sha256=sha256_file(rec_path), size=rec_path.stat().st_size)
    entry["record_sha256"] = sealed["integrity"]["record_sha256"]
    entry["entry_sha256"] = entry_sha256(entry)
    ledger.write_bytes(canonical_json(entry) + b"\n")


@pytest.mark.parametrize(("change", "words"), [
    (lambda r: r.update(schema_version="2.0"),
     "schema_version: '2.0' is not one of ['1.0', '1.1']"),
    (lambda r: r.update(schema_version="1.1", PatientName="DOE^JANE"),
     "Additional properties are not allowed ('PatientName' was unexpected)"),
    (lambda r: r["method"]["target"].update(region={"source": "mask"}),
     "method.target.region: 'sha256' is a required property"),
])
def test_verify_refuses_a_record_outside_the_schema_in_a_rebuilt_chain(folder, change, words,
                                                                       capsys):
    _rebuild_chain(folder, change)
    report = verify_folder(folder)
    assert not report.ok
    problem = report.first_problem
    assert problem.line == 1 and problem.kind == "outputs" and problem.scan_id == "scan-1"
    assert f"does not match schema {RECORD_SCHEMA_FILE}" in problem.message
    assert words in problem.message
    assert cli.main(["verify", str(folder)]) == 1
    assert "BROKEN" in capsys.readouterr().err


def test_the_rebuilt_chain_alone_verifies(folder):
    """The forgery above changes nothing but the record's content: with a valid change
    the rebuilt folder verifies (so the refusals above are the schema's)."""
    _rebuild_chain(folder, lambda r: r["activity"].update(operator="op-8"))
    assert verify_folder(folder).ok


# -- the compiled validator never accepts what the reference refuses ------------------------
VALUES: list[Any] = [None, True, -1, 0, 1.5, "x", "", [], {}]


def _positions(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    node = doc
    for p in path:
        node = node[p]
    keys = list(node) if isinstance(node, dict) else range(len(node)) \
        if isinstance(node, list) else []
    for k in keys:
        yield from _positions(doc, (*path, k))


def _mutants(doc: Any) -> Iterator[tuple[tuple, Any]]:
    """Every document one change away: a key removed, a key added to an object, a value
    replaced by one of another type (or an integer by the equal float)."""
    for path in list(_positions(doc)):
        node, parent = doc, None
        for p in path:
            parent, node = node, node[p]
        if isinstance(node, dict):
            m = copy.deepcopy(doc)
            t = m
            for p in path:
                t = t[p]
            t["zz_extra"] = 1
            yield (*path, "+key"), m
        if not path:
            continue
        if isinstance(parent, dict):
            m = copy.deepcopy(doc)
            t = m
            for p in path[:-1]:
                t = t[p]
            del t[path[-1]]
            yield (*path, "-key"), m
        values = list(VALUES)
        if isinstance(node, int) and not isinstance(node, bool):
            values.append(float(node))
        for v in values:
            if type(v) is type(node) and v == node:
                continue
            m = copy.deepcopy(doc)
            t = m
            for p in path[:-1]:
                t = t[p]
            t[path[-1]] = v
            yield (*path, repr(v)), m


def _rich_record(folder: Path) -> dict[str, Any]:
    """A real record with every optional section filled in (1.1 fields included)."""
    record = json.loads((folder / "scan-1" / "icam.icam.json").read_text())
    record["method"]["target"]["region"] = {
        "source": "mask", "class_index": 1, "label": "present", "region_class_index": 1,
        "region_label": "lesion", "sha256": "a" * 64, "voxels": 12, "model_grid_voxels": 3.5}
    record["method"]["sliding_window"] = {
        "roi_size": [8, 8, 8], "sw_batch_size": 2, "overlap": 0.25, "mode": "gaussian",
        "sigma_scale": 0.125, "padding_mode": "constant", "cval": 0.0, "windows_total": 8,
        "windows_explained": 3}
    record["analysis"] = {
        "expected_label": "present", "disagrees": False,
        "map_stats": {"min": 0.0, "max": 1.0}, "mask_fraction": 0.4, "mask_sha256": "b" * 64,
        "mask_volume_fraction": 0.1, "peak_in_mask": True,
        "intended_use": {"card": "MODEL_CARD.md", "card_sha256": "c" * 64,
                         "checked": ["modality"], "not_checkable": [], "violations": []}}
    validate_record(record)  # the reference accepts it
    return record


def _agree(schema: str, doc: Any) -> tuple[int, list]:
    reference = _validator(schema)
    n, unsound = 0, []
    for where, mutant in _mutants(doc):
        n += 1
        if _passes(schema, mutant) and not reference.is_valid(mutant):
            unsound.append(where)
    return n, unsound


def test_compiled_validator_never_accepts_a_record_the_reference_refuses(written):
    n, unsound = _agree(RECORD_SCHEMA_FILE, _rich_record(written))
    assert n > 1500 and not unsound
    # and it refuses the obvious: the fast check is a check
    record = _rich_record(written)
    assert _passes(RECORD_SCHEMA_FILE, record)
    record["schema_version"] = "0.9"
    assert not _passes(RECORD_SCHEMA_FILE, record)
    with pytest.raises(RecordError, match="schema_version"):
        validate_record(record)


def test_compiled_validator_never_accepts_a_ledger_entry_the_reference_refuses(written):
    entries = [e.data for e in Ledger(written).entries()]
    failure = {**entries[0], "kind": "failure", "reason": "could not read"}
    for key in ("record", "record_sha256", "outputs"):
        failure.pop(key)
    run_end = {k: v for k, v in failure.items() if k not in ("reason", "scan_id")}
    run_end.update(kind="run-end", details={"done": 1, "failed": 0})
    total = 0
    for doc in (entries[0], failure, run_end):
        validate_entry(doc)
        n, unsound = _agree(LEDGER_SCHEMA_FILE, doc)
        total += n
        assert not unsound, unsound
    assert total > 300
