"""Per-scan masks as segmentation targets in the batch audit (issue 13 item 4): a cohort where
every scan has its own mask, named by a pattern (``target.region.masks`` in the config, or
``icam-med audit --region-masks``). Real NIfTI files and a real DICOM series, NIfTI and DICOM
masks, a random-weight MONAI UNet, all through the CLI: each scan's record carries its own
mask's SHA-256 and voxel count, the maps differ where the masks differ, a missing mask or a
mask off its scan's grid fails that scan alone before anything is written for it, and resume
treats a changed mask as a changed input.
"""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from icam_med.audit.hashing import voxel_sha256
from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.config import ConfigError, RegionConfig, load_config, parse_config
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume
from tests.io_helpers import blob_volume

PRE = [{"name": "Orientationd", "axcodes": "RAS"},
       {"name": "Spacingd", "pixdim": [2.0, 2.0, 2.0]},
       {"name": "ResizeWithPadOrCropd", "spatial_size": [32, 32, 32]},
       {"name": "NormalizeIntensityd"}]
MODEL = {"name": "unet", "architecture": "UNet",
         "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
                  "strides": [2], "num_res_units": 0},
         "labels": ["background", "lesion"],
         "input": {"channels": 1, "spatial_size": [32, 32, 32]}}
PATTERN = "masks/{scan}_seg.nii.gz"


def _config(folder, region=None, *, target=True):
    data = {"model": MODEL, "preprocessing": PRE,
            "method": {"name": "gradcam", "target_layers": "last"}}
    if target:
        data["target"] = {"label": "lesion", **({"region": region} if region else {})}
    path = folder / "seg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _nifti(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _mask_for(scan, path, box):
    """A uint8 NIfTI mask on ``scan``'s grid (as the loader sees it), 1 inside ``box``."""
    _, info = load_volume(scan)
    mask = np.zeros(info.shape, np.uint8)
    mask[box] = 1
    return _nifti(path, mask, np.asarray(info.affine, dtype=float)), int(mask.sum())


@pytest.fixture()
def cohort(tmp_path):
    """Two NIfTI scans with the same voxels and grid (so only their masks differ) and a DICOM
    CT series on another grid; each scan's mask in masks/<name>_seg.nii.gz."""
    rng = np.random.default_rng(5)
    data = rng.normal(100.0, 20.0, (24, 20, 18)).astype(np.float32)
    affine = np.diag([1.5, 1.8, 2.2, 1.0])
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    scans = tmp_path / "scans"
    a = _nifti(scans / "case01.nii.gz", data, affine)
    b = _nifti(scans / "case02.nii.gz", data, affine)
    ct = scans / "case03"
    write_dicom_series(blob_volume((14, 22, 20), centre_zyx=(7, 11, 9)), ct,
                       spacing=(1.6, 1.4, 2.5), origin=(-12, 8, 30), modality="CT")
    masks = tmp_path / "masks"
    voxels = {
        "case01": _mask_for(a, masks / "case01_seg.nii.gz", np.s_[2:10, 3:11, 2:9])[1],
        "case02": _mask_for(b, masks / "case02_seg.nii.gz", np.s_[14:22, 9:17, 9:16])[1],
        "case03": _mask_for(ct, masks / "case03_seg.nii.gz", np.s_[5:12, 4:12, 3:9])[1],
    }
    return {"root": tmp_path, "scans": scans, "masks": masks, "voxels": voxels,
            "paths": {"case01": a, "case02": b, "case03": ct}}


def _audit(*args):
    return cli_main(["audit", *map(str, args), "--no-progress", "--no-report"])


def _record(out, scan_id):
    return json.loads((out / "scans" / scan_id / "cam.icam.json").read_text())


def _mask_sha(path):
    mask, _ = load_volume(path)
    return voxel_sha256((mask.as_tensor() != 0).to(dtype=torch.uint8))


