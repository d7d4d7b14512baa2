"""The one-pass inverse (issue 15 item 1): MONAI's inverse stays the reference.

:meth:`Preprocessor.invert` inverts the steps after the first resampling with MONAI at the
model's resolution, then samples the scan's grid once from the composed affine
(:func:`resample_to_grid`). It must equal :meth:`Preprocessor.invert_reference` (MONAI's
``Compose.inverse`` of every step) to float tolerance on oblique, anisotropic, cropped and
padded pipelines, and fall back to it for pipelines it does not cover.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from icam_med.io.preprocessing import Preprocessor, _fast_head, resample_to_grid


def rotation(deg) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("xyz", deg, degrees=True).as_matrix()


def scan(shape=(40, 34, 22), spacing=(0.7, 0.9, 2.5), direction=None, origin=(30, -20, 15),
         dtype=torch.int16) -> MetaTensor:
    aff = np.eye(4)
    d = np.diag([-1.0, -1.0, 1.0]) if direction is None else np.asarray(direction)
    aff[:3, :3] = d @ np.diag(spacing)
    aff[:3, 3] = origin
    g = torch.Generator().manual_seed(0)
    data = torch.randint(-1000, 1000, (1, *shape), generator=g).to(dtype)
    return MetaTensor(data, affine=torch.as_tensor(aff))


def smooth_map(shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    low = torch.rand(1, 1, 4, 4, 3, generator=g)
    return torch.nn.functional.interpolate(low, size=tuple(shape), mode="trilinear",
                                           align_corners=False)[0]


PIPELINES = {
    "example_ct": [
        {"name": "Orientationd", "axcodes": "RAS"},
        {"name": "Spacingd", "pixdim": [1.5, 1.5, 3.0], "mode": "bilinear"},
        {"name": "ScaleIntensityRanged", "a_min": -160.0, "a_max": 240.0, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"name": "ResizeWithPadOrCropd", "spatial_size": [16, 16, 12]},
    ],
    "cropped_and_padded": [
        {"name": "Orientationd", "axcodes": "LPS"},
        {"name": "Spacingd", "pixdim": [1.2, 2.0, 1.7]},
        {"name": "ResizeWithPadOrCropd", "spatial_size": [30, 9, 40]},  # crop x,y pad z
        {"name": "SpatialPadd", "spatial_size": [32, 12, 44]},
    ],
    "crop_foreground_then_resize": [
        {"name": "Spacingd", "pixdim": [1.0, 1.0, 2.0], "padding_mode": "zeros"},
        {"name": "CenterSpatialCropd", "roi_size": [20, 20, 8]},
        {"name": "Resized", "spatial_size": [16, 16, 16]},
        {"name": "NormalizeIntensityd"},
    ],
    "orientation_only": [
        {"name": "Orientationd", "axcodes": "RAS"},
        {"name": "Spacingd", "pixdim": [0.7, 0.9, 2.5]},  # same spacing: resampling at par
    ],
}


@pytest.mark.parametrize("geometry", ["axial", "oblique"])
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_one_pass_inverse_equals_monai_inverse(pipeline, geometry):
    direction = rotation([15, -25, 35]) if geometry == "oblique" else None
    image = scan(direction=direction)
    pre = Preprocessor(PIPELINES[pipeline])
    x = pre(image)
    assert _fast_head(x.applied_operations) > 0  # the one-pass path is taken
    cam = smooth_map(x.shape[1:])
    one_pass = pre._invert_fast(cam, x, image.shape[1:], image.affine, "bilinear")
    assert one_pass is not None  # taken, not fallen back from
    fast = pre.invert(cam, x, source_shape=image.shape[1:], source_affine=image.affine)
    np.testing.assert_array_equal(fast.numpy(), one_pass.numpy())
    ref = pre.invert_reference(cam, x, source_shape=image.shape[1:],
                               source_affine=image.affine)
    assert fast.shape == ref.shape == (1, *image.shape[1:])
    np.testing.assert_allclose(np.asarray(fast.affine), np.asarray(image.affine), atol=1e-9)
    assert float(ref.abs().max()) > 0.1  # a real map, not zeros on both sides
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=0, atol=2e-5)


def test_pipeline_without_resampling_uses_monai_inverse():
    image = scan()
    pre = Preprocessor([{"name": "Orientationd", "axcodes": "RAS"},
                        {"name": "ResizeWithPadOrCropd", "spatial_size": [32, 32, 32]}])
    x = pre(image)
    assert _fast_head(x.applied_operations) == 0
    cam = smooth_map(x.shape[1:])
    out = pre.invert(cam, x, source_shape=image.shape[1:], source_affine=image.affine)
    ref = pre.invert_reference(cam, x, source_shape=image.shape[1:], source_affine=image.affine)
    np.testing.assert_array_equal(out.numpy(), ref.numpy())


def test_wrong_source_is_still_refused():
    image = scan()
    pre = Preprocessor(PIPELINES["example_ct"])
    x = pre(image)
    with pytest.raises(ValueError, match="not the scan's"):
        pre.invert(smooth_map(x.shape[1:]), x, source_shape=(10, 10, 10),
                   source_affine=image.affine)


def test_resample_to_grid_slabs_and_nearest():
    """Slab size never changes the result; the output is laid out x fastest; nearest keeps
    label values."""
    low = smooth_map((9, 7, 5))
    low_aff = np.diag([2.0, 2.5, 3.0, 1.0])
    aff = np.diag([0.9, 1.1, 1.3, 1.0])
    aff[:3, 3] = [0.4, -0.3, 0.2]
    one = resample_to_grid(low, low_aff, (19, 15, 11), aff, slab_voxels=19 * 15)
    big = resample_to_grid(low, low_aff, (19, 15, 11), aff, slab_voxels=10**9)
    torch.testing.assert_close(one, big)
    # laid out x fastest (NIfTI's and DICOM frames' order): the writers need no transpose
    assert one.shape == (1, 19, 15, 11) and one.permute(0, 3, 2, 1).is_contiguous()
    labels = torch.randint(0, 4, (1, 9, 7, 5)).float()
    near = resample_to_grid(labels, low_aff, (19, 15, 11), aff, mode="nearest")
    assert set(near.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


@pytest.mark.parametrize("padding_mode", ["border", "zeros"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_separable_passes_equal_grid_sample(padding_mode, mode):
    """Permuted, flipped, scaled and shifted grids (reaching outside the low grid): three 1-D
    passes give grid_sample's trilinear values."""
    low = smooth_map((9, 7, 5)) + 0.5
    low_aff = np.array([[0.0, 2.5, 0.0, 3.0], [0.0, 0.0, -3.0, 12.0], [2.0, 0.0, 0.0, -4.0],
                        [0.0, 0.0, 0.0, 1.0]])
    aff = np.diag([0.9, -1.1, 1.3, 1.0])
    aff[:3, 3] = [-6.0, 14.0, 1.0]
    fast = resample_to_grid(low, low_aff, (21, 17, 13), aff, mode=mode,
                            padding_mode=padding_mode)
    ref = resample_to_grid(low, low_aff, (21, 17, 13), aff, mode=mode,
                           padding_mode=padding_mode, separable=False)
    if mode == "nearest":  # ties at exact half-voxels may round either way: nearly all equal
        assert float((fast != ref).float().mean()) < 0.01
    else:
        torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)
    if padding_mode == "zeros":
        assert float((ref == 0).float().mean()) > 0.05  # the test reaches outside
