"""Bounded memory from disk to model input: stored voxel types kept, no full-size float64
copies, and voxel hashes that do not depend on either (old records and resumed audits match).

The "previous code" the hashes are compared with is spelt out here from its definition:
every earlier version loaded a scan as float32 (MONAI's ``LoadImaged(dtype=float32)``, which
:func:`icam_med.io.make_loader` still builds by default) and hashed ``"<f4|<shape>|"`` plus
the float32 bytes in C order.
"""

from __future__ import annotations

import hashlib
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import torch
from io_helpers import nibabel_file

from icam_med.audit import voxel_sha256
from icam_med.cam.summary import map_statistics
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume, make_loader
from icam_med.io.preprocessing import Preprocessor
from icam_med.io.reader import SimpleITKDICOMReader

CT_STEPS = [  # configs/example_ct.yaml's pipeline at a small size
    {"name": "Orientationd", "axcodes": "RAS"},
    {"name": "Spacingd", "pixdim": [1.5, 1.5, 3.0], "mode": "bilinear"},
    {"name": "ScaleIntensityRanged", "a_min": -160.0, "a_max": 240.0, "b_min": 0.0,
     "b_max": 1.0, "clip": True},
    {"name": "ResizeWithPadOrCropd", "spatial_size": [24, 24, 16]},
]


def _ct_volume(shape_kji=(20, 48, 40), seed=0) -> np.ndarray:
    """int16 Hounsfield units: air, a body of soft tissue with noise, a bright lesion."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape_kji)
    body = ((i - shape_kji[2] / 2) / (0.4 * shape_kji[2])) ** 2 + (
        (j - shape_kji[1] / 2) / (0.3 * shape_kji[1])) ** 2 <= 1
    vol = np.where(body, 40, -1000).astype(np.int16)
    vol += rng.integers(-20, 21, size=vol.shape, dtype=np.int16)
    vol[(k - 10) ** 2 + (j - 20) ** 2 + (i - 24) ** 2 <= 9] = 180
    return vol


def _old_hash(image) -> str:
    """The voxel hash as every earlier version computed it (float32 array, C order)."""
    a = np.ascontiguousarray(np.asarray(image, dtype=np.float32), dtype="<f4")
    h = hashlib.sha256(f"<f4|{tuple(a.shape)}|".encode("ascii"))
    h.update(a.tobytes())
    return h.hexdigest()


def _old_load(path, files=None):
    """The scan as every earlier version loaded it: MONAI LoadImaged with dtype float32."""
    loader = make_loader("image")
    if files is not None:
        return loader({"image": str(path)}, SimpleITKDICOMReader(file_names=files))["image"]
    return loader({"image": str(path)})["image"]


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct") / "series"
    files = write_dicom_series(_ct_volume(), folder, spacing=(0.7, 0.8, 2.5),
                               origin=(-20.0, -15.0, 30.0), modality="CT")
    return folder, files


def test_ct_series_keeps_int16_and_its_hash(ct_series):
    folder, files = ct_series
    image, info = load_volume(folder)
    assert image.dtype == torch.int16 and info.source_dtype == "int16"
    assert image.is_contiguous()
    old = _old_load(folder, [str(f) for f in files])
    assert old.dtype == torch.float32
    np.testing.assert_array_equal(image.numpy(), old.numpy())  # the same values
    assert voxel_sha256(image) == _old_hash(old) == voxel_sha256(old)


def test_int16_nifti_keeps_its_type_and_hash(tmp_path):
    vol = _ct_volume().transpose(2, 1, 0)
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([0.7, 0.8, 2.5, 1.0])), path)
    image, info = load_volume(path)
    assert image.dtype == torch.int16 and info.source_dtype == "int16"
    old = _old_load(path)
    assert voxel_sha256(image) == _old_hash(old)


def test_big_endian_and_scaled_niftis_load_as_float32_with_their_old_hashes(tmp_path):
    # nibabel's big-endian int16 test image: kept as int16 in native byte order
    be = nibabel_file("anatomical.nii")
    image, _ = load_volume(be)
    assert image.dtype == torch.int16 and image.numpy().dtype.byteorder in "=|<"
    assert voxel_sha256(image) == _old_hash(_old_load(be))
    # a scaled int16 NIfTI (scl_slope 0.5): its values are not integers, float32 as before
    img = nib.Nifti1Image(_ct_volume().transpose(2, 1, 0), np.eye(4))
    img.header.set_slope_inter(0.5, -3.0)
    scaled = tmp_path / "scaled.nii"
    nib.save(img, scaled)
    image, _ = load_volume(scaled)
    assert image.dtype == torch.float32
    assert voxel_sha256(image) == _old_hash(_old_load(scaled))
    # float64 voxels: float32, never float64
    f64 = tmp_path / "f64.nii"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((9, 8, 7)), np.eye(4)), f64)
    image, _ = load_volume(f64)
    assert image.dtype == torch.float32
    assert voxel_sha256(image) == _old_hash(_old_load(f64))


def test_model_input_equals_the_float32_path_bit_for_bit(ct_series):
    folder, files = ct_series
    image, _ = load_volume(folder)
    pre = Preprocessor(CT_STEPS)
    assert pre.first_float_step == 1  # orientation runs on int16, spacing gets float32
    x = pre(image)
    old = pre(_old_load(folder, [str(f) for f in files]))
    assert x.dtype == torch.float32 and x.shape == old.shape
    assert torch.equal(x.as_tensor(), old.as_tensor())
    assert np.allclose(x.affine, old.affine)
    assert [o["class"] for o in x.applied_operations] == [
        o["class"] for o in old.applied_operations]


def test_reindexing_only_pipeline_gives_float32(ct_series):
    folder, _ = ct_series
    image, _ = load_volume(folder)
    pre = Preprocessor([{"name": "Orientationd", "axcodes": "RAS"},
                        {"name": "ResizeWithPadOrCropd", "spatial_size": [32, 32, 24]}])
    assert pre.first_float_step == 2
    x = pre(image)
    assert x.dtype == torch.float32 and image.dtype == torch.int16
    # padded with 0 and cropped exactly as the float32 path does
    ref = pre(image.to(torch.float32))
    assert torch.equal(x.as_tensor(), ref.as_tensor())


def _numpy_peak(fn) -> int:
    """Peak bytes numpy (and Python) allocated while ``fn`` ran (tracemalloc traces numpy's
    data buffers)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_voxel_hash_of_a_transposed_int16_volume_makes_no_full_size_copy():
    vol = np.random.default_rng(2).integers(-1000, 1000, size=(100, 256, 256), dtype=np.int16)
    view = np.transpose(vol)[None]  # how a reader hands over (column, row, slice) voxels
    expected = _old_hash(view)
    peak = _numpy_peak(lambda: voxel_sha256(view))
    assert voxel_sha256(view) == expected
    assert peak < view.size * 4 / 4  # under a quarter of one float32 copy


