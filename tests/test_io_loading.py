"""Loading scans: DICOM series written from a known volume, real DICOM and NIfTI test data."""

from __future__ import annotations

import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import (
    blob_volume,
    dciodvfy,
    dicomdir_series,
    nibabel_file,
    pydicom_file,
    world_of,
)

from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import load_volume
from icam_med.io.reader import SimpleITKDICOMReader

# An oblique, anisotropic geometry (LPS direction columns: column axis, row axis, slices).
_t = np.deg2rad(20)
OBLIQUE = np.array([[np.cos(_t), 0.0, np.sin(_t)],
                    [0.0, 1.0, 0.0],
                    [-np.sin(_t), 0.0, np.cos(_t)]])


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_written_series_is_valid_dicom(tmp_path, modality):
    vol = blob_volume((3, 8, 9))
    files = write_dicom_series(vol, tmp_path / "s", spacing=(0.7, 0.9, 2.5),
                               origin=(-20.0, 30.0, 5.0), modality=modality,
                               PatientName="Doe^Jane", InstitutionName="General Hospital")
    assert [f.name for f in files] == ["IM00001.dcm", "IM00002.dcm", "IM00003.dcm"]
    errors, _ = dciodvfy(files[1])
    assert errors == []
    ds = pydicom.dcmread(files[1])
    assert ds.SOPClassUID == {"CT": "1.2.840.10008.5.1.4.1.1.2",
                              "MR": "1.2.840.10008.5.1.4.1.1.4"}[modality]
    assert str(ds.PatientName) == "Doe^Jane" and ds.InstitutionName == "General Hospital"
    assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.7]  # row \ column spacing
    assert [float(v) for v in ds.ImagePositionPatient] == [-20.0, 30.0, 7.5]
    assert float(ds.SliceThickness) == 2.5
    np.testing.assert_array_equal(ds.pixel_array, vol[1])
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    assert len(uids) == 3  # one SOP instance per file


def test_float_volume_is_quantised_within_half_a_step(tmp_path):
    vol = np.random.default_rng(0).normal(0.3, 0.1, (2, 5, 6))
    write_dicom_series(vol, tmp_path / "s", modality="CT")
    image, _ = load_volume(tmp_path / "s")
    got = image[0].numpy().transpose(2, 1, 0)
    step = (vol.max() - vol.min()) / 32767
    assert np.abs(got - vol).max() <= step  # float32 + rescale rounding


def test_refuses_to_overwrite_a_series(tmp_path):
    write_dicom_series(np.zeros((2, 4, 4)), tmp_path / "s")
    with pytest.raises(FileExistsError, match=r"IM00001\.dcm"):
        write_dicom_series(np.zeros((2, 4, 4)), tmp_path / "s")


def test_dicom_and_nifti_round_trip_to_same_array_spacing_and_positions(tmp_path):
    vol = blob_volume((10, 12, 14))
    write_dicom_series(vol, tmp_path / "series", spacing=(0.8, 1.2, 2.5),
                       origin=(-40.0, 12.0, 60.0), direction=OBLIQUE, modality="MR")
    dcm, dinfo = load_volume(tmp_path / "series")
    # The same volume as NIfTI, from the DICOM's own geometry.
    nib.save(nib.Nifti1Image(vol.transpose(2, 1, 0).astype(np.float32),
                             np.asarray(dcm.affine)), tmp_path / "v.nii.gz")
    nii, ninfo = load_volume(tmp_path / "v.nii.gz")
    assert dinfo.format == "dicom" and ninfo.format == "nifti"
    assert dcm.shape == nii.shape == (1, 14, 12, 10)
    np.testing.assert_array_equal(dcm[0].numpy(), nii[0].numpy())
    np.testing.assert_allclose(dinfo.spacing, (0.8, 1.2, 2.5), atol=1e-6)
    np.testing.assert_allclose(ninfo.spacing, dinfo.spacing, atol=1e-5)
    np.testing.assert_allclose(np.asarray(nii.affine), np.asarray(dcm.affine), atol=1e-4)
    # Physical positions: every slice's first voxel is where the DICOM file says it is.
    for k, f in enumerate(dinfo.source_files):
        ipp_lps = np.array([float(v) for v in pydicom.dcmread(f).ImagePositionPatient])
        ras = world_of(dcm.affine, (0, 0, k))
        np.testing.assert_allclose(ras, ipp_lps * [-1, -1, 1], atol=1e-3)
    # And the blob is at the same world point in both.
    assert dinfo.orientation == ninfo.orientation


def test_shuffled_file_names_load_in_slice_order(tmp_path):
    vol = blob_volume((8, 6, 7), centre_zyx=(5, 3, 3))
    files = write_dicom_series(vol, tmp_path / "ordered", spacing=(1, 1, 2))
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    names = [f"X{random.Random(1).randint(0, 10**6)}_{i}" for i in range(len(files))]
    random.Random(3).shuffle(names)
    for f, n in zip(files, names, strict=True):
        shutil.copy(f, shuffled / n)
    a, ainfo = load_volume(tmp_path / "ordered")
    b, binfo = load_volume(shuffled)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(np.asarray(a.affine), np.asarray(b.affine))
    np.testing.assert_array_equal(b[0].numpy().transpose(2, 1, 0), vol)
    assert binfo.sop_instance_uids == ainfo.sop_instance_uids  # same slice order


