"""The explain path writes the record and ledger entry (one seam for CLI, batch and library)."""

from __future__ import annotations

import hashlib
import hmac
import json

import numpy as np
import pytest
from test_batch import PHI, PHI_NEEDLES, write_config

from icam_med.audit import validate_record, verify_folder
from icam_med.explain import explain_scan

KEY = "an-example-site-key-0123456789abcdef"


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    from icam_med.evaluation.dicom_series import write_dicom_series

    base = tmp_path_factory.mktemp("explain")
    cfg = write_config(base)
    rng = np.random.default_rng(5)
    vol = rng.integers(0, 400, (8, 14, 12)).astype(np.int16)
    write_dicom_series(vol, base / "series", modality="CT",
                       patient_name=PHI["PatientName"], patient_id=PHI["PatientID"],
                       patient_birth_date=PHI["PatientBirthDate"],
                       InstitutionName=PHI["InstitutionName"],
                       AccessionNumber=PHI["AccessionNumber"], StudyDate=PHI["StudyDate"])
    import pydicom

    ds = pydicom.dcmread(next((base / "series").iterdir()), stop_before_pixels=True)
    return base, cfg, ds


def test_explain_with_site_key_records_keyed_uids_only(dicom_case, tmp_path, monkeypatch):
    base, cfg, ds = dicom_case
    monkeypatch.setenv("ICAM_MED_SITE_KEY", KEY)
    out = tmp_path / "out"
    _, written = explain_scan(base / "series", cfg, out)
    roles = {w.role for w in written}
    assert {"cam_nifti", "summary", "audit_record"} <= roles
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    hashes = record["input"]["uid_hashes"]
    assert hashes["study"] == hmac.new(KEY.encode(), str(ds.StudyInstanceUID).encode(),
                                       hashlib.sha256).hexdigest()
    assert hashes["n_instances"] == 8
    # Every output the record lists, and the record itself, is in the ledger and verifies.
    assert {o["role"] for o in record["outputs"]} == roles - {"audit_record"}
    report = verify_folder(out)
    assert report.ok and report.n_scans == 1
    raw_uids = [str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID),
                str(ds.FrameOfReferenceUID), str(ds.SOPInstanceUID)]
    for name in ("cam.icam.json", "ledger.jsonl", "cam_summary.json", "cam.nii.gz"):
        data = (out / name).read_bytes().lower()
        for needle in [*PHI_NEEDLES, *raw_uids]:
            assert needle.lower().encode() not in data, (name, needle)


def test_explain_never_replaces_an_audited_map(dicom_case, tmp_path):
    base, cfg, _ = dicom_case
    out = tmp_path / "out"
    explain_scan(base / "series", cfg, out)
    before = (out / "ledger.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match="already recorded"):
        explain_scan(base / "series", cfg, out, overwrite=True)
    assert (out / "ledger.jsonl").read_bytes() == before
    assert verify_folder(out).ok
