"""Segmentation targets end to end (issue 13 items 4 and 6): random-weight MONAI UNet, SegResNet
and BasicUNet explained through the CLI and the batch audit with a config that names a target label
and a region (the predicted region of a label, or a mask on the scan's grid); each gets a map on
the scan's grid, its region as cam_region.nii.gz and a valid record with the label, the region's
SHA-256 and voxel count. Tiny 3-D scans (2-D input is helper E's path, not reachable here).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from icam_med.audit.hashing import voxel_sha256
from icam_med.audit.record import AuditRecord
from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.config import ConfigError, RegionConfig, parse_config
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.explain import explain_volume, prepare
from icam_med.io import load_volume
from tests.io_helpers import blob_volume

PRE = [{"name": "Orientationd", "axcodes": "RAS"},
       {"name": "Spacingd", "pixdim": [2.0, 2.0, 2.0]},
       {"name": "ResizeWithPadOrCropd", "spatial_size": [32, 32, 32]},
       {"name": "NormalizeIntensityd"}]
SEGMENTERS = {
    "UNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
              "strides": [2], "num_res_units": 0}, "last"),
    "SegResNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8,
                   "blocks_down": [1, 1], "blocks_up": [1]}, "last"),
    "BasicUNet": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                   "features": [4, 4, 8, 8, 16, 4]}, "last"),
}
LABELS = ["background", "lesion"]


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan") / "ct"
    write_dicom_series(blob_volume((14, 22, 20), centre_zyx=(7, 11, 9)), folder,
                       spacing=(1.6, 1.4, 2.5), origin=(-12, 8, 30), modality="CT")
    return folder


@pytest.fixture(scope="module")
def nifti_scan(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nifti")
    rng = np.random.default_rng(3)
    data = rng.normal(100.0, 20.0, (24, 20, 18)).astype(np.float32)
    affine = np.diag([1.5, 1.8, 2.2, 1.0])
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    path = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _config(folder, architecture, *, target=None, name=None):
    args, layers = SEGMENTERS[architecture]
    data = {"model": {"name": architecture.lower(), "architecture": architecture, "args": args,
                      "labels": LABELS, "input": {"channels": 1, "spatial_size": [32, 32, 32]}},
            "preprocessing": PRE,
            "method": {"name": "gradcam", "target_layers": layers}}
    if target is not None:
        data["target"] = target
    path = folder / (name or f"{architecture}.yaml")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _mask_on(scan_path, folder, box):
    """A mask NIfTI on the scan's grid (same shape and affine), 1 inside ``box``."""
    _, info = load_volume(scan_path)
    mask = np.zeros(info.shape, dtype=np.uint8)
    mask[box] = 1
    path = folder / "mask.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.asarray(info.affine, dtype=float)), str(path))
    return path, int(mask.sum())


def _check_outputs(out, scan, *, source, voxels=None):
    _, info = load_volume(scan)
    cam = nib.load(str(out / "cam.nii.gz"))
    assert cam.shape == info.shape
    np.testing.assert_allclose(cam.affine, info.affine, atol=1e-4)
    data = np.asarray(cam.dataobj)
    assert np.isfinite(data).all() and data.min() >= 0 and 0 < data.max() <= 1
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    target = record["method"]["target"]
    assert target["class_index"] == 1 and target["label"] == "lesion"
    region = target["region"]
    assert region["source"] == source
    # the region file lies on the scan's grid; the record's hash and count are of it
    region_img, region_info = load_volume(out / "cam_region.nii.gz")
    assert tuple(region_info.shape) == tuple(info.shape)
    np.testing.assert_allclose(np.asarray(region_info.affine), np.asarray(info.affine), atol=1e-4)
    on_scan = (region_img.as_tensor() > 0).to(torch.uint8)
    assert region["voxels"] == int(on_scan.sum()) > 0
    assert region["sha256"] == voxel_sha256(on_scan)
    if voxels is not None:
        assert region["voxels"] == voxels
    roles = {o["role"] for o in record["outputs"]}
    assert {"cam_nifti", "target_region", "summary"} <= roles
    return record


