"""Model-family coverage (issue 13 item 6, 3-D): random-weight MONAI networks explained through
the CLI with a config, each a map on the scan's grid and a valid audit record. Tiny inputs.

Segmentation networks (UNet, SegResNet) need a target label (and optionally a region): without
one the CLI refuses them with a one-line message naming the fix; with one they are explained
(tests/test_segmentation_targets.py).
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from icam_med.audit.schema import validate_record
from icam_med.cli import main as cli_main
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume
from tests.io_helpers import blob_volume

PRE = [{"name": "Orientationd", "axcodes": "RAS"},
       {"name": "Spacingd", "pixdim": [2.0, 2.0, 2.0]},
       {"name": "ResizeWithPadOrCropd", "spatial_size": [32, 32, 32]},
       {"name": "NormalizeIntensityd"}]

CLASSIFIERS = {
    "DenseNet121": ({"spatial_dims": 3, "in_channels": 1, "out_channels": 2,
                     "init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1]},
                    ["features.denseblock3"]),
    # ResNet18's basic blocks (MONAI's resnet18 is this class with layers [2, 2, 2, 2]), thinned
    "ResNet": ({"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 8],
                "spatial_dims": 3, "n_input_channels": 1, "num_classes": 2}, "stages"),
    "SEResNet50": ({"spatial_dims": 3, "in_channels": 1, "num_classes": 2,
                    "layers": [1, 1, 1, 1]}, ["layer2"]),
    "EfficientNetBN": ({"model_name": "efficientnet-b0", "spatial_dims": 3, "in_channels": 1,
                        "num_classes": 2, "pretrained": False}, "last"),
}
SEGMENTERS = {
    "UNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8],
             "strides": [2], "num_res_units": 0},
    "SegResNet": {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 8,
                  "blocks_down": [1, 1], "blocks_up": [1]},
}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan") / "ct"
    write_dicom_series(blob_volume((14, 22, 20), centre_zyx=(7, 11, 9)), folder,
                       spacing=(1.6, 1.4, 2.5), origin=(-12, 8, 30), modality="CT")
    return folder


def _config(tmp_path, architecture, args, target_layers):
    data = {"model": {"name": architecture.lower(), "architecture": architecture, "args": args,
                      "labels": ["absent", "present"],
                      "input": {"channels": 1, "spatial_size": [32, 32, 32]}},
            "preprocessing": PRE,
            "method": {"name": "gradcam", "target_layers": target_layers}}
    path = tmp_path / f"{architecture}.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("architecture", sorted(CLASSIFIERS))
def test_classifier_family_through_the_cli(tmp_path, series, architecture, capsys):
    args, layers = CLASSIFIERS[architecture]
    config = _config(tmp_path, architecture, args, layers)
    out = tmp_path / "out"
    rc = cli_main(["explain", str(series), "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err
    _, info = load_volume(series)
    cam = nib.load(str(out / "cam.nii.gz"))
    assert cam.shape == info.shape
    np.testing.assert_allclose(cam.affine, info.affine, atol=1e-4)
    data = np.asarray(cam.dataobj)
    assert np.isfinite(data).all() and data.min() >= 0 and data.max() <= 1
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    assert record["model"]["architecture"] == architecture
    assert record["method"]["name"] == "gradcam"


@pytest.mark.parametrize("architecture", sorted(SEGMENTERS))
def test_segmentation_family_without_a_target_is_refused_with_the_fix(tmp_path, series,
                                                                     architecture, capsys):
    config = _config(tmp_path, architecture, SEGMENTERS[architecture], "last")
    out = tmp_path / "out"
    rc = cli_main(["explain", str(series), "--config", str(config), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    error = [ln for ln in err.splitlines() if ln.startswith("icam-med explain: error:")]
    assert len(error) == 1 and "--target LABEL" in error[0] and "--region" in error[0]
    assert not (out / "cam.nii.gz").exists()
