"""NIfTI and DICOM Parametric Map writers: geometry, standards conformance, atomicity."""

from __future__ import annotations

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from io_helpers import (
    blob_volume,
    dciodvfy,
    dicomdir_series,
    listing,
    nibabel_file,
    pydicom_file,
    world_of,
)
from monai.data import MetaTensor

from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.io import atomic_write, load_volume
from icam_med.io.writers import CAM_QUANTITY_CODE, write_nifti, write_parametric_map


def ramp_map(shape) -> MetaTensor:
    """A map whose every voxel is distinct: value = flat index / size."""
    n = int(np.prod(shape))
    return torch.arange(n, dtype=torch.float32).reshape(1, *shape) / n


# -- NIfTI --------------------------------------------------------------------------------

def test_nifti_round_trip_on_a_dicom_grid(tmp_path):
    write_dicom_series(blob_volume((5, 9, 11)), tmp_path / "s", spacing=(0.8, 1.1, 3.0),
                       origin=(-10, 5, 40), modality="MR")
    image, info = load_volume(tmp_path / "s")
    cam = MetaTensor(ramp_map(info.shape), affine=image.affine)
    path = write_nifti(cam, tmp_path / "out" / "cam.nii.gz", reference=info)
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32 and img.shape == info.shape
    np.testing.assert_allclose(img.affine, info.affine, atol=1e-5)
    assert not np.allclose(img.affine, np.eye(4))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    np.testing.assert_array_equal(np.asarray(img.dataobj), cam[0].numpy())
    # It re-loads through icam-med onto exactly the scan's grid.
    back, _ = load_volume(path)
    np.testing.assert_allclose(np.asarray(back.affine), np.asarray(image.affine), atol=1e-5)
    np.testing.assert_array_equal(back.numpy(), cam.numpy())



def test_nifti_source_codes_are_copied(tmp_path):
    path_in = nibabel_file("example4d.nii.gz")
    image, info = load_volume(path_in, volume_index=0)
    src = nib.load(path_in)
    out = write_nifti(MetaTensor(ramp_map(info.shape), affine=image.affine),
                      tmp_path / "m.nii", reference=info)
    img = nib.load(out)
    assert int(img.header["sform_code"]) == int(src.header["sform_code"])
    assert int(img.header["qform_code"]) == int(src.header["qform_code"])
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-4)


def test_nifti_refuses_missing_affine_wrong_grid_and_overwrite(tmp_path):
    image, info = load_volume(nibabel_file("anatomical.nii"))
    with pytest.raises(ValueError, match="never written with an assumed identity affine"):
        write_nifti(np.zeros(info.shape, np.float32), tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match="not on the source grid"):
        write_nifti(MetaTensor(torch.zeros(1, 4, 4, 4), affine=image.affine),
                    tmp_path / "b.nii.gz", reference=info)
    good = MetaTensor(ramp_map(info.shape), affine=image.affine)
    write_nifti(good, tmp_path / "c.nii.gz", reference=info)
    before = (tmp_path / "c.nii.gz").read_bytes()
    with pytest.raises(FileExistsError, match=r"c\.nii\.gz already exists.*--overwrite"):
        write_nifti(good * 0.5, tmp_path / "c.nii.gz", reference=info)
    assert (tmp_path / "c.nii.gz").read_bytes() == before
    write_nifti(good * 0.5, tmp_path / "c.nii.gz", reference=info, overwrite=True)
    assert (tmp_path / "c.nii.gz").read_bytes() != before
    assert sorted(listing(tmp_path)) == ["c.nii.gz"]


def test_interrupted_atomic_write_leaves_nothing(tmp_path):
    target = tmp_path / "map.nii.gz"
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as fh:
        fh.write(b"half a file")
        raise KeyboardInterrupt
    assert listing(tmp_path) == []  # neither the target nor a temporary file


# -- DICOM Parametric Map ---------------------------------------------------------------------

def _frames_by_position(pm, pixels=None) -> dict[tuple, np.ndarray]:
    pixels = pm.pixel_array if pixels is None else pixels
    pixels = pixels if pixels.ndim == 3 else pixels[None]
    out = {}
    for k, fg in enumerate(pm.PerFrameFunctionalGroupsSequence):
        pos = tuple(round(float(v), 3) for v in fg.PlanePositionSequence[0].ImagePositionPatient)
        out[pos] = pixels[k]
    return out


