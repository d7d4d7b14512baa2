"""explain_scan / icam-med explain: one scan in, maps on its grid and a JSON summary out."""

from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from io_helpers import (
    blob_volume,
    dciodvfy,
    dicomdir_series,
    listing,
    nibabel_file,
    write_tiny_config,
)

from icam_med.cli import main as cli_main
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.explain import explain_scan, explain_volume, prepare, write_explanation
from icam_med.io import load_volume


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return write_tiny_config(tmp_path_factory.mktemp("cfg"))


@pytest.fixture(scope="module")
def prepared(config):
    return prepare(config)


@pytest.fixture
def series(tmp_path):
    write_dicom_series(blob_volume((10, 24, 20), centre_zyx=(4, 12, 8)), tmp_path / "scan",
                       spacing=(0.9, 1.2, 2.5), origin=(-20, 10, 30), modality="MR",
                       patient_name="Doe^Jane", patient_id="MRN-0042")
    return tmp_path / "scan"


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_explain_dicom_folder_writes_maps_on_the_scan_grid(tmp_path, series, prepared):
    explanation, written = explain_scan(series, prepared, tmp_path / "out")
    roles = {w.role: w for w in written}
    assert {"cam_nifti", "parametric_map", "summary"} <= set(roles)
    # Everything in the folder is a listed output, apart from the audit ledger and the
    # folder's lock file (the one `audit` takes too).
    assert set(listing(tmp_path / "out")) - {"ledger.jsonl", ".icam-med.lock"} == \
        {w.path.name for w in written}
    _, info = load_volume(series)
    # NIfTI: the scan's shape and affine, values = the in-memory map.
    img = nib.load(roles["cam_nifti"].path)
    assert img.shape == info.shape
    np.testing.assert_allclose(img.affine, info.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), explanation.fused[0].numpy())
    assert float(explanation.fused.min()) >= 0.0 and float(explanation.fused.max()) <= 1.0
    # Parametric Map: valid, references the scan's series.
    errors, _ = dciodvfy(roles["parametric_map"].path)
    assert errors == []
    pm = pydicom.dcmread(roles["parametric_map"].path)
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_instance_uid
    # Summary: lists every other output with its real hash; no identifiers.
    text = roles["summary"].path.read_text()
    summary = json.loads(text)
    assert summary["schema_version"] == 1
    assert {o["file"]: o["sha256"] for o in summary["outputs"]} == {
        w.path.name: sha(w.path) for w in written if w.role in ("cam_nifti", "parametric_map")}
    assert roles["summary"].sha256 == sha(roles["summary"].path)
    assert summary["scan"]["format"] == "dicom" and summary["scan"]["shape"] == list(info.shape)
    assert summary["result"]["method"] == "integrative"
    assert summary["result"]["predicted_label"] in ("absent", "present")
    assert [p["name"] for p in summary["preprocessing"]][:2] == ["Orientationd", "Spacingd"]
    assert summary["map"]["peak_voxel"] == list(np.unravel_index(
        int(np.argmax(explanation.fused[0].numpy())), info.shape))
    for secret in ("Doe", "MRN-0042", info.series_instance_uid, str(series)):
        assert secret not in text


def test_explain_nifti_and_layer_maps(tmp_path, prepared):
    scan = nibabel_file("anatomical.nii")
    image, info = load_volume(scan)
    explanation = explain_volume(image, info, prepared, method="gradcam++", targets="present",
                                 layer_maps=True)
    assert explanation.result.method == "gradcam++"
    assert explanation.result.target_class == 1 and explanation.target_label == "present"
    assert explanation.layer_maps
    for m in explanation.layer_maps.values():
        assert tuple(m.shape) == (1, *info.shape)
        np.testing.assert_array_equal(np.asarray(m.affine), info.affine)
    written = write_explanation(explanation, tmp_path / "out")
    roles = [w.role for w in written]
    assert "parametric_map" not in roles  # NIfTI input: NIfTI output only
    assert sum(r.startswith("layer_map:") for r in roles) == len(explanation.layer_maps)
    src = nib.load(scan)
    for w in written:
        if w.path.name.endswith(".nii.gz"):
            out = nib.load(w.path)
            np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
            assert int(out.header["sform_code"]) == int(src.header["sform_code"])


def test_real_ct_series_end_to_end(tmp_path, prepared):
    _, written = explain_scan(dicomdir_series("98892001/CT5N"), prepared, tmp_path / "out")
    pm = next(w for w in written if w.role == "parametric_map")
    assert dciodvfy(pm.path)[0] == []