def test_map_statistics_makes_no_full_size_float64_copy():
    rng = np.random.default_rng(3)
    fused = torch.from_numpy(rng.random((1, 256, 256, 128), dtype=np.float32))
    peak = _numpy_peak(lambda: map_statistics(fused, np.eye(4)))
    assert peak < fused.numel() * 8 / 4  # under a quarter of one float64 copy
    a = fused.numpy()[0].astype(np.float64)  # the figures, computed the plain way
    stats = map_statistics(fused, np.eye(4))
    assert stats.mean == pytest.approx(a.mean(), rel=1e-12)
    assert stats.std == pytest.approx(a.std(), rel=1e-12)
    assert stats.peak_voxel == tuple(int(v) for v in np.unravel_index(a.argmax(), a.shape))
    grids = np.indices(a.shape)
    assert stats.centroid_voxel == tuple(round(float((g * a).sum() / a.sum()), 4) for g in grids)


def test_map_statistics_of_an_x_fastest_map_equal_those_of_its_c_ordered_copy():
    """The one-pass inverse returns maps laid out x fastest (what NIfTI and DICOM frames
    store); their statistics are taken slab by slab along the slowest axis in memory, with
    the peak still the first maximum in the map's C order (ties across slabs included), and
    no full-size float64 copy."""
    rng = np.random.default_rng(5)
    c_order = np.round(rng.random((96, 80, 300), dtype=np.float32) * 50) / 50  # many ties
    c_order[70, 3, 290] = c_order[70, 3, 10] = c_order[12, 60, 250] = 1.5  # peak ties
    x_fastest = np.asfortranarray(c_order)
    assert not x_fastest.flags.c_contiguous
    a, b = map_statistics(c_order, np.eye(4)), map_statistics(x_fastest, np.eye(4))
    assert b.peak_voxel == (12, 60, 250) == a.peak_voxel  # the first of the ties in C order
    assert b.mean == pytest.approx(a.mean, rel=1e-12) and b.std == pytest.approx(a.std, rel=1e-12)
    assert (b.min, b.max, b.frac_above_half, b.shape) == (a.min, a.max, a.frac_above_half,
                                                          a.shape)
    assert b.centroid_voxel == a.centroid_voxel
    zeros = np.asfortranarray(np.zeros((30, 20, 10), np.float32))
    assert map_statistics(zeros, np.eye(4)).peak_voxel == (0, 0, 0)
    big = np.asfortranarray(rng.random((256, 256, 128), dtype=np.float32))
    peak = _numpy_peak(lambda: map_statistics(torch.from_numpy(big)[None], np.eye(4)))
    assert peak < big.size * 8 / 4  # under a quarter of one float64 copy


