"""The compact Parametric Map encodings (issue 15): the options beside the default, the
stored values exact to the stated quantisation, and a writer that leaves the source headers
as it found them (no source pixel data read)."""

from __future__ import annotations

import sys

import numpy as np
import pydicom
import pytest
import torch
from io_helpers import blob_volume, dciodvfy
from monai.data import MetaTensor

from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume
from icam_med.io.writers import FLOAT_QUANTUM, quantise_float, write_parametric_map


@pytest.fixture
def series(tmp_path):
    write_dicom_series(blob_volume((6, 20, 18)), tmp_path / "s", spacing=(0.8, 1.1, 3.0),
                       origin=(-10, 5, 40), modality="CT")
    image, info = load_volume(tmp_path / "s")
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in info.shape], indexing="ij")
    smooth = torch.exp(-(zz**2 + yy**2 + xx**2) * 2.0)[None]  # values need the quantisation
    return MetaTensor(smooth, affine=image.affine), info


def _pixels(path):
    ds = pydicom.dcmread(path)
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    return ds, ds.pixel_array.astype(np.float64) * float(rwvm.RealWorldValueSlope) + float(
        rwvm.RealWorldValueIntercept)


def test_quantise_float_is_exact_to_its_quantum():
    values = np.random.default_rng(0).random(100_000).astype(np.float32)
    values[:4] = [0.0, 1.0, FLOAT_QUANTUM / 2, 1.0 - FLOAT_QUANTUM / 3]
    q = quantise_float(values)
    assert q.dtype == np.dtype("<f4")
    k = q.astype(np.float64) / FLOAT_QUANTUM
    assert np.array_equal(k, np.round(k))  # exactly k / 65536
    assert np.abs(q.astype(np.float64) - values).max() <= FLOAT_QUANTUM / 2
    # the nearest multiple (float32 rounding cannot move a value to another one)
    np.testing.assert_array_equal(q, np.round(values.astype(np.float64) / FLOAT_QUANTUM)
                                  * FLOAT_QUANTUM)
    # of a value in [0, 1], the 8 low mantissa bits are zero: what deflate removes
    assert not np.any(q.view(np.uint32) & 0xFF)


@pytest.mark.parametrize("compress", ["deflate", "rle", "jpeg-ls"])
def test_uint16_options_hold_the_uncompressed_values(tmp_path, series, compress):
    cam, info = series
    plain = write_parametric_map(cam, info, tmp_path / "plain.dcm", method="gradcam",
                                 pixel_type="uint16", compress="none")
    packed = write_parametric_map(cam, info, tmp_path / f"{compress}.dcm", method="gradcam",
                                  pixel_type="uint16", compress=compress)
    assert dciodvfy(packed)[0] == []
    ds, values = _pixels(packed)
    expected = {"deflate": pydicom.uid.DeflatedExplicitVRLittleEndian,
                "rle": pydicom.uid.RLELossless, "jpeg-ls": pydicom.uid.JPEGLSLossless}[compress]
    assert ds.file_meta.TransferSyntaxUID == expected
    np.testing.assert_array_equal(values, _pixels(plain)[1])
    if compress != "rle":  # (RLE gains on large maps with flat regions, not on a small ramp)
        assert packed.stat().st_size < plain.stat().st_size


def test_default_is_smaller_than_uncompressed_float(tmp_path, series):
    cam, info = series
    default = write_parametric_map(cam, info, tmp_path / "d.dcm", method="gradcam")
    plain = write_parametric_map(cam, info, tmp_path / "p.dcm", method="gradcam",
                                 compress="none")
    ds, values = _pixels(default)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    assert "FloatPixelData" in ds and ds.BitsAllocated == 32
    k = values / FLOAT_QUANTUM
    assert np.array_equal(k, np.round(k))
    np.testing.assert_allclose(values, _pixels(plain)[1], rtol=0, atol=FLOAT_QUANTUM / 2)
    assert default.stat().st_size < plain.stat().st_size


def test_bad_options_are_refused_before_writing(tmp_path, series):
    cam, info = series
    with pytest.raises(ValueError, match="compress 'zip': expected one of deflate, none"):
        write_parametric_map(cam, info, tmp_path / "a.dcm", method="gradcam", compress="zip")
    with pytest.raises(ValueError, match="needs pixel_type='uint16'"):
        write_parametric_map(cam, info, tmp_path / "b.dcm", method="gradcam", compress="rle")
    with pytest.raises(ValueError, match="pixel_type 'float64'"):
        write_parametric_map(cam, info, tmp_path / "c.dcm", method="gradcam",
                             pixel_type="float64")
    assert list(tmp_path.glob("*.dcm")) == []