@pytest.mark.parametrize("architecture", sorted(SEGMENTERS))
def test_segmentation_family_predicted_region_through_the_cli(tmp_path, series, architecture,
                                                              capsys):
    config = _config(tmp_path, architecture, target={"label": "lesion", "region": "predicted"})
    out = tmp_path / "out"
    rc = cli_main(["explain", str(series), "--config", str(config), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "explained: lesion" in captured.out and "region: predicted as lesion" in captured.out
    record = _check_outputs(out, series, source="predicted")
    assert record["model"]["architecture"] == architecture
    assert record["method"]["target"]["region"]["region_label"] == "lesion"
    loaded = AuditRecord.load(out / "cam.icam.json")
    assert loaded.method.region["sha256"] == record["method"]["target"]["region"]["sha256"]
    assert loaded.method.sliding_window is None


def test_mask_region_is_brought_to_the_model_grid_by_the_image_transforms(tmp_path, nifti_scan,
                                                                          capsys):
    """The score explained is the lesion output summed over the mask as MONAI's own spatial
    transforms put it on the model's grid (computed here independently of icam-med)."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Orientationd, ResizeWithPadOrCropd, Spacingd

    mask_path, n_inside = _mask_on(nifti_scan, tmp_path, np.s_[6:14, 4:12, 5:11])
    config = _config(tmp_path, "UNet", target={"label": 1})
    out = tmp_path / "out"
    rc = cli_main(["explain", str(nifti_scan), "--config", str(config), "--out", str(out),
                   "--region", str(mask_path)])
    assert rc == 0, capsys.readouterr().err
    record = _check_outputs(out, nifti_scan, source="mask", voxels=n_inside)

    image, info = load_volume(nifti_scan)
    mask, _ = load_volume(mask_path)
    spatial = Compose([Orientationd(["image", "region"], axcodes="RAS"),
                       Spacingd(["image", "region"], pixdim=(2.0, 2.0, 2.0)),
                       ResizeWithPadOrCropd(["image", "region"], spatial_size=(32, 32, 32))])
    moved = spatial({"image": image, "region": MetaTensor(mask.as_tensor(), affine=image.affine)})
    region = moved["region"].as_tensor().clamp(0, 1)
    prepared = prepare(config)  # random weights: the same model for both sides below
    explanation = explain_volume(image, info, prepared, region=str(mask_path))
    x = prepared.preprocessor(image)
    with torch.no_grad():
        output = prepared.model(x.as_tensor()[None])
    expected = float((output[0, 1] * region[0]).sum())
    assert explanation.result.score == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert explanation.region_info["model_grid_voxels"] == pytest.approx(float(region.sum()),
                                                                        rel=1e-3)
    assert explanation.region_info["sha256"] == record["method"]["target"]["region"]["sha256"]


def test_predicted_region_of_another_label(nifti_scan):
    """`predicted:LABEL`: the lesion output summed where the model predicts background."""
    prepared = prepare(parse_config(
        yaml.safe_load(_config_text("UNet", target={"label": "lesion",
                                                    "region": {"predicted": "background"}}))))
    image, info = load_volume(nifti_scan)
    explanation = explain_volume(image, info, prepared)
    x = prepared.preprocessor(image)
    with torch.no_grad():
        output = prepared.model(x.as_tensor()[None])[0]
    background = output.argmax(0) == 0
    assert explanation.result.score == pytest.approx(float(output[1][background].sum()),
                                                     rel=1e-4, abs=1e-4)
    assert explanation.region_info["region_label"] == "background"
    assert explanation.region_info["label"] == "lesion"


def _config_text(architecture, *, target):
    args, layers = SEGMENTERS[architecture]
    return yaml.safe_dump({
        "model": {"name": "m", "architecture": architecture, "args": args, "labels": LABELS,
                  "input": {"channels": 1, "spatial_size": [32, 32, 32]}},
        "preprocessing": PRE, "method": {"name": "gradcam", "target_layers": layers},
        "target": target})


def test_mask_off_the_scan_grid_is_refused_before_any_output(tmp_path, nifti_scan, capsys):
    _, info = load_volume(nifti_scan)
    shifted = np.asarray(info.affine, dtype=float).copy()
    shifted[0, 3] += 5.0
    bad = tmp_path / "shifted_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(info.shape, np.uint8), shifted), str(bad))
    config = _config(tmp_path, "UNet", target={"label": "lesion", "region": {"mask": bad.name}})
    out = tmp_path / "out"
    rc = cli_main(["explain", str(nifti_scan), "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "shifted_mask.nii.gz" in err and "not on the scan's grid" in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("where", ["config", "cli"])
def test_missing_mask_is_refused_before_the_scan_is_read(tmp_path, nifti_scan, capsys, where):
    target = {"label": "lesion"}
    if where == "config":
        target["region"] = {"mask": "no_such_mask.nii.gz"}
    config = _config(tmp_path, "UNet", target=target)
    out = tmp_path / "out"
    extra = ["--region", str(tmp_path / "no_such_mask.nii.gz")] if where == "cli" else []
    rc = cli_main(["explain", str(nifti_scan), "--config", str(config), "--out", str(out),
                   *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "no_such_mask.nii.gz" in err and "does not exist" in err
    assert not out.exists()


def test_region_for_a_classifier_is_refused(tmp_path, nifti_scan, capsys):
    data = {"model": {"name": "dn", "architecture": "DenseNet121",
                      "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                               "init_features": 4, "growth_rate": 4,
                               "block_config": [1, 1, 1, 1]},
                      "labels": ["absent", "present"],
                      "input": {"channels": 1, "spatial_size": [32, 32, 32]}},
            "preprocessing": PRE, "method": {"name": "gradcam",
                                             "target_layers": ["features.denseblock3"]},
            "target": {"label": "present", "region": "predicted"}}
    config = tmp_path / "dn.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "out"
    rc = cli_main(["explain", str(nifti_scan), "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "classifier" in err and "remove the region" in err
    assert not (out / "cam.nii.gz").exists()


def test_a_classifier_target_label_from_the_config(tmp_path, nifti_scan, capsys):
    """target.label names a classifier's class too (as --target does)."""
    data = yaml.safe_load(_config_text("UNet", target={"label": "absent"}))
    data["model"] = {"name": "dn", "architecture": "DenseNet121",
                     "args": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                              "init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1]},
                     "labels": ["absent", "present"],
                     "input": {"channels": 1, "spatial_size": [32, 32, 32]}}
    data["method"] = {"name": "gradcam", "target_layers": ["features.denseblock3"]}
    config = tmp_path / "dn.yaml"
    config.write_text(yaml.safe_dump(data), encoding="utf-8")
    out = tmp_path / "out"
    assert cli_main(["explain", str(nifti_scan), "--config", str(config), "--out", str(out)]) == 0
    record = json.loads((out / "cam.icam.json").read_text())
    assert record["method"]["target"] == {"class_index": 0, "label": "absent"}
    assert not (out / "cam_region.nii.gz").exists()


def test_batch_audit_takes_the_target_from_the_config(tmp_path, nifti_scan, capsys):
    config = _config(tmp_path, "SegResNet", target={"label": "lesion"})
    out = tmp_path / "audit"
    rc = cli_main(["audit", str(nifti_scan), "--config", str(config), "--out", str(out),
                   "--no-progress", "--no-report"])
    assert rc == 0, capsys.readouterr().err
    records = sorted(out.glob("scans/*/cam.icam.json"))
    assert len(records) == 1
    record = json.loads(records[0].read_text())
    validate_record(record)
    assert record["method"]["target"]["region"]["source"] == "predicted"
    assert (records[0].parent / "cam_region.nii.gz").is_file()


def test_old_records_without_a_region_still_load(tmp_path, series, capsys):
    config = _config(tmp_path, "UNet", target={"label": "lesion"})
    out = tmp_path / "out"
    assert cli_main(["explain", str(series), "--config", str(config), "--out", str(out)]) == 0
    data = json.loads((out / "cam.icam.json").read_text())
    del data["method"]["target"]["region"]  # what records written before regions hold
    record = AuditRecord.from_dict(data)
    assert record.method.region is None and record.method.target.label == "lesion"


@pytest.mark.parametrize(("target", "message"), [
    ({"label": "lesion", "region": {"mask": "m.nii.gz", "predicted": True}}, "exactly one"),
    ({"label": "lesion", "region": "whole"}, "'target.region'"),
    ({"label": 1.5}, "'target.label'"),
    ({"label": True}, "'target.label'"),
    ({"lable": "lesion"}, "did you mean 'label'"),
])
def test_bad_target_sections_are_config_errors(target, message):
    with pytest.raises(ConfigError, match="config") as err:
        parse_config(yaml.safe_load(_config_text("UNet", target=target)))
    assert message in str(err.value)


def test_region_command_line_forms(tmp_path):
    assert RegionConfig.parse("predicted") == RegionConfig("predicted")
    assert RegionConfig.parse("predicted:2") == RegionConfig("predicted", 2)
    assert RegionConfig.parse("predicted:lesion") == RegionConfig("predicted", "lesion")
    assert RegionConfig.parse("./predicted").kind == "mask"
    with pytest.raises(ValueError, match="names no label"):
        RegionConfig.parse("predicted:")
