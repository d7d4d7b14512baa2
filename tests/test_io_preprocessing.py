"""Preprocessing from config, and maps carried back onto the scan's own grid."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from io_helpers import blob_volume, nibabel_file, peak_index, world_of

from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume
from icam_med.io.preprocessing import Preprocessor

PIPELINE = [
    {"name": "Orientationd", "axcodes": "RAS"},
    {"name": "Spacingd", "pixdim": [1.7, 1.3, 2.2], "mode": "bilinear"},
    {"name": "ResizeWithPadOrCropd", "spatial_size": [20, 18, 16]},
    {"name": "ScaleIntensityd"},
]


def gaussian_on_grid(affine, shape, centre_world, sigma_mm=4.0) -> np.ndarray:
    """A Gaussian evaluated at the world position of every voxel of a grid."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    world = (np.asarray(affine, float) @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    d2 = np.sum((world - np.asarray(centre_world)) ** 2, axis=1)
    return np.exp(-d2 / (2 * sigma_mm**2)).reshape(shape).astype(np.float32)


def check_round_trip(image, info, steps=PIPELINE):
    """A map made on the preprocessed grid lands on the right source voxels after inversion."""
    pre = Preprocessor(steps)
    x = pre(image)
    size = next(s["spatial_size"] for s in steps if "spatial_size" in s)
    assert tuple(x.shape[1:]) == tuple(size)
    src_peak = peak_index(image[0].numpy())
    target = world_of(info.affine, src_peak)
    cam = gaussian_on_grid(x.affine, x.shape[1:], target)
    back = pre.invert(torch.from_numpy(cam)[None], x, source_shape=info.shape,
                      source_affine=info.affine)
    # Exactly the source grid: shape and affine.
    assert tuple(back.shape) == (1, *info.shape)
    np.testing.assert_array_equal(np.asarray(back.affine), np.asarray(info.affine))
    assert back.dtype == torch.float32
    # The peak's world position is within one voxel of the source peak.
    got = world_of(back.affine, peak_index(back[0].numpy()))
    assert np.linalg.norm(got - target) <= np.linalg.norm(info.spacing) + 1e-6, (got, target)
    assert np.all(np.abs(got - target) <= np.max(info.spacing) + 1e-6)
    return pre, x, back


def test_dicom_lps_anisotropic_round_trip(tmp_path):
    vol = blob_volume((14, 30, 26), centre_zyx=(9, 11, 17), sigma=1.2)
    write_dicom_series(vol, tmp_path / "s", spacing=(0.9, 1.1, 3.0), origin=(-12, 30, 7),
                       modality="CT")
    image, info = load_volume(tmp_path / "s")
    assert info.orientation == "LPS"  # so Orientationd really flips two axes
    _, x, _ = check_round_trip(image, info)
    assert "".join(nib.aff2axcodes(np.asarray(x.affine))) == "RAS"


def test_oblique_dicom_round_trip(tmp_path):
    t = np.deg2rad(25)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])
    vol = blob_volume((12, 24, 28), centre_zyx=(5, 15, 9), sigma=1.2)
    write_dicom_series(vol, tmp_path / "s", spacing=(1.2, 1.0, 2.5), direction=rot,
                       origin=(5, -8, 20), modality="MR")
    image, info = load_volume(tmp_path / "s")
    check_round_trip(image, info)


def test_real_oblique_nifti_round_trip():
    image, info = load_volume(nibabel_file("example4d.nii.gz"), volume_index=0)
    check_round_trip(image, info, steps=[
        {"name": "Orientationd", "axcodes": "RAS"},
        {"name": "Spacingd", "pixdim": [4.0, 4.0, 4.0]},
        {"name": "ResizeWithPadOrCropd", "spatial_size": [40, 40, 16]},
    ])


def test_crop_keeps_zero_outside_the_field_of_view(tmp_path):
    # A heavy crop: the map is zero where the model never looked.
    vol = blob_volume((10, 40, 40), centre_zyx=(5, 20, 20), sigma=2)
    write_dicom_series(vol, tmp_path / "s", spacing=(1, 1, 2))
    image, info = load_volume(tmp_path / "s")
    pre = Preprocessor([{"name": "CenterSpatialCropd", "roi_size": [10, 10, -1]}])
    x = pre(image)
    back = pre.invert(torch.ones(x.shape), x, source_shape=info.shape, source_affine=info.affine)
    assert float(back.sum()) == pytest.approx(10 * 10 * 10)
    assert float(back[0, :15].sum()) == 0.0


def test_describe_lists_every_transform_with_parameters():
    desc = Preprocessor(PIPELINE).describe()
    assert [d["name"] for d in desc] == [s["name"] for s in PIPELINE]
    assert desc[1]["args"]["pixdim"] == [1.7, 1.3, 2.2] and desc[1]["invertible"] is True
    assert desc[3]["invertible"] is False  # intensity: nothing to invert


@pytest.mark.parametrize(("steps", "pattern"), [
    ([{"name": "Orientation", "axcodes": "RAS"}], r"not a MONAI dictionary transform.*Orientationd"),
    ([{"name": "LoadImaged"}], r"loading and saving are done by icam-med"),
    ([{"name": "Spacingd", "pixdims": 2}], r"step 1 \(Spacingd\).*rejected its arguments"),
])
def test_bad_steps_are_refused(steps, pattern):
    with pytest.raises(ValueError, match=pattern):
        Preprocessor(steps)


def test_map_of_wrong_size_is_refused(tmp_path):
    image, info = load_volume(nibabel_file("anatomical.nii"))
    pre = Preprocessor([{"name": "Resized", "spatial_size": [16, 16, 16]}])
    x = pre(image)
    with pytest.raises(ValueError, match=r"does not match the preprocessed image"):
        pre.invert(torch.zeros(1, 8, 8, 8), x)
    back = pre.invert(torch.zeros(1, 16, 16, 16), x, source_shape=info.shape,
                      source_affine=info.affine)
    assert tuple(back.shape[1:]) == info.shape


@pytest.mark.parametrize("name", ["example_ct.yaml", "example_mr.yaml"])
def test_example_configs_build_and_invert(name, tmp_path):
    from pathlib import Path

    from icam_med.config import load_config
    from icam_med.io.validation import GeometryOptions

    cfg = load_config(Path(__file__).parents[1] / "configs" / name)
    GeometryOptions.from_mapping(cfg.geometry)
    vol = blob_volume((20, 40, 36), centre_zyx=(10, 18, 20), sigma=3) - 500
    write_dicom_series(vol, tmp_path / "s", spacing=(1.0, 1.0, 2.5), modality="CT")
    image, info = load_volume(tmp_path / "s", geometry=cfg.geometry)
    pre = Preprocessor(cfg.preprocessing)
    x = pre(image)
    assert tuple(x.shape[1:]) == cfg.model.spatial_size
    back = pre.invert(torch.ones(x.shape), x, source_shape=info.shape, source_affine=info.affine)
    assert tuple(back.shape[1:]) == info.shape
