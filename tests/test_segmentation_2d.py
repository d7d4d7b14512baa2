"""2-D segmentation end to end (issue 13 items 3 and 4): a 2-D MONAI UNet (random weights,
saved to a weights file so the command line and the checks here run the same network) with a
region target on a DX radiograph, through the CLI and the batch audit. The map and
``cam_region.nii.gz`` land on the radiograph's own pixel grid (non-square pixels, the
radiograph's LPS-to-RAS flips), the record stores the label, the region's SHA-256 and voxel
count, and the score is the label's output summed over the region as MONAI's own 2-D
transforms put it on the model's grid (computed here independently of icam-med).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from icam_med.audit.hashing import voxel_sha256
from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.evaluation.radiographs import synthetic_radiograph, write_radiograph
from icam_med.explain import explain_volume, prepare
from icam_med.io import load_volume

ARGS = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
        "strides": [2], "num_res_units": 1}
PRE = [{"name": "Resized", "spatial_size": [64, 64], "mode": "area"},
       {"name": "NormalizeIntensityd"}]
BOX = np.s_[150:200, 40:90, 0]  # columns 150-199, rows 40-89: off-centre, so a flip shows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A DX radiograph (rows 300 x columns 240, 0.2 x 0.25 mm pixels), a mask on its grid and
    a config naming a random-weight 2-D UNet saved to a weights file."""
    from monai.networks.nets import UNet
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("seg2d")
    image = synthetic_radiograph(np.random.default_rng(7), (300, 240), finding=(60, 170),
                                 radius=14.0)
    scan = write_radiograph(folder / "chest.dcm", image, spacing=(0.2, 0.25),
                            window=(2048, 4096))
    _, info = load_volume(scan)
    mask = np.zeros(info.shape, np.uint8)
    mask[BOX] = 1
    mask_path = folder / "chest_seg.nii.gz"
    nib.save(nib.Nifti1Image(mask, np.asarray(info.affine, dtype=float)), str(mask_path))
    torch.manual_seed(0)
    net = UNet(**ARGS)
    weights = folder / "unet2d.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    config = folder / "seg2d.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "unet2d", "architecture": "UNet", "args": ARGS,
                  "weights": weights.name, "labels": ["background", "finding"],
                  "input": {"channels": 1, "spatial_size": [64, 64]}},
        "preprocessing": PRE, "method": {"name": "gradcam", "target_layers": "last"},
        "target": {"label": "finding", "region": {"mask": mask_path.name}}}),
        encoding="utf-8")
    return {"folder": folder, "scan": scan, "image": image, "mask": mask_path,
            "voxels": int(mask.sum()), "config": config, "info": info}


def _on_radiograph_grid(path, info):
    img = nib.load(str(path))
    assert img.shape == tuple(info.shape) == (240, 300, 1)  # columns, rows: the radiograph's
    np.testing.assert_allclose(img.affine, np.asarray(info.affine), atol=1e-5)
    return np.asarray(img.dataobj)


def _record_region(out, info):
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    target = record["method"]["target"]
    assert target["label"] == "finding" and target["class_index"] == 1
    region = _on_radiograph_grid(out / "cam_region.nii.gz", info)
    on_grid = (region != 0).astype(np.uint8)
    assert target["region"]["voxels"] == int(on_grid.sum()) > 0
    assert target["region"]["sha256"] == voxel_sha256(on_grid[None])
    cam = _on_radiograph_grid(out / "cam.nii.gz", info)
    assert np.isfinite(cam).all() and cam.min() >= 0 and 0 < cam.max() <= 1
    return record, on_grid


