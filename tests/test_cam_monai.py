"""ComputeCAMd inside a user's own MONAI pipeline, inverted with MONAI's Invertd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from io_helpers import blob_volume
from monai.data import MetaTensor
from monai.networks.nets import Classifier
from monai.transforms import (
    Compose,
    Invertd,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    Spacingd,
)

from icam_med.cam import ComputeCAMd, make_cam
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume, make_loader


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Classifier(in_shape=(1, 16, 16, 16), classes=2, channels=(4, 8), strides=(2, 2)).eval()


def test_compute_camd_in_a_user_pipeline_and_back_with_invertd(tmp_path, model):
    write_dicom_series(blob_volume((10, 20, 18)), tmp_path / "s", spacing=(1.1, 0.9, 2.5),
                       modality="MR")
    pre = Compose([
        Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=(2.0, 2.0, 2.0)),
        ResizeWithPadOrCropd("image", spatial_size=(16, 16, 16)),
        NormalizeIntensityd("image"),
    ])
    pipeline = Compose([
        make_loader("image"),
        pre,
        ComputeCAMd("image", model, method="gradcam", target_layers="stages"),
        Invertd("image_cam", transform=pre, orig_keys="image", nearest_interp=False),
    ])
    out = pipeline({"image": str(tmp_path / "s")})
    _, info = load_volume(tmp_path / "s")
    cam = out["image_cam"]
    assert isinstance(cam, MetaTensor)
    assert tuple(cam.shape) == (1, *info.shape)
    np.testing.assert_allclose(np.asarray(cam.affine), info.affine, atol=1e-5)
    assert cam.meta["filename_or_obj"] == str(tmp_path / "s")
    # Before inversion the map shares the preprocessed image's metadata, plus the summary.
    forward = ComputeCAMd("image", model, method="gradcam", target_layers="stages")(
        {"image": out["image"]})
    summary = forward["image_cam"].meta["icam"]
    assert summary["method"] == "gradcam" and summary["target_class"] in (0, 1)
    assert abs(sum(summary["layer_weights"].values()) - 1) < 1e-5 or not any(
        summary["layer_weights"].values())
    # Same map as the engine called directly on the preprocessed image.
    x = out["image"]
    direct = make_cam("gradcam", model, target_layers="stages")(x.as_tensor()[None]).fused[0]
    torch.testing.assert_close(forward["image_cam"].as_tensor(), direct)
    np.testing.assert_allclose(np.asarray(forward["image_cam"].affine), np.asarray(x.affine))


def test_compute_camd_layer_maps_and_missing_keys(model):
    x = MetaTensor(torch.randn(1, 16, 16, 16), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    t = ComputeCAMd(["image", "other"], model, layer_maps=True, allow_missing_keys=True)
    out = t({"image": x})
    assert "other_cam" not in out
    assert set(out["image_cam_layers"]) == set(t.cam.layer_names((16, 16, 16)))
    with pytest.raises(KeyError):
        ComputeCAMd(["image", "other"], model)({"image": x})
