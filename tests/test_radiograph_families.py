"""Model-family coverage in 2-D: random-weight DenseNet121, ResNet18, SEResNet50 and
EfficientNetBN (MONAI's own classes, full size) explain a DX radiograph through the CLI
with a config; each map lies on the radiograph's pixel grid and each record is valid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml

from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.evaluation.radiographs import synthetic_radiograph, write_radiograph
from icam_med.io import load_volume

PRE = [{"name": "Resized", "spatial_size": [64, 64], "mode": "area"},
       {"name": "NormalizeIntensityd"}]

FAMILIES = {
    "DenseNet121": ({"spatial_dims": 2, "in_channels": 1, "out_channels": 2},
                    ["features.denseblock3"]),
    # MONAI's resnet18 is this class with basic blocks, layers [2, 2, 2, 2]
    "ResNet": ({"block": "basic", "layers": [2, 2, 2, 2], "block_inplanes": [64, 128, 256, 512],
                "spatial_dims": 2, "n_input_channels": 1, "num_classes": 2}, "stages"),
    "SEResNet50": ({"spatial_dims": 2, "in_channels": 1, "num_classes": 2}, ["layer3"]),
    "EfficientNetBN": ({"model_name": "efficientnet-b0", "spatial_dims": 2, "in_channels": 1,
                        "num_classes": 2, "pretrained": False}, "last"),
}


@pytest.fixture(scope="module")
def radiograph(tmp_path_factory):
    image = synthetic_radiograph(np.random.default_rng(2), (150, 120), finding=(60, 80),
                                 radius=8.0)
    return write_radiograph(tmp_path_factory.mktemp("dx") / "chest.dcm", image,
                            spacing=(0.5, 0.4), window=(2048, 4096))


@pytest.mark.parametrize("architecture", sorted(FAMILIES))
def test_2d_family_through_the_cli(tmp_path, radiograph, architecture, capsys):
    args, layers = FAMILIES[architecture]
    config = tmp_path / "family.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": architecture.lower(), "architecture": architecture, "args": args,
                  "labels": ["absent", "present"],
                  "input": {"channels": 1, "spatial_size": [64, 64]}},
        "preprocessing": PRE,
        "method": {"name": "gradcam", "target_layers": layers}}), encoding="utf-8")
    out = tmp_path / "out"
    rc = cli_main(["explain", str(radiograph), "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    _, info = load_volume(radiograph)
    cam = nib.load(str(out / "cam.nii.gz"))
    assert cam.shape == info.shape == (120, 150, 1)  # columns, rows: the radiograph's grid
    np.testing.assert_allclose(cam.affine, info.affine, atol=1e-6)
    data = np.asarray(cam.dataobj)
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    assert record["model"]["architecture"] == architecture
    assert {o["role"] for o in record["outputs"]} >= {"cam_nifti", "overlay_png",
                                                      "presentation_state"}
    ps = pydicom.dcmread(out / "cam_gsps.dcm")
    assert (ps.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
            == pydicom.dcmread(radiograph).SOPInstanceUID)
