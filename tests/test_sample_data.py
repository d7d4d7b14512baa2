"""icam_med.evaluation.samples (scripts/make_sample_data.py calls it): deterministic sample
scans, DICOM == NIfTI, the demo model on them, and the on-demand cache the plugin uses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from icam_med.config import load_config
from icam_med.evaluation import samples
from icam_med.io import load_volume
from icam_med.io.preprocessing import Preprocessor
from icam_med.models import load_model

REPO = Path(__file__).resolve().parents[1]
EXPECTED = REPO / "sample_data" / "scans.sha256.json"


@pytest.fixture(scope="module")
def scans(tmp_path_factory):
    out = tmp_path_factory.mktemp("scans")
    manifest = samples.generate(out)
    return samples, out, manifest


def test_sample_scans_match_the_recorded_digests(scans):
    script, out, manifest = scans
    expected = json.loads(EXPECTED.read_text())
    for name, digest in expected.items():
        entry = manifest["files"][name]
        got = entry.get("sha256") or entry.get("pixels_and_geometry_sha256")
        assert got == digest, f"{name} is not reproduced bit for bit"
    assert "McConnell Brain Imaging Centre" in manifest["mni152_notice"]
    # A second run changes nothing (it verifies instead of rewriting).
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    script.generate(out)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")} == before


def test_dicom_series_loads_to_the_nifti_and_the_ct_series_is_real(scans):
    script, out, _ = scans
    nii, _ = load_volume(out / script.LESION)
    dcm, _ = load_volume(out / script.LESION_DICOM)
    assert dcm.shape == nii.shape == (1, 99, 117, 95)
    assert torch.equal(dcm.as_tensor(), nii.as_tensor())
    assert np.allclose(np.asarray(dcm.affine), np.asarray(nii.affine))
    mask, _ = load_volume(out / script.LESION_MASK)
    m = mask[0].numpy() > 0
    healthy, _ = load_volume(out / script.BRAIN)
    assert m.sum() > 50
    assert float(nii[0].numpy()[m].mean()) > float(healthy[0].numpy()[m].mean())
    ct, _ = load_volume(out / script.CT_SERIES)
    assert ct.shape == (1, 16, 16, 5)


def test_demo_model_tells_the_lesion_brain_from_the_healthy_one(scans):
    script, out, _ = scans
    cfg = load_config(REPO / "configs" / "demo.yaml")
    model, _ = load_model(cfg.model)
    pre = Preprocessor(cfg.preprocessing)
    probs = {}
    for name in (script.BRAIN, script.LESION, script.LESION_DICOM):
        image, _ = load_volume(out / name)
        x = pre(image)
        assert tuple(x.shape[1:]) == cfg.model.spatial_size
        with torch.no_grad():
            probs[name] = float(torch.softmax(model(x.as_tensor()[None]), 1)[0, 1])
    assert probs[script.BRAIN] < 0.5 < probs[script.LESION]
    assert probs[script.LESION_DICOM] == pytest.approx(probs[script.LESION], abs=1e-4)


def test_the_script_is_a_thin_caller_of_the_library(scans, repo_script, capsys):
    _, out, manifest = scans
    before = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert repo_script("make_sample_data").main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in manifest["files"]:
        assert str(out / name) in printed
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")} == before


def test_plugin_samples_are_built_on_demand_in_the_sample_dir(scans, tmp_path, monkeypatch):
    _, built, _ = scans
    # a folder already holding the scans is used as it is (nothing rewritten)
    monkeypatch.setenv("ICAM_MED_SAMPLE_DIR", str(built))
    stamp = {p: p.stat().st_mtime_ns for p in built.glob("*.nii.gz")}
    assert samples.sample_scan_path(samples.LESION) == built / samples.LESION
    assert {p: p.stat().st_mtime_ns for p in built.glob("*.nii.gz")} == stamp
    # an empty folder gets every sample, the same bytes as the recorded digests
    fresh = tmp_path / "cache"
    monkeypatch.setenv("ICAM_MED_SAMPLE_DIR", str(fresh))
    path = samples.sample_scan_path(samples.LESION_MASK)
    assert path == fresh / samples.LESION_MASK and path.is_file()
    expected = json.loads(EXPECTED.read_text())
    import hashlib

    assert hashlib.sha256(path.read_bytes()).hexdigest() == expected[samples.LESION_MASK]
    assert all((fresh / name).exists() for name in samples.SAMPLE_NAMES)
    with pytest.raises(ValueError, match=r"not a sample scan.*mni152_t1_2mm\.nii\.gz"):
        samples.sample_scan_path("brain.nii.gz")