def test_never_overwrites_and_audited_outputs_are_never_replaced(tmp_path, series, prepared):
    _, first = explain_scan(series, prepared, tmp_path / "out")
    before = {p.name: sha(p) for p in (tmp_path / "out").iterdir()}
    with pytest.raises(FileExistsError, match=r"cam\.nii\.gz already exists.*--overwrite"):
        explain_scan(series, prepared, tmp_path / "out", method="gradcam")
    # Even --overwrite does not replace outputs pinned by the audit ledger.
    with pytest.raises(FileExistsError, match=r"cam\.icam\.json exists.*already recorded"):
        explain_scan(series, prepared, tmp_path / "out", method="gradcam", overwrite=True)
    assert {p.name: sha(p) for p in (tmp_path / "out").iterdir()} == before
    assert len(first) == len(before) - 2  # + the ledger and the folder's lock file


def test_unaudited_outputs_are_refused_unless_overwrite(tmp_path, series, prepared):
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / "cam.nii.gz"
    stale.write_bytes(b"an older map, without a record")
    with pytest.raises(FileExistsError, match=r"cam\.nii\.gz already exists.*--overwrite"):
        explain_scan(series, prepared, tmp_path / "out")
    assert stale.read_bytes() == b"an older map, without a record"
    _, written = explain_scan(series, prepared, tmp_path / "out", overwrite=True)
    assert nib.load(stale).shape == load_volume(series)[1].shape
    assert next(w for w in written if w.role == "cam_nifti").sha256 == sha(stale)


def test_a_failed_run_leaves_no_file(tmp_path, series, prepared, monkeypatch):
    import icam_med.io.writers as writers

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the Parametric Map is being built

    monkeypatch.setattr(writers, "write_parametric_map", interrupted)
    with pytest.raises(KeyboardInterrupt):
        explain_scan(series, prepared, tmp_path / "out")
    # The NIfTI written first was removed again; only the folder's lock file stays (a lock
    # file is never removed: that would let two writers hold the lock at once).
    assert listing(tmp_path / "out") == [".icam-med.lock"]


def test_weights_hash_is_recorded_and_checked(tmp_path, series):
    from monai.networks.nets import Classifier
    from safetensors.torch import save_file

    torch.manual_seed(1)
    net = Classifier(in_shape=(1, 16, 16, 16), classes=2, channels=(4, 8), strides=(2, 2))
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, weights)
    cfg = write_tiny_config(tmp_path, weights=weights)
    _, written = explain_scan(series, cfg, tmp_path / "out")
    summary = json.loads(next(w for w in written if w.role == "summary").path.read_text())
    assert summary["model"]["weights_sha256"] == sha(weights)
    # A tampered weights file is refused before anything is written.
    cfg_text = cfg.read_text() + ""
    import yaml

    data = yaml.safe_load(cfg_text)
    data["model"]["weights_sha256"] = "0" * 64
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="SHA-256"):
        explain_scan(series, cfg, tmp_path / "out2")
    assert listing(tmp_path / "out2") == []


def test_model_input_mismatch_is_refused_before_writing(tmp_path, series):
    import yaml

    cfg = write_tiny_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["preprocessing"] = [p for p in data["preprocessing"] if p["name"] != "ResizeWithPadOrCropd"]
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"spatial size after preprocessing .* expects \(16, 16, 16\)"):
        explain_scan(series, cfg, tmp_path / "out")
    assert listing(tmp_path / "out") == []


def test_cli_explain(tmp_path, series, config, capsys):
    rc = cli_main(["explain", str(series), "--config", str(config), "--out", str(tmp_path / "o"),
                   "--target", "present", "--method", "layercam", "--layer-maps"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "explained: present" in out and "method: layercam" in out
    assert "cam_parametric_map.dcm" in out and "cam_summary.json" in out
    assert any(n.startswith("cam_layer_") for n in listing(tmp_path / "o"))
    rc = cli_main(["explain", str(series), "--config", str(config), "--out", str(tmp_path / "o")])
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_cli_lists_series(tmp_path, config, capsys):
    rc = cli_main(["explain", str(dicomdir_series("98892003/MR2")), "--config", str(config),
                   "--list-series"])
    out = capsys.readouterr().out
    assert rc == 0 and "FAST LOCALIZER" in out and out.count("file(s)") == 3


def test_multiframe_without_positions_gets_nifti_and_a_note(tmp_path, prepared):
    from io_helpers import pydicom_file

    explanation, written = explain_scan(pydicom_file("emri_small.dcm"), prepared, tmp_path / "out")
    roles = {w.role for w in written}
    assert "cam_nifti" in roles and "parametric_map" not in roles
    summary = json.loads((tmp_path / "out" / "cam_summary.json").read_text())
    assert any("no Parametric Map written" in n for n in summary["notes"])
    assert any(c["status"] == "warned" for c in summary["scan"]["checks"])
    assert tuple(explanation.fused.shape[1:]) == (64, 64, 10)


def test_unknown_geometry_option_fails_before_any_work(tmp_path):
    cfg = write_tiny_config(tmp_path, geometry={"allow_tilt": True})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['allow_tilt'\]"):
        prepare(cfg)