def test_real_ct_series_from_pydicom():
    image, info = load_volume(dicomdir_series("98892001/CT5N"))
    assert info.format == "dicom" and info.modality == "CT"
    assert image.shape == (1, 16, 16, 5)
    np.testing.assert_allclose(info.spacing, (0.488281, 0.488281, 2.5), atol=1e-5)
    assert info.orientation == "LPS"
    assert len(info.sop_instance_uids) == 5 and info.series_instance_uid
    assert all(c.status == "passed" for c in info.checks if c.name != "non_dicom_files")
    # The reader's array equals pydicom's decoding (with rescale) slice by slice.
    for k, ds in enumerate(info.source_datasets(with_pixels=True)):
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(image[0, :, :, k].numpy().T, expected)


def test_single_dicom_file_ct_small():
    image, _ = load_volume(pydicom_file("CT_small.dcm"))
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert image.shape == (1, 128, 128, 1)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(world_of(image.affine, (0, 0, 0)), ipp * [-1, -1, 1], atol=1e-4)


def test_enhanced_multiframe_mr_without_positions_is_a_recorded_warning():
    image, info = load_volume(pydicom_file("emri_small.dcm"))
    assert image.shape == (1, 64, 64, 10)
    assert any(w.startswith("scanner_position") for w in info.warnings)


def test_nifti_anatomical_keeps_its_affine():
    path = nibabel_file("anatomical.nii")
    image, info = load_volume(path)
    ref = nib.load(path)
    assert image.shape == (1, *ref.shape)
    np.testing.assert_allclose(np.asarray(image.affine), ref.affine, atol=1e-5)
    np.testing.assert_array_equal(image[0].numpy(), ref.get_fdata().astype(np.float32))
    assert info.modality is None and info.orientation == "".join(nib.aff2axcodes(ref.affine))


def test_nifti_4d_with_volume_index():
    path = nibabel_file("example4d.nii.gz")
    image, info = load_volume(path, volume_index=1)
    ref = nib.load(path)
    assert image.shape == (1, *ref.shape[:3]) and info.n_volumes == 2
    np.testing.assert_allclose(np.asarray(image.affine), ref.affine, atol=1e-5)
    np.testing.assert_allclose(image[0].numpy(), ref.get_fdata()[..., 1], rtol=1e-6)


def test_reader_is_usable_by_monai_loadimage(tmp_path):
    from monai.transforms import LoadImage

    write_dicom_series(blob_volume((4, 5, 6)), tmp_path / "s", spacing=(1, 1, 3))
    img = LoadImage(reader="SimpleITKDICOMReader", image_only=True)(str(tmp_path / "s"))
    assert tuple(img.shape) == (6, 5, 4)
    assert SimpleITKDICOMReader().verify_suffix(str(tmp_path / "s"))
    assert not SimpleITKDICOMReader().verify_suffix(str(nibabel_file("anatomical.nii")))


def test_scan_info_dict_has_no_identifiers_by_default(tmp_path):
    write_dicom_series(blob_volume((3, 4, 5)), tmp_path / "s", patient_name="Doe^John",
                       patient_id="MRN-123456")
    _, info = load_volume(tmp_path / "s")
    text = repr(info.to_dict())
    assert info.series_instance_uid not in text and "Doe" not in text and str(tmp_path) not in text
    full = info.to_dict(include_identifiers=True)
    assert full["series_instance_uid"] == info.series_instance_uid


def test_enhanced_multiframe_ct_with_per_frame_positions():
    path = pydicom_file("eCT_Supplemental.dcm")
    image, info = load_volume(path)
    ds = pydicom.dcmread(path)
    assert image.shape == (1, 512, 512, 2) and not info.warnings
    # Slices are in spatial order along the normal (row x column = -z here, so the file's
    # second frame comes first); each loaded slice sits at its frame's position and holds
    # that frame's pixels with the functional groups' rescale (intercept -1024) applied.
    ipps = [np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
            for fg in ds.PerFrameFunctionalGroupsSequence]
    loaded = image[0].numpy().transpose(2, 1, 0)
    matched = set()
    for k in range(2):
        world_lps = world_of(image.affine, (0, 0, k)) * [-1, -1, 1]
        frame = next(i for i, ipp in enumerate(ipps) if np.allclose(ipp, world_lps, atol=1e-3))
        np.testing.assert_array_equal(loaded[k], ds.pixel_array[frame].astype(np.float32) - 1024)
        matched.add(frame)
    assert matched == {0, 1}
    normal = np.array([0.0, 0.0, -1.0])  # cross(row (-1, 0, 0), column (0, 1, 0))
    assert [float(world_of(image.affine, (0, 0, k)) * [-1, -1, 1] @ normal) for k in (0, 1)] \
        == sorted(float(ipp @ normal) for ipp in ipps)