def test_voxel_hash_is_over_values_whatever_the_stored_type():
    a = np.arange(-12, 12, dtype=np.int16).reshape(2, 3, 4)
    assert voxel_sha256(a) == voxel_sha256(a.astype(np.float32)) == voxel_sha256(
        a.astype(">i2")) == _old_hash(a)
    assert voxel_sha256(a.astype(np.uint8) if a.min() >= 0 else (a + 12).astype(np.uint8)) \
        == voxel_sha256((a + 12).astype(np.float32))
    b = a.copy()
    b[1, 2, 3] += 1
    assert voxel_sha256(b) != voxel_sha256(a)
    # types float32 does not hold exactly are hashed as they are
    assert voxel_sha256(a.astype(np.int32)) != voxel_sha256(a)
    assert voxel_sha256(a.astype(np.float64)) != voxel_sha256(a)


def test_dicom_series_voxels_come_back_in_xyz_order_exactly(ct_series):
    """The reader's plane-by-plane transpose gives the written voxels at (column, row,
    slice), C-contiguous, so MONAI makes no copy of its own."""
    folder, _ = ct_series
    image, _ = load_volume(folder)
    written = _ct_volume()  # (slice, row, column) as write_dicom_series stored it
    assert image.shape == (1, *written.shape[::-1])
    assert image.is_contiguous()
    np.testing.assert_array_equal(image[0].numpy(), written.transpose(2, 1, 0))


def test_plane_transpose_matches_numpy_on_odd_shapes():
    from icam_med.io.reader import _xyz_contiguous

    rng = np.random.default_rng(3)
    for shape in [(1, 1, 1), (3, 1, 7), (5, 9, 2), (17, 4, 33)]:
        zyx = rng.integers(-1000, 1000, size=shape).astype(np.int16)
        out = _xyz_contiguous(zyx)
        assert out.flags.c_contiguous and out.dtype == np.int16
        np.testing.assert_array_equal(out, np.ascontiguousarray(zyx.T))


def test_handed_over_volume_is_freed_before_the_float_copy(ct_series, monkeypatch):
    """Given in a list (as the explain pipeline does), the loaded volume is gone when the
    full-size float32 copy is made: the two never coexist at the preprocessing's peak."""
    import weakref

    from icam_med.io import preprocessing

    folder, _ = ct_series
    image, _ = load_volume(folder)
    alive_at_float: list[bool] = []
    ref = weakref.ref(image)
    real = preprocessing._as_float32

    def spy(t):
        if t.dtype != torch.float32:
            alive_at_float.append(ref() is not None)
        return real(t)

    monkeypatch.setattr(preprocessing, "_as_float32", spy)
    holder = [image]
    del image
    x = Preprocessor(CT_STEPS)(holder)
    assert holder == [] and x.dtype == torch.float32
    assert alive_at_float == [False]
    # Passed directly, the caller's reference keeps it (and the result is the same).
    image, _ = load_volume(folder)
    ref = weakref.ref(image)
    alive_at_float.clear()
    y = Preprocessor(CT_STEPS)(image)
    assert alive_at_float == [True]
    torch.testing.assert_close(x.as_tensor(), y.as_tensor(), rtol=0, atol=0)


def test_preprocessor_refuses_a_list_of_other_than_one_image(ct_series):
    folder, _ = ct_series
    image, _ = load_volume(folder)
    with pytest.raises(ValueError, match="one image in the list, got 2"):
        Preprocessor(CT_STEPS)([image, image])