def real_frames(pm) -> np.ndarray:
    """Every frame's real-world values, through highdicom's own Real World Value Mapping
    (float pixel data, mapped 1:1, as stored: highdicom 0.28 reads no stored float frame)."""
    if "FloatPixelData" in pm:
        rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert (rwvm.RealWorldValueSlope, rwvm.RealWorldValueIntercept) == (1, 0)
        return pm.pixel_array if pm.pixel_array.ndim == 3 else pm.pixel_array[None]
    return np.stack([pm.get_frame(j + 1, dtype=np.float64, apply_real_world_transform=True)
                     for j in range(int(pm.NumberOfFrames))])


def check_parametric_map(tmp_path, scan, pixel_type="uint16", compress="deflate"):
    image, info = load_volume(scan)
    cam = MetaTensor(ramp_map(info.shape), affine=image.affine)
    path = write_parametric_map(cam, info, tmp_path / "pm" / "cam_pm.dcm", method="integrative",
                                parameters={"alpha_fn": "exp", "bias_weight": 1.0},
                                target_label="present", pixel_type=pixel_type,
                                compress=compress)
    errors, _warnings = dciodvfy(path)
    assert errors == [], errors
    raw = path.read_bytes()
    assert raw[:128] == b"\x00" * 128 and raw[128:132] == b"DICM"

    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_instance_uid
    referenced = {item.ReferencedSOPInstanceUID
                  for item in pm.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(info.sop_instance_uids)
    assert pm.StudyInstanceUID == info.study_instance_uid
    assert pm.FrameOfReferenceUID == info.frame_of_reference_uid
    new_uids = {pm.SOPInstanceUID, pm.SeriesInstanceUID}
    assert not new_uids & ({info.series_instance_uid} | set(info.sop_instance_uids))
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    if pixel_type == "float32":
        assert "FloatPixelData" in pm and pm.BitsAllocated == 32
    else:  # integer pixels, their meaning in the RWVM: 0..65535 -> 0..1
        assert "PixelData" in pm and pm.BitsAllocated == 16 and pm.PixelRepresentation == 0
        assert (rwvm.RealWorldValueFirstValueMapped, rwvm.RealWorldValueLastValueMapped) == (
            0, 65535)
        assert rwvm.RealWorldValueSlope == pytest.approx(1 / 65535)
        assert rwvm.RealWorldValueIntercept == 0
    quantity = rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0]
    assert (quantity.CodeValue, quantity.CodingSchemeDesignator,
            quantity.CodeMeaning) == CAM_QUANTITY_CODE
    processing = [e for e in pm.ContributingEquipmentSequence
                  if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # processing
                  and e.Manufacturer == "icam-med"]
    assert len(processing) == 1
    equipment = processing[0]
    assert equipment.Manufacturer == "icam-med" and equipment.SoftwareVersions
    assert "integrative" in equipment.ContributionDescription
    assert '"alpha_fn":"exp"' in equipment.ContributionDescription
    # Values: every frame sits at its source slice's position and holds that slice's map
    # (exactly as uncompressed float32; exactly its multiple of 2**-16 nearest, deflated;
    # within the stated quantisation 1/65535 as uint16 + RWVM).
    frames = _frames_by_position(pm, real_frames(pm))
    for k, ds in enumerate(info.source_datasets()):
        pos = tuple(round(float(v), 3) for v in ds.ImagePositionPatient)
        truth = cam[0, :, :, k].numpy().T
        if pixel_type == "float32" and compress == "none":
            np.testing.assert_array_equal(frames[pos], truth)
        elif pixel_type == "float32":
            np.testing.assert_array_equal(frames[pos], np.round(truth * 65536.0) / 65536.0)
            assert np.abs(frames[pos] - truth).max() <= 2.0**-17
        else:
            np.testing.assert_allclose(frames[pos], truth, rtol=0, atol=1 / 65535)
    return pm


@pytest.mark.parametrize(("pixel_type", "compress"), [("uint16", "none"), ("uint16", "deflate"),
                                                      ("float32", "none"), ("float32", "deflate")])
def test_parametric_map_on_written_series(tmp_path, pixel_type, compress):
    write_dicom_series(blob_volume((4, 6, 7)), tmp_path / "s", spacing=(0.8, 1.1, 3.0),
                       origin=(-10, 5, 40), modality="CT", patient_name="Doe^Jane")
    pm = check_parametric_map(tmp_path, tmp_path / "s", pixel_type, compress)
    assert str(pm.PatientName) == "Doe^Jane"  # same patient as its source, as DICOM requires