def test_source_pixel_data_is_not_read(tmp_path):
    """The loader keeps its headers with the pixel data deferred; the writer needs none of
    it (reading it kept every source slice in memory: 150 MB for a 300-slice CT)."""
    write_dicom_series(blob_volume((3, 32, 32)), tmp_path / "big", modality="CT")
    image, info = load_volume(tmp_path / "big")  # 2 KB slices: above the loader's defer size
    assert all(ds.get_item("PixelData", keep_deferred=True).value is None for ds in info.headers)
    cam = MetaTensor(torch.rand(1, *info.shape), affine=image.affine)
    write_parametric_map(cam, info, tmp_path / "pm.dcm", method="gradcam")
    for ds in info.headers:
        elem = ds.get_item("PixelData", keep_deferred=True)
        assert elem.value is None  # still deferred: never read


def test_same_maps_with_and_without_isal(tmp_path, series, monkeypatch):
    """ISA-L's deflate (pip isal, ~5x faster) where installed, zlib otherwise: the same
    values either way, read back by nibabel and pydicom."""
    import nibabel as nib

    from icam_med.io.writers import write_nifti

    cam, info = series
    outs = {}
    for name in ("default", "stdlib"):
        if name == "stdlib":
            monkeypatch.setitem(sys.modules, "isal", None)  # import fails
        nii = write_nifti(cam, tmp_path / f"{name}.nii.gz", reference=info)
        pm = write_parametric_map(cam, info, tmp_path / f"{name}.dcm", method="gradcam")
        outs[name] = (np.asarray(nib.load(nii).dataobj), _pixels(pm)[1])
    np.testing.assert_array_equal(outs["default"][0], cam[0].numpy())
    np.testing.assert_array_equal(outs["default"][0], outs["stdlib"][0])
    np.testing.assert_array_equal(outs["default"][1], outs["stdlib"][1])


def test_written_maps_hold_exactly_the_quantised_map_every_reader_sees(tmp_path):
    """The map on the scan's grid is quantised once, before anything reads it: the NIfTI
    map, the Parametric Map, the layer maps and the record's statistics all hold the same
    multiples of 2**-16, and a reader recomputing the peak from the file finds the
    record's."""
    import nibabel as nib
    from io_helpers import write_tiny_config

    from icam_med.cam.summary import map_statistics
    from icam_med.explain import explain_scan
    from icam_med.io.writers import quantise_map_

    write_dicom_series(blob_volume((10, 24, 20)), tmp_path / "s", spacing=(0.9, 0.7, 2.0),
                       origin=(-8, 3, 20), modality="CT")
    torch.manual_seed(0)
    ex, _ = explain_scan(tmp_path / "s", write_tiny_config(tmp_path), tmp_path / "out",
                         layer_maps=True)
    fused = ex.fused[0].numpy()
    assert fused.max() > 0 and np.all(np.mod(fused.astype(np.float64) / FLOAT_QUANTUM, 1) == 0)
    img = nib.load(tmp_path / "out" / "cam.nii.gz")
    on_disk = np.asarray(img.dataobj)
    assert on_disk.dtype == np.float32
    np.testing.assert_array_equal(on_disk, fused)
    for name in ex.layer_maps:
        layer = np.asarray(nib.load(next((tmp_path / "out").glob("*layer*.nii.gz"))).dataobj)
        assert np.all(np.mod(layer.astype(np.float64) / FLOAT_QUANTUM, 1) == 0), name
    _, pm = _pixels(next((tmp_path / "out").glob("*.dcm")))
    assert np.isclose(pm.max(), fused.max(), rtol=0, atol=0)
    recorded = ex.map_statistics()
    again = map_statistics(torch.from_numpy(on_disk)[None], img.affine)
    assert again.peak_voxel == recorded.peak_voxel and again.max == recorded.max
    # the rounding: half to even on the quantum, values clamped to [0, 1], in place
    t = torch.tensor([-0.2, FLOAT_QUANTUM / 2, 1.5 * FLOAT_QUANTUM, 0.3, 1.7])
    assert quantise_map_(t) is t
    expected = np.clip(np.rint(np.array([-0.2, 0.5, 1.5, 0.3 / FLOAT_QUANTUM, 1.7 / FLOAT_QUANTUM])
                               ) * FLOAT_QUANTUM, 0, 1).astype(np.float32)
    np.testing.assert_array_equal(t.numpy(), expected)
