"""The coordinator's per-scan cost does not grow with the ledger.

Before every seal (and every write over existing files) the audit asks which files the
ledger pins (``Ledger.referenced_paths``). It used to parse the whole ledger each time, so
sealing the N-th scan of a batch parsed N lines: quadratic in the cohort. A process now
reads only the lines appended since its last look, and reads everything again when the
ledger is not the one it read (truncated, replaced, rewritten at the end).
"""

from __future__ import annotations

import os
import shutil

import pytest
from _audit_util import tiny_model_config, write_scan_outputs

import icam_med.audit.ledger as ledger_module
from icam_med.audit import Ledger, verify_folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pinned")
    out = base / "out"
    out.mkdir()
    cfg = tiny_model_config(base)
    for i in range(3):
        write_scan_outputs(out, f"scan-{i}", seed=i, model_cfg=cfg)
    return out, cfg


@pytest.fixture
def folder(pristine, tmp_path):
    out, cfg = pristine
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    return dst, cfg


def _pins(i: int) -> set[str]:
    return {f"scan-{i}/icam.icam.json", f"scan-{i}/icam.nii.gz"}


@pytest.fixture
def parsed(monkeypatch):
    """The ledger lines parsed (counted at LedgerEntry.parse)."""
    lines: list[bytes] = []
    real = ledger_module.LedgerEntry.parse.__func__

    def counting(cls, line, *args, **kwargs):
        lines.append(bytes(line))
        return real(cls, line, *args, **kwargs)

    monkeypatch.setattr(ledger_module.LedgerEntry, "parse", classmethod(counting))
    return lines


def test_only_appended_lines_are_read_again(folder, parsed):
    out, cfg = folder
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)
    assert len(parsed) == 3
    parsed.clear()
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)
    assert parsed == []  # nothing new: nothing parsed
    write_scan_outputs(out, "scan-3", seed=3, model_cfg=cfg)  # seals: asks for the pins
    parsed.clear()
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2) | _pins(3)
    assert len(parsed) <= 1  # the one new line at most (the seal may have read it)
    assert verify_folder(out).ok


def test_a_torn_line_pins_nothing_until_it_is_whole(folder):
    out, _ = folder
    ledger = out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:2]) + lines[2][:40])
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1)
    with open(ledger, "ab") as fh:
        fh.write(lines[2][40:])
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)


def test_a_truncated_or_replaced_ledger_is_read_again(folder, parsed):
    out, _ = folder
    ledger = out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)
    # truncated in place (same file): the last line read is no longer where it was
    with open(ledger, "r+b") as fh:
        fh.truncate(len(lines[0]) + len(lines[1]))
    parsed.clear()
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1)
    assert len(parsed) == 2
    # replaced by another file holding, where the last read stopped, the same last line
    # (its first line damaged): the file is another one, so it is read from the start
    inode = os.stat(ledger).st_ino
    other = out / "other.jsonl"
    other.write_bytes(b"x" * (len(lines[0]) - 1) + b"\n" + lines[1])
    os.replace(other, ledger)
    assert os.stat(ledger).st_ino != inode
    assert Ledger(out).referenced_paths() == _pins(1)
    # removed
    ledger.unlink()
    assert Ledger(out).referenced_paths() == set()


def test_a_damaged_line_pins_nothing_and_the_rest_still_counts(folder):
    out, _ = folder
    ledger = out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[0] + b'{"not": "an entry"}\n' + lines[2])
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(2)


# -- the identifiers a seal screens the record for: only identifying elements decoded -------
def _identifiers_decoding_everything(headers) -> set[str]:
    """The screen as it was: every element of every header decoded, then its keyword
    looked up (the oracle for the faster one)."""
    from icam_med.audit.phi import _TEXT_VRS, identifying_keywords

    values: set[str] = set()
    for ds in headers:
        for elem in ds:
            if elem.keyword not in identifying_keywords() or elem.VR not in _TEXT_VRS:
                continue
            items = elem.value if type(elem.value).__name__ == "MultiValue" else [elem.value]
            values.update(str(v).strip() for v in items if v is not None and str(v).strip())
    return values