def test_each_scan_is_explained_over_its_own_mask(cohort, capsys):
    config = _config(cohort["root"], {"masks": PATTERN})
    out = cohort["root"] / "audit"
    rc = _audit(cohort["scans"], "--config", config, "--out", out)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "3 scan(s): 3 explained" in captured.out
    hashes = {}
    for scan_id in ("case01", "case02", "case03"):
        record = _record(out, scan_id)
        validate_record(record)
        region = record["method"]["target"]["region"]
        mask = cohort["masks"] / f"{scan_id}_seg.nii.gz"
        assert region["source"] == "mask" and record["method"]["target"]["label"] == "lesion"
        assert region["voxels"] == cohort["voxels"][scan_id]
        assert region["sha256"] == _mask_sha(mask)
        hashes[scan_id] = region["sha256"]
        # the region file beside the map is this scan's mask, on this scan's grid
        written, info = load_volume(out / "scans" / scan_id / "cam_region.nii.gz")
        _, scan_info = load_volume(cohort["paths"][scan_id])
        assert tuple(info.shape) == tuple(scan_info.shape)
        np.testing.assert_allclose(np.asarray(info.affine), np.asarray(scan_info.affine),
                                   atol=1e-4)
        assert int((written.as_tensor() != 0).sum()) == cohort["voxels"][scan_id]
    assert len(set(hashes.values())) == 3
    # Same voxels, same grid, same model: only the masks differ, and so do the maps.
    cam_a = np.asarray(nib.load(str(out / "scans/case01/cam.nii.gz")).dataobj)
    cam_b = np.asarray(nib.load(str(out / "scans/case02/cam.nii.gz")).dataobj)
    assert cam_a.shape == cam_b.shape and not np.allclose(cam_a, cam_b, atol=1e-3)
    assert _record(out, "case01")["method"]["score"] != _record(out, "case02")["method"]["score"]
    # summary.csv carries each scan's region
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    for scan_id, n in cohort["voxels"].items():
        assert rows[scan_id]["region_source"] == "mask"
        assert rows[scan_id]["region_voxels"] == str(n)
        assert rows[scan_id]["region_sha256"] == hashes[scan_id]
    # the run's target region is in the ledger's run-start (the pattern's file-name part: the
    # ledger names no input folder)
    start = next(json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "run-start")
    assert start["details"]["target_region"] == {"kind": "masks", "label": None, "mask": None,
                                                 "pattern": "{scan}_seg.nii.gz"}


def test_a_missing_mask_fails_its_scan_alone_before_anything_is_written(cohort, capsys):
    (cohort["masks"] / "case02_seg.nii.gz").unlink()
    config = _config(cohort["root"], {"masks": PATTERN})
    out = cohort["root"] / "audit"
    rc = _audit(cohort["scans"], "--config", config, "--out", out)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    line = next(x for x in err.splitlines() if x.startswith("failed: case02"))
    # names the scan, the mask (by its role: the ledger keeps paths and their names out) and
    # the fix
    assert "scan case02: its region mask <region mask of case02> does not exist" in line
    assert "put the scan's mask there" in line and "correct the per-scan mask pattern" in line
    assert not (out / "scans" / "case02").exists()
    assert (out / "scans/case01/cam.icam.json").is_file()
    assert (out / "scans/case03/cam.icam.json").is_file()


def test_a_mask_off_its_scans_grid_fails_that_scan_before_output(cohort, capsys):
    # case03's mask made for case01's grid: another shape and affine than the CT series
    shutil.copy(cohort["masks"] / "case01_seg.nii.gz", cohort["masks"] / "case03_seg.nii.gz")
    config = _config(cohort["root"], {"masks": PATTERN})
    out = cohort["root"] / "audit"
    rc = _audit(cohort["scans"], "--config", config, "--out", out)
    err = capsys.readouterr().err
    assert rc == 1
    line = next(x for x in err.splitlines() if x.startswith("failed: case03"))
    assert "<region mask of case03>" in line and "scan's grid" in line
    assert "resample it onto the scan" in line
    assert not (out / "scans" / "case03").exists()
    assert _record(out, "case01")["method"]["target"]["region"]["voxels"] == \
        cohort["voxels"]["case01"]