def test_mask_region_on_a_radiograph_through_the_cli(setup, capsys):
    out = setup["folder"] / "out_mask"
    rc = cli_main(["explain", str(setup["scan"]), "--config", str(setup["config"]),
                   "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"region: mask, {setup['voxels']} voxels on the scan's grid" in captured.out
    record, region = _record_region(out, setup["info"])
    assert record["method"]["target"]["region"]["source"] == "mask"
    assert record["method"]["target"]["region"]["voxels"] == setup["voxels"]
    mask = np.asarray(nib.load(str(setup["mask"])).dataobj)
    np.testing.assert_array_equal(region, mask)  # the region file is the mask, on its grid


def test_the_mask_reaches_the_model_grid_by_monais_2d_transforms(setup):
    """Score = the finding output summed over the mask as MONAI's Resized (area) puts the
    radiograph plane and the mask on the 64 x 64 model grid; a flipped mask scores otherwise."""
    from monai.data import MetaTensor
    from monai.transforms import Resized

    prepared = prepare(setup["config"])
    image, info = load_volume(setup["scan"])
    explanation = explain_volume(image, info, prepared)
    mask, _ = load_volume(setup["mask"])
    plane = MetaTensor(image.as_tensor()[..., 0])
    moved = Resized(["image", "region"], spatial_size=(64, 64), mode="area")(
        {"image": plane, "region": MetaTensor(mask.as_tensor()[..., 0].float())})
    region = moved["region"].as_tensor().clamp(0, 1)
    x = prepared.preprocessor(image)
    assert tuple(x.shape) == (1, 64, 64)
    with torch.no_grad():
        output = prepared.model(x.as_tensor()[None])[0]
    expected = float((output[1] * region[0]).sum())
    assert explanation.result.score == pytest.approx(expected, rel=1e-4, abs=1e-4)
    flipped = float((output[1] * region[0].flip(0)).sum())
    assert abs(flipped - expected) > 1e-3 * max(1.0, abs(expected))  # the check can fail
    assert explanation.region_info["model_grid_voxels"] == pytest.approx(float(region.sum()),
                                                                        rel=1e-3)
    assert explanation.region_info["voxels"] == setup["voxels"]


def test_predicted_region_on_a_radiograph_through_the_cli(setup, capsys):
    """The predicted region is the arg-max on the model grid carried back to the radiograph
    by MONAI's inverse of Resized (nearest): compared here with MONAI's own Resize."""
    from monai.transforms import Resize

    out = setup["folder"] / "out_predicted"
    rc = cli_main(["explain", str(setup["scan"]), "--config", str(setup["config"]),
                   "--region", "predicted", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "region: predicted as finding" in captured.out
    record, region = _record_region(out, setup["info"])
    assert record["method"]["target"]["region"]["source"] == "predicted"
    assert record["method"]["target"]["region"]["region_label"] == "finding"

    prepared = prepare(setup["config"])
    image, _ = load_volume(setup["scan"])
    x = prepared.preprocessor(image)
    with torch.no_grad():
        predicted = (prepared.model(x.as_tensor()[None])[0].argmax(0) == 1).float()
    back = Resize((240, 300), mode="nearest")(predicted[None])[0].numpy() > 0.5
    agree = float((back == (region[..., 0] > 0)).mean())
    assert agree > 0.99, agree


def test_batch_audit_of_radiographs_with_per_scan_masks(setup, tmp_path, capsys):
    """Two radiographs with the same pixels, each with its own mask: each record carries its
    own mask's hash and count, and the maps differ."""
    import shutil

    scans, masks = tmp_path / "xrays", tmp_path / "masks"
    scans.mkdir()
    masks.mkdir()
    shutil.copy(setup["scan"], scans / "a.dcm")
    write_radiograph(scans / "b.dcm", setup["image"], spacing=(0.2, 0.25), window=(2048, 4096))
    info = setup["info"]
    counts = {}
    for sid, box in (("a", BOX), ("b", np.s_[30:90, 200:260, 0])):
        m = np.zeros(info.shape, np.uint8)
        m[box] = 1
        nib.save(nib.Nifti1Image(m, np.asarray(info.affine, dtype=float)),
                 str(masks / f"{sid}.nii.gz"))
        counts[sid] = int(m.sum())
    out = tmp_path / "audit"
    rc = cli_main(["audit", str(scans), "--config", str(setup["config"]), "--out", str(out),
                   "--region-masks", str(masks), "--no-progress", "--no-report"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2 scan(s): 2 explained" in captured.out
    hashes = set()
    for sid in ("a", "b"):
        folder = out / "scans" / sid
        record, _region = _record_region(folder, info)
        assert record["method"]["target"]["region"]["voxels"] == counts[sid]
        mask, _ = load_volume(masks / f"{sid}.nii.gz")
        assert record["method"]["target"]["region"]["sha256"] == voxel_sha256(
            (mask.as_tensor() != 0).to(torch.uint8))
        hashes.add(record["method"]["target"]["region"]["sha256"])
    assert len(hashes) == 2
    cam_a = np.asarray(nib.load(str(out / "scans/a/cam.nii.gz")).dataobj)
    cam_b = np.asarray(nib.load(str(out / "scans/b/cam.nii.gz")).dataobj)
    assert not np.allclose(cam_a, cam_b, atol=1e-3)


def test_a_2d_segresnet_explains_a_radiograph_through_the_cli(setup, tmp_path, capsys):
    """Family coverage in 2-D for the other segmentation network: a random-weight 2-D
    SegResNet with the engine's default method over the mask; the map and the region land on
    the radiograph's grid and the record is valid."""
    from monai.networks.nets import SegResNet
    from safetensors.torch import save_file

    args = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "init_filters": 8,
            "blocks_down": [1, 1], "blocks_up": [1]}
    torch.manual_seed(1)
    net = SegResNet(**args)
    folder = setup["folder"]
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(folder / "segresnet2d.safetensors"))
    config = folder / "segresnet2d.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "segresnet2d", "architecture": "SegResNet", "args": args,
                  "weights": "segresnet2d.safetensors", "labels": ["background", "finding"],
                  "input": {"channels": 1, "spatial_size": [64, 64]}},
        "preprocessing": PRE,
        "target": {"label": "finding", "region": {"mask": setup["mask"].name}}}),
        encoding="utf-8")
    out = tmp_path / "segresnet"
    rc = cli_main(["explain", str(setup["scan"]), "--config", str(config), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    cam = _on_radiograph_grid(out / "cam.nii.gz", setup["info"])
    assert np.isfinite(cam).all() and cam.max() > 0
    record, region = _record_region(out, setup["info"])
    assert record["model"]["architecture"] == "SegResNet"
    assert record["method"]["name"] == "integrative"
    assert record["method"]["target"]["region"]["voxels"] == setup["voxels"]
    np.testing.assert_array_equal(region, np.asarray(nib.load(str(setup["mask"])).dataobj))