def test_the_scan_identifiers_are_those_of_every_element_decoded(tmp_path):
    from types import SimpleNamespace

    import numpy as np
    import pydicom
    from _audit_util import PHI
    from io_helpers import pydicom_file

    from icam_med.audit.phi import identifiers_from_scan
    from icam_med.evaluation.dicom_series import write_dicom_series

    vol = np.random.default_rng(0).integers(0, 500, (10, 12, 6)).astype(np.int16)
    write_dicom_series(vol, tmp_path / "s", patient_name=PHI["PatientName"],
                       patient_id=PHI["PatientID"], patient_birth_date=PHI["PatientBirthDate"],
                       InstitutionName=PHI["InstitutionName"],
                       AccessionNumber=PHI["AccessionNumber"],
                       ReferringPhysicianName=PHI["ReferringPhysicianName"])
    headers = [pydicom.dcmread(f, stop_before_pixels=True)
               for f in sorted((tmp_path / "s").iterdir())]
    # real headers of other kinds, private tags and repeating groups included
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"):
        headers.append(pydicom.dcmread(pydicom_file(name), stop_before_pixels=True))
    headers[0].add_new(0x60020022, "LO", "overlay of QUIXOTE")  # OverlayDescription, group 6002
    headers[0].add_new(0x00091001, "LO", "private PANZA")  # private: not a known keyword
    expected = _identifiers_decoding_everything(headers)
    assert {PHI["PatientName"], PHI["PatientID"], PHI["AccessionNumber"]} <= expected
    got = set(identifiers_from_scan(SimpleNamespace(headers=headers)))
    assert got == expected


def test_a_seal_screens_the_record_with_the_identifiers_the_worker_read(tmp_path, monkeypatch):
    """A batch's coordinator seals with the identifiers its worker read from the scan's
    headers (AuditContext.identifiers) instead of reading every header again; a record
    holding one of them is still refused, and nothing is sealed."""
    import copy
    from dataclasses import replace

    import numpy as np
    from io_helpers import write_tiny_config

    import icam_med.audit.trail as trail
    from icam_med.audit import AuditContext
    from icam_med.audit.ledger import FolderLock
    from icam_med.evaluation.dicom_series import write_dicom_series
    from icam_med.explain import explain_volume, prepare, seal_outputs, write_outputs
    from icam_med.io import load_volume

    vol = np.random.default_rng(0).integers(0, 500, (16, 14, 8)).astype(np.int16)
    write_dicom_series(vol, tmp_path / "s", modality="CT")
    prepared = prepare(write_tiny_config(tmp_path))
    image, info = load_volume(tmp_path / "s")
    explanation = explain_volume(image, info, prepared)
    sent = copy.copy(explanation)
    sent.drop_maps()
    out = tmp_path / "out"
    out.mkdir()

    def no_header_reading(_info):
        raise AssertionError("the coordinator read the headers again")

    monkeypatch.setattr(trail, "identifiers_from_scan", no_header_reading)
    with FolderLock(out) as lock:
        ctx = AuditContext(root=out, command="audit", lock=lock, site_key=None)
        ok = replace(ctx, scan_id="a", identifiers=("QUIXOTE^ALONSO",))
        written = write_outputs(explanation, out / "scans" / "a", audit=ok)
        seal_outputs(sent, written, out / "scans" / "a", audit=ok)
        # the model's name is in every record: as an identifier, the record is refused
        bad = replace(ctx, scan_id="b", identifiers=("tiny-classifier",))
        written = write_outputs(explanation, out / "scans" / "b", audit=bad)
        with pytest.raises(ValueError, match="patient identifiers"):
            seal_outputs(sent, written, out / "scans" / "b", audit=bad)
    assert not (out / "scans" / "b" / "cam.icam.json").exists()
    report = verify_folder(out)
    assert report.n_scans == 1 and list(report.verified_scans) == ["a"]
