"""Out-of-intended-use flags (issue 14 item 12): the model card states what the model is for,
the audit checks every scan against it and records what it checked, the report lists
violations for review."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _audit_util import write_tiny_lesionnet_config

from icam_med.audit import AuditRecord, verify_folder
from icam_med.audit.intended_use import IntendedUse
from icam_med.batch import run_batch
from icam_med.evaluation.samples import ensure_sample_scans
from icam_med.report import build_report

ROOT = Path(__file__).resolve().parents[1]
def test_ct_series_given_to_the_mr_demo_model_is_flagged(tmp_path):
    # the checkout's sample scans (conftest points ICAM_MED_SAMPLE_DIR there), built when missing
    # (a fresh clone has none until something builds them)
    samples = ensure_sample_scans()
    ct, mr = samples / "pydicom_ct5n_series", samples / "mni152_t1_2mm_lesion_dicom"
    out = tmp_path / "audit"
    result = run_batch([ct, mr], ROOT / "configs" / "demo.yaml", out, progress=False)
    assert result.exit_code == 0 and verify_folder(out).ok
    use = {sid: AuditRecord.load(out / "scans" / sid / "cam.icam.json").analysis.intended_use
           for sid in result.done}
    ct_use, mr_use = use["pydicom_ct5n_series"], use["mni152_t1_2mm_lesion_dicom"]
    # What was checked is recorded, against which card.
    card = ROOT / "sample_data" / "MODEL_CARD.md"
    assert ct_use["card"] == "MODEL_CARD.md"
    assert ct_use["card_sha256"] == IntendedUse.from_card(card).card_sha256
    assert ct_use["checked"] == ["modality", "spacing", "field of view", "intensity"]
    assert ct_use["not_checkable"] == ["body part (not in the file)"]
    assert ct_use["violations"][0] == "modality CT, intended MR"
    assert any(v.startswith("field of view") for v in ct_use["violations"])
    assert any(v.startswith("mean intensity") for v in ct_use["violations"])
    assert mr_use["violations"] == []  # the scan the model is for passes
    # The report puts the CT scan, and only it, in its review list.
    html = build_report(out).html.read_text("utf-8")
    review = html[html.index('id="review"'):html.index('id="scans"')]
    assert "outside the model&#39;s intended use: modality CT, intended MR" in review
    assert "#scan-pydicom_ct5n_series" in review
    assert "#scan-mni152_t1_2mm_lesion_dicom" not in review


def _scan(folder: Path) -> Path:
    vol = np.random.default_rng(0).integers(0, 500, (12, 14, 10)).astype(np.int16)
    p = folder / "case00.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(p))
    return p


def test_nifti_records_what_could_not_be_checked(tmp_path):
    cfg = write_tiny_lesionnet_config(tmp_path)
    (tmp_path / "MODEL_CARD.md").write_text(
        "# tiny\n```yaml intended-use\nmodality: [MR]\nspacing_mm: [1.0, 3.0]\n"
        "fov_mm: [20, 40]\n```\n")
    out = tmp_path / "audit"
    assert run_batch([_scan(tmp_path)], cfg, out, progress=False).exit_code == 0
    use = AuditRecord.load(out / "scans" / "case00" / "cam.icam.json").analysis.intended_use
    assert use["checked"] == ["spacing", "field of view"]
    assert use["not_checkable"] == ["modality (not in the file)"]
    assert use["violations"] == []  # 24 x 28 x 30 mm at 2-3 mm: inside the stated ranges


def test_a_card_without_intended_use_records_nothing(tmp_path):
    cfg = write_tiny_lesionnet_config(tmp_path)
    (tmp_path / "MODEL_CARD.md").write_text("# tiny\nNo intended-use block.\n")
    out = tmp_path / "audit"
    assert run_batch([_scan(tmp_path)], cfg, out, progress=False).exit_code == 0
    assert AuditRecord.load(out / "scans" / "case00" / "cam.icam.json").analysis \
        .intended_use is None


@pytest.mark.parametrize("block, message", [
    ("spacing_mm: [3.0, 1.0]\n", "intended-use 'spacing_mm'"),
    ("modality: 7\n", "intended-use 'modality'"),
    ("intensity: {mean: 1}\n", "intended-use 'intensity'"),
    ("colour: red\n", "unknown intended-use key"),
    ("spacing_mm: [1, \n", "not valid YAML"),
])
def test_a_bad_card_is_refused_before_any_work(tmp_path, block, message):
    cfg = write_tiny_lesionnet_config(tmp_path)
    card = tmp_path / "MODEL_CARD.md"
    card.write_text(f"# tiny\n```yaml intended-use\n{block}```\n")
    out = tmp_path / "audit"
    with pytest.raises(ValueError, match=message) as err:
        run_batch([_scan(tmp_path)], cfg, out, progress=False)
    assert str(card) in str(err.value)
    assert not (out / "ledger.jsonl").exists()
