"""The typed readers: AuditRecord.load and LedgerEntry.parse, the only way records and ledger
lines are read (verify, batch resume and summary, report, napari), and what they say about
damaged input: one error type naming the file, the line and the field, never a crash."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from _audit_util import write_three_scans, write_tiny_lesionnet_config

from icam_med import cli
from icam_med.audit import (
    AuditRecord,
    Ledger,
    LedgerEntry,
    LedgerError,
    RecordError,
    verify_folder,
)
from icam_med.batch import run_batch
from icam_med.report.collect import collect


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_three_scans(tmp_path_factory.mktemp("types"))


@pytest.fixture
def folder(pristine, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(pristine, dst)
    return dst


def verify_cli(folder, capsys, *extra):
    code = cli.main(["verify", str(folder), *extra])
    cap = capsys.readouterr()
    return code, cap.out + cap.err


# -- AuditRecord ---------------------------------------------------------------------------
def test_record_loads_typed_with_its_files_inside_the_folder(folder):
    path = folder / "scan-2" / "icam.icam.json"
    rec = AuditRecord.load(path)
    raw = json.loads(path.read_text())
    assert rec.scan_id == "scan-2" and rec.path == path
    assert rec.root == folder.absolute()  # inferred: outputs are named relative to it
    assert rec.input.voxel_sha256 == raw["input"]["voxel_sha256"]
    assert rec.input.shape == (8, 8, 6) and rec.input.spacing == (1.5, 1.5, 3.0)
    assert rec.method.name == "integrative" and rec.method.target.label == "present"
    assert rec.method.ordered_layer_weights() == {"net.layer1": 0.25, "net.layer2": 0.75}
    assert rec.weights_sha256 == raw["model"]["weights_sha256"] and rec.labels == ("absent",
                                                                                   "present")
    assert [(o.role, o.path) for o in rec.outputs] == [("map-nifti", "scan-2/icam.nii.gz")]
    assert rec.file(rec.output("map-nifti")) == folder.resolve() / "scan-2" / "icam.nii.gz"
    assert rec.sequence == 2 and rec.self_hash_ok()


@pytest.mark.parametrize(("content", "field", "words"), [
    (b"{}", "<record>", "is empty"),
    (b"[1, 2]", "<record>", "JSON list"),
    (b"null", "<record>", "JSON NoneType"),
    (b'{"schema_version": "1.0"', "<record>", "not valid JSON"),
    (b"\xff\xfe garbage", "<record>", "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "<record>", "nested too deeply"),
])
def test_unreadable_record_content_is_one_clear_error(folder, content, field, words):
    path = folder / "scan-1" / "icam.icam.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=words) as info:
        AuditRecord.load(path)
    assert info.value.path == path and info.value.field == field
    assert str(path) in str(info.value) and "icam-med verify" in str(info.value)


@pytest.mark.parametrize(("change", "field"), [
    (lambda r: r["method"].update(score="high"), "method.score"),
    (lambda r: r["input"].pop("voxel_sha256"), "input.voxel_sha256"),
    (lambda r: r["outputs"][0].update(path="../outside.nii.gz"), "outputs.0.path"),
    (lambda r: r.update(extra=1), "<record>"),
])
def test_schema_violation_names_file_and_field(folder, change, field):
    path = folder / "scan-1" / "icam.icam.json"
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))
    with pytest.raises(RecordError) as info:
        AuditRecord.load(path)
    assert info.value.field == field and str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_record_is_a_record_error(tmp_path):
    with pytest.raises(RecordError, match="cannot be read"):
        AuditRecord.load(tmp_path / "nope.icam.json")


def test_record_emptied_to_braces_fails_verify_clearly(folder, capsys):
    (folder / "scan-2" / "icam.icam.json").write_text("{}")
    report = verify_folder(folder)
    assert not report.ok
    [problem] = [p for p in report.problems if p.scan_id == "scan-2"]
    assert problem.line == 2 and "record 'scan-2/icam.icam.json' was changed" in problem.message
    code, out = verify_cli(folder, capsys)
    assert code == 1 and "Traceback" not in out and "ledger line 2" in out


# -- LedgerEntry -------------------------------------------------------------------------
def test_ledger_entry_parses_typed(folder):
    lines = (folder / "ledger.jsonl").read_bytes().splitlines()
    entry = LedgerEntry.parse(lines[0], 1)
    assert entry.seq == 1 and entry.kind == "scan" and entry.scan_id == "scan-1"
    assert entry.record.path == "scan-1/icam.icam.json" and entry.hash_ok()
    assert entry.outputs[0].role == "map-nifti" and entry.line == 1
    assert entry.previous_sha256 == "0" * 64
    assert Ledger(folder).entries()[1].previous_sha256 == entry.sha256


def _entry(folder, n):
    return json.loads((folder / "ledger.jsonl").read_bytes().splitlines()[n - 1])


@pytest.mark.parametrize(("mutate", "field", "words"), [
    (lambda e: e.update(seq="2"), "seq", "is not of type 'integer'"),
    (lambda e: e.update(outputs=7), "outputs", "is not of type 'array'"),
    (lambda e: e.update(record="scan-2/icam.icam.json"), "record", "is not of type 'object'"),
    (lambda e: e.pop("entry_sha256"), "entry_sha256", "required"),
    (lambda e: e.update(kind="bogus"), "kind", "is not one of"),
    (lambda e: e["record"].update(path="/etc/passwd"), "record.path", "does not match"),
])
def test_malformed_entry_is_a_ledger_error_with_line_and_field(folder, mutate, field, words):
    e = _entry(folder, 2)
    mutate(e)
    with pytest.raises(LedgerError, match=words) as info:
        LedgerEntry.parse(json.dumps(e), 2, path=folder / "ledger.jsonl")
    assert info.value.line == 2 and info.value.field == field
    assert "line 2" in str(info.value)


BAD_LINES = {
    "wrong field type": lambda e: json.dumps({**e, "seq": "2"}).encode(),
    "outputs not a list": lambda e: json.dumps({**e, "outputs": 7}).encode(),
    "a list": lambda e: b"[1, 2, 3]",
    "deep nesting": lambda e: b"[" * 200_000 + b"]" * 200_000,
    "binary": lambda e: b"\x00\xff\x13garbage",
    "huge number": lambda e: b'{"seq": 1' + b"0" * 5000 + b"}",
    "empty line": lambda e: b"",
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_verify_reports_a_malformed_entry_on_its_line_never_crashes(folder, capsys, case):
    ledger = folder / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines()
    lines[1] = BAD_LINES[case](json.loads(lines[1]))
    ledger.write_bytes(b"\n".join(lines) + b"\n")
    report = verify_folder(folder)
    assert not report.ok and report.first_problem.line == 2
    assert "not a" in report.first_problem.message  # "not a valid/not a ledger entry"
    code, out = verify_cli(folder, capsys, "--all")
    assert code == 1 and "Traceback" not in out and "ledger line 2" in out
    # The report shows the folder as broken and counts the line; it does not crash.
    data = collect(folder, figures=False)
    assert not data.verify.ok and data.unreadable_lines == 1
    assert len(data.entries) == 2
    # The ledger refuses to append after a damaged line only if it is the last one.
    entries, errors = Ledger(folder).read()
    assert [e.line for e in entries] == [1, 3] and [x.line for x in errors] == [2]


# -- a record replaced by {} in the next audit ---------------------------------------------
def _write_scans(folder, n):
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        vol = rng.integers(0, 500, (12, 14, 10)).astype(np.int16)
        vol[3:7, 4:9, 3:6] += 600
        nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])),
                 str(folder / f"case{i:02d}.nii.gz"))


def test_record_replaced_by_braces_fails_the_next_audit_clearly(tmp_path):
    cfg = write_tiny_lesionnet_config(tmp_path)
    _write_scans(tmp_path / "scans", 2)
    out = tmp_path / "audit"
    first = run_batch([tmp_path / "scans"], cfg, out, progress=False)
    assert first.exit_code == 0 and len(first.done) == 2
    (out / "scans" / "case01" / "cam.icam.json").write_text("{}")

    # Only the intact scan given: the damaged one is not redone, and its summary row says
    # why in words (it used to end in a KeyError).
    again = run_batch([tmp_path / "scans" / "case00.nii.gz"], cfg, out, progress=False)
    assert again.skipped == ["case00"] and again.exit_code == 0
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    assert rows["case01"]["status"] == "unreadable"
    assert "scans/case01/cam.icam.json" in rows["case01"]["reason"]
    assert "empty" in rows["case01"]["reason"]

    # Both given: the damaged scan fails with the reason, kept as evidence.
    third = run_batch([tmp_path / "scans"], cfg, out, progress=False)
    assert third.skipped == ["case00"] and list(third.failed) == ["case01"]
    assert "no longer verify" in third.failed["case01"]
    assert "cam.icam.json" in third.failed["case01"]
    assert (out / "scans" / "case01" / "cam.icam.json").read_text() == "{}"

    # The report shows the scan as not verified, without crashing.
    data = collect(out, figures=False)
    item = {s.scan_id: s for s in data.scans}["case01"]
    assert item.status == "failed" and not item.verified