def test_resume_treats_a_changed_mask_as_a_changed_input(cohort, capsys):
    config = _config(cohort["root"], {"masks": PATTERN})
    out = cohort["root"] / "audit"
    assert _audit(cohort["scans"], "--config", config, "--out", out) == 0
    capsys.readouterr()
    assert _audit(cohort["scans"], "--config", config, "--out", out) == 0
    assert "0 explained (0.00/s), 3 already done, 0 failed" in capsys.readouterr().out
    before = _record(out, "case01")
    _mask_for(cohort["paths"]["case01"], cohort["masks"] / "case01_seg.nii.gz",
              np.s_[4:12, 3:11, 2:9])  # same size, moved: the mask changed
    rc = _audit(cohort["scans"], "--config", config, "--out", out)
    captured = capsys.readouterr()
    assert rc == 1
    assert "2 already done, 1 failed" in captured.out
    line = next(x for x in captured.err.splitlines() if x.startswith("failed: case01"))
    assert "target region mask changed since it was audited" in line
    assert _record(out, "case01") == before  # the old outputs are kept as evidence
    assert cli_main(["verify", str(out)]) == 0


def test_masks_beside_their_scans_are_not_audited_as_scans(cohort, capsys):
    for scan_id in ("case01", "case02"):
        shutil.copy(cohort["masks"] / f"{scan_id}_seg.nii.gz",
                    cohort["scans"] / f"{scan_id}_seg.nii.gz")
    shutil.rmtree(cohort["scans"] / "case03")
    config = _config(cohort["root"], {"masks": "{dir}/{scan}_seg.nii.gz"})
    out = cohort["root"] / "audit"
    rc = _audit(cohort["scans"], "--config", config, "--out", out)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 scan(s): 2 explained" in captured.out
    assert sorted(p.name for p in (out / "scans").iterdir()) == ["case01", "case02"]


def test_region_masks_on_the_command_line_a_folder_of_masks_named_as_their_scans(
        cohort, capsys, monkeypatch):
    named = cohort["root"] / "labels"
    named.mkdir()
    for scan_id in ("case01", "case02", "case03"):
        shutil.copy(cohort["masks"] / f"{scan_id}_seg.nii.gz", named / f"{scan_id}.nii.gz")
    config = _config(cohort["root"], "predicted")  # replaced by --region-masks
    out = cohort["root"] / "audit"
    monkeypatch.chdir(cohort["root"])  # a command-line pattern is relative to the working folder
    rc = _audit(cohort["scans"], "--config", config, "--out", out, "--region-masks", "labels")
    assert rc == 0, capsys.readouterr().err
    for scan_id, n in cohort["voxels"].items():
        region = _record(out, scan_id)["method"]["target"]["region"]
        assert region["source"] == "mask" and region["voxels"] == n


def test_region_masks_without_a_target_label_is_refused_before_any_work(cohort, capsys):
    config = _config(cohort["root"], target=False)
    out = cohort["root"] / "audit"
    rc = _audit(cohort["scans"], "--config", config, "--out", out, "--region-masks", PATTERN)
    err = capsys.readouterr().err
    assert rc == 2 and "needs a target label" in err and "target: {label: LABEL}" in err
    assert not (out / "ledger.jsonl").exists()