def test_parametric_map_on_real_ct_series(tmp_path):
    check_parametric_map(tmp_path, dicomdir_series("98892001/CT5N"))


def test_parametric_map_on_real_single_ct_file(tmp_path):
    check_parametric_map(tmp_path, pydicom_file("CT_small.dcm"))


def test_parametric_map_refuses_nifti_and_wrong_grid(tmp_path):
    image, info = load_volume(nibabel_file("anatomical.nii"))
    with pytest.raises(ValueError, match="needs a DICOM source"):
        write_parametric_map(image, info, tmp_path / "x.dcm", method="gradcam")
    write_dicom_series(blob_volume((3, 4, 5)), tmp_path / "s")
    image, info = load_volume(tmp_path / "s")
    with pytest.raises(ValueError, match="not on the source grid"):
        write_parametric_map(torch.zeros(1, 2, 2, 2), info, tmp_path / "y.dcm", method="gradcam")
    assert listing(tmp_path / "pm") == []


def test_atomic_write_gives_ordinary_file_permissions(tmp_path):
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    with atomic_write(tmp_path / "x.bin") as fh:
        fh.write(b"data")
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o666 & ~mask


def test_parametric_map_on_real_enhanced_multiframe_ct(tmp_path):
    path = pydicom_file("eCT_Supplemental.dcm")
    image, info = load_volume(path)
    cam = MetaTensor(ramp_map(info.shape), affine=image.affine)
    out = write_parametric_map(cam, info, tmp_path / "pm.dcm", method="gradcam")
    assert dciodvfy(out)[0] == []
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(out))
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_instance_uid
    frames = _frames_by_position(pm, real_frames(pm))
    src = pydicom.dcmread(path, stop_before_pixels=True)
    source_positions = {tuple(round(float(v), 3) for v in fg.PlanePositionSequence[0]
                              .ImagePositionPatient)
                        for fg in src.PerFrameFunctionalGroupsSequence}
    assert set(frames) == source_positions
    for k in range(info.shape[2]):  # each map slice at the world position of its voxels
        pos = tuple(round(float(v), 3) for v in world_of(image.affine, (0, 0, k)) * [-1, -1, 1])
        np.testing.assert_allclose(frames[pos], cam[0, :, :, k].numpy().T, rtol=0,
                                   atol=1 / 65535)
    assert not np.array_equal(cam[0, :, :, 0].numpy(), cam[0, :, :, 1].numpy())


def test_parametric_map_jpeg_ls_lossless(tmp_path):
    """compress=True: JPEG-LS lossless uint16 frames, dciodvfy clean, the same values through
    pydicom and highdicom, and smaller than the uncompressed map."""
    write_dicom_series(blob_volume((6, 32, 30)), tmp_path / "s", spacing=(0.8, 1.1, 3.0),
                       origin=(-10, 5, 40), modality="CT")
    image, info = load_volume(tmp_path / "s")
    zz, yy, xx = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in info.shape], indexing="ij")
    smooth = torch.exp(-(zz**2 + yy**2 + xx**2) * 2.0)[None]
    cam = MetaTensor(smooth, affine=image.affine)
    plain = write_parametric_map(cam, info, tmp_path / "plain.dcm", method="gradcam",
                                 pixel_type="uint16", compress="none")
    packed = write_parametric_map(cam, info, tmp_path / "packed.dcm", method="gradcam",
                                  pixel_type="uint16", compress=True)
    assert dciodvfy(packed)[0] == []
    ds = pydicom.dcmread(packed)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    np.testing.assert_array_equal(ds.pixel_array, pydicom.dcmread(plain).pixel_array)
    frames = _frames_by_position(ds, real_frames(hd.pm.ParametricMap.from_dataset(ds)))
    for k, src in enumerate(info.source_datasets()):
        pos = tuple(round(float(v), 3) for v in src.ImagePositionPatient)
        np.testing.assert_allclose(frames[pos], smooth[0, :, :, k].numpy().T, rtol=0,
                                   atol=1 / 65535)
    assert packed.stat().st_size < plain.stat().st_size
    with pytest.raises(ValueError, match="needs pixel_type='uint16'"):
        write_parametric_map(cam, info, tmp_path / "f.dcm", method="gradcam",
                             pixel_type="float32", compress=True)