def test_explain_one_scan_with_a_masks_config_takes_its_own_mask(cohort, capsys):
    config = _config(cohort["root"], {"masks": PATTERN})
    out = cohort["root"] / "one"
    rc = cli_main(["explain", str(cohort["paths"]["case02"]), "--config", str(config),
                   "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"region: mask, {cohort['voxels']['case02']} voxels" in captured.out
    record = json.loads((out / "cam.icam.json").read_text())
    assert record["method"]["target"]["region"]["sha256"] == _mask_sha(
        cohort["masks"] / "case02_seg.nii.gz")


@pytest.mark.parametrize(("masks", "message"), [
    ("masks/{name}.nii.gz", "unknown placeholder {name}"),
    ("masks/{scan!r}.nii.gz", "format specification or conversion"),
    ("masks/{scan.nii.gz", "not a valid pattern"),
    ("no_such_folder", "must be a folder of masks"),
])
def test_bad_mask_patterns_are_config_errors(tmp_path, masks, message):
    config = _config(tmp_path, {"masks": masks})
    with pytest.raises(ConfigError, match=r"target\.region\.masks") as err:
        load_config(config)
    assert message in str(err.value) and str(config) in str(err.value)


def test_one_region_form_only():
    data = {"model": MODEL, "preprocessing": PRE,
            "target": {"label": "lesion", "region": {"mask": "m.nii.gz", "masks": "{scan}.nii"}}}
    with pytest.raises(ConfigError, match="exactly one of 'predicted', 'mask' and 'masks'"):
        parse_config(data)


def test_mask_pattern_placeholders(tmp_path):
    region = RegionConfig.masks_pattern("seg/{id}/{scan}{{x}}.nii.gz", tmp_path)
    assert region.mask_for(tmp_path / "a" / "ct.series", "a_ct") == \
        tmp_path / "seg" / "a_ct" / "ct.series{x}.nii.gz"
    beside = RegionConfig.masks_pattern("{dir}/{scan}_seg.nii.gz", tmp_path)
    assert beside.mask_for(tmp_path / "x" / "t1.nii.gz") == tmp_path / "x" / "t1_seg.nii.gz"


def test_a_scan_list_names_each_scans_region_mask(cohort, capsys):
    """A CSV scan list's ``region`` column (relative to the list): masks with any names
    (here nnU-Net's: the image case_0001_0000, its label case_0001). An empty cell takes
    the config's region (predicted here); a row naming a missing mask fails that scan."""
    labels = cohort["root"] / "labelsTr"
    labels.mkdir()
    shutil.copy(cohort["masks"] / "case01_seg.nii.gz", labels / "case_0001.nii.gz")
    rows = ["path,id,region",
            "scans/case01.nii.gz,case_0001_0000,labelsTr/case_0001.nii.gz",
            "scans/case02.nii.gz,case_0002_0000,",
            "scans/case03,case_0003_0000,labelsTr/case_0003.nii.gz"]
    scan_list = cohort["root"] / "cohort.csv"
    scan_list.write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = _config(cohort["root"], "predicted")
    out = cohort["root"] / "audit"
    rc = _audit(scan_list, "--config", config, "--out", out)
    captured = capsys.readouterr()
    assert rc == 1
    line = next(x for x in captured.err.splitlines() if x.startswith("failed: case_0003_0000"))
    assert "<region mask of case_0003_0000> does not exist" in line
    assert "the scan list's 'region' column" in line
    first = _record(out, "case_0001_0000")["method"]["target"]["region"]
    assert first["source"] == "mask" and first["voxels"] == cohort["voxels"]["case01"]
    assert first["sha256"] == _mask_sha(labels / "case_0001.nii.gz")
    second = _record(out, "case_0002_0000")["method"]["target"]["region"]
    assert second["source"] == "predicted"
    assert not (out / "scans" / "case_0003_0000").exists()


def test_resume_with_another_region_or_config_is_refused_before_any_work(
        cohort, capsys, monkeypatch):
    """A folder holds one configuration's audit: resuming it with predicted regions after a
    run over per-scan masks, or with an edited config, is refused before anything is logged
    or written; the first run's configuration resumes as before."""
    named = cohort["root"] / "labels"
    named.mkdir()
    for scan_id in ("case01", "case02", "case03"):
        shutil.copy(cohort["masks"] / f"{scan_id}_seg.nii.gz", named / f"{scan_id}.nii.gz")
    config = _config(cohort["root"], "predicted")
    out = cohort["root"] / "audit"
    monkeypatch.chdir(cohort["root"])
    assert _audit(cohort["scans"], "--config", config, "--out", out,
                  "--region-masks", "labels") == 0
    capsys.readouterr()
    ledger = (out / "ledger.jsonl").read_bytes()

    rc = _audit(cohort["scans"], "--config", config, "--out", out)  # predicted, not masks
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "another configuration" in err and "the target region" in err
    assert "'kind': 'masks'" in err and "new folder" in err

    edited = config.read_text(encoding="utf-8").replace("gradcam", "layercam")
    assert edited != config.read_text(encoding="utf-8")
    config.write_text(edited, encoding="utf-8")
    rc = _audit(cohort["scans"], "--config", config, "--out", out, "--region-masks", "labels")
    err = capsys.readouterr().err
    assert rc == 2 and "the config file's SHA-256" in err
    assert (out / "ledger.jsonl").read_bytes() == ledger  # nothing logged by either

    config.write_text(edited.replace("layercam", "gradcam"), encoding="utf-8")
    assert _audit(cohort["scans"], "--config", config, "--out", out,
                  "--region-masks", "labels") == 0
    assert "3 already done, 0 failed" in capsys.readouterr().out
