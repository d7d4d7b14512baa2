"""Every bad input is refused before any model runs, with a clear error and nothing written."""

from __future__ import annotations

import gzip
import os
import re
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from io_helpers import blob_volume, dicomdir_series, listing, nibabel_file, write_tiny_config
from pydicom.uid import generate_uid

from icam_med.cli import main as cli_main
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.explain import explain_scan, prepare
from icam_med.io import GeometryError, list_series, load_volume


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare(write_tiny_config(tmp_path_factory.mktemp("cfg")))


def assert_refused(scan, prepared, out, *patterns, exc=GeometryError, **kwargs):
    """explain_scan raises `exc` whose message matches every pattern; `out` stays empty."""
    with pytest.raises(exc) as info:
        explain_scan(scan, prepared, out, **kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
    assert listing(out) == [], f"output written despite the error: {listing(out)}"
    return message


def series(tmp_path, name="s", n=6, **kwargs):
    kwargs.setdefault("spacing", (1.0, 1.0, 2.0))
    return write_dicom_series(blob_volume((n, 10, 12), centre_zyx=(n // 2, 5, 6)),
                              tmp_path / name, **kwargs)


def edit(path, **tags):
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path, enforce_file_format=True)


# -- several series -----------------------------------------------------------------------

def test_two_series_in_one_folder_are_listed_and_selectable(tmp_path, prepared):
    series(tmp_path, "both", n=4, series_description="T1 axial", filename_prefix="A")
    series(tmp_path, "both", n=7, series_description="T2 axial", filename_prefix="B",
           series_number=2)
    msg = assert_refused(tmp_path / "both", prepared, tmp_path / "out",
                         r"both: holds 2 DICOM series", r"--series-uid",
                         r"4 file\(s\)\s+T1 axial", r"7 file\(s\)\s+T2 axial")
    listed = {s.description: s for s in list_series(tmp_path / "both")}
    assert listed["T2 axial"].series_uid in msg and listed["T2 axial"].n_files == 7
    image, info = load_volume(tmp_path / "both", series_uid=listed["T2 axial"].series_uid)
    assert image.shape[-1] == 7 and info.series_description == "T2 axial"


def test_real_folder_with_several_series(tmp_path, prepared):
    assert_refused(dicomdir_series("98892003/MR2"), prepared, tmp_path / "out",
                   r"holds 3 DICOM series", r"FAST LOCALIZER")


# -- geometry of one series -----------------------------------------------------------------

def test_mixed_orientation(tmp_path, prepared):
    files = series(tmp_path)
    edit(files[2], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", re.escape(str(files[2])),
                   r"mixed orientations")


def test_real_series_with_mixed_orientation(tmp_path, prepared):
    assert_refused(dicomdir_series("98892003/MR700"), prepared, tmp_path / "out",
                   r"MR700/\d+", r"mixed orientations")


def test_mixed_frame_of_reference(tmp_path, prepared):
    files = series(tmp_path)
    edit(files[4], FrameOfReferenceUID=generate_uid())
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", re.escape(str(files[4])),
                   r"different Frame of Reference")


def test_missing_slice(tmp_path, prepared):
    files = series(tmp_path, n=8)
    files[3].unlink()
    assert_refused(tmp_path / "s", prepared, tmp_path / "out",
                   r"1 missing slice\(s\) between IM00003\.dcm and IM00005\.dcm",
                   r"allow_irregular_slices")


def test_real_series_with_missing_slices(tmp_path, prepared):
    assert_refused(dicomdir_series("77654033/CT2"), prepared, tmp_path / "out",
                   r"CT2: \d+ missing slice")


def test_non_uniform_spacing_strict_by_default_tolerance_configurable(tmp_path, prepared):
    files = series(tmp_path, n=6)
    ipp = [float(v) for v in pydicom.dcmread(files[2]).ImagePositionPatient]
    edit(files[2], ImagePositionPatient=[ipp[0], ipp[1], ipp[2] + 0.3])
    assert_refused(tmp_path / "s", prepared, tmp_path / "out",
                   r"non-uniform slice spacing: 2\.300 mm between IM00002\.dcm and IM00003\.dcm")
    # A tolerance of 0.5 mm accepts it; opting in to irregular slices records a warning.
    _, info = load_volume(tmp_path / "s", geometry={"slice_tolerance": 0.5})
    assert not info.warnings
    _, info = load_volume(tmp_path / "s", geometry={"allow_irregular_slices": True})
    assert any(w.startswith("slice_spacing: non-uniform") for w in info.warnings)


def test_duplicate_slice_positions(tmp_path, prepared):
    files = series(tmp_path)
    dup = tmp_path / "s" / "IM99999.dcm"
    shutil.copy(files[3], dup)
    edit(dup, SOPInstanceUID=generate_uid())
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", r"same slice position",
                   r"IM0000[4]\.dcm|IM99999\.dcm", r"duplicate")


def test_gantry_tilt_refused_or_accepted_with_warning(tmp_path, prepared):
    t = np.deg2rad(12.0)
    tilted = np.array([[1, 0, 0], [0, 1, np.sin(t)], [0, 0, np.cos(t)]], dtype=float)
    series(tmp_path, direction=tilted, modality="CT")
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", r"12\.00 degrees",
                   r"gantry tilt")
    _, info = load_volume(tmp_path / "s", geometry={"allow_gantry_tilt": True})
    assert any(w.startswith("gantry_tilt") for w in info.warnings)


def test_gantry_tilt_tag_alone_is_refused(tmp_path, prepared):
    files = series(tmp_path, modality="CT")
    for f in files:
        edit(f, GantryDetectorTilt=15)
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", r"gantry tilt", r"15\.00")


def test_image_without_position_is_a_2d_image_refused_by_a_3d_pipeline(tmp_path, prepared):
    # A single CR without Image Position/Orientation is a radiograph (issue 13: it takes
    # the 2-D path); a 3-D config on it is refused before any output, naming the file and
    # the fix, not with a MONAI traceback.
    assert_refused(dicomdir_series("77654033/CR1"), prepared, tmp_path / "out",
                   r"77654033/CR1", r"is a 2-D image", r"2-D model and 2-D transforms",
                   exc=ValueError)


# -- files ----------------------------------------------------------------------------------

def test_truncated_dicom_file_in_series(tmp_path, prepared):
    files = series(tmp_path)
    data = files[1].read_bytes()
    files[1].write_bytes(data[: len(data) - 50])
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", re.escape(str(files[1])),
                   r"truncated")


def test_truncated_header(tmp_path, prepared):
    files = series(tmp_path)
    files[0].write_bytes(files[0].read_bytes()[:300])
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", re.escape(str(files[0])),
                   r"truncated|corrupt")


def test_non_dicom_file_in_series_folder(tmp_path, prepared):
    series(tmp_path)
    (tmp_path / "s" / "notes.txt").write_text("scanned on Tuesday\n")
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", r"notes\.txt",
                   r"not a DICOM file", r"ignore_non_dicom")
    _, info = load_volume(tmp_path / "s", geometry={"ignore_non_dicom": True})
    assert any(w.startswith("non_dicom_files") for w in info.warnings)


def test_unsupported_file_type(tmp_path, prepared):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    assert_refused(path, prepared, tmp_path / "out", r"scan\.png",
                   r"neither a DICOM file .* nor a NIfTI file")


def test_empty_folder(tmp_path, prepared):
    (tmp_path / "empty").mkdir()
    assert_refused(tmp_path / "empty", prepared, tmp_path / "out", r"empty", r"no files")


def test_missing_path(tmp_path, prepared):
    assert_refused(tmp_path / "nowhere", prepared, tmp_path / "out", r"nowhere",
                   r"does not exist", exc=FileNotFoundError)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_unreadable_path(tmp_path, prepared):
    files = series(tmp_path)
    files[0].chmod(0)
    assert_refused(tmp_path / "s", prepared, tmp_path / "out", r"permission denied",
                   exc=PermissionError)


# -- NIfTI -------------------------------------------------------------------------------------

def test_4d_nifti_needs_a_volume_index(tmp_path, prepared):
    path = nibabel_file("example4d.nii.gz")
    assert_refused(path, prepared, tmp_path / "out", r"example4d\.nii\.gz",
                   r"4-D with 2 volumes", r"--volume-index")
    assert_refused(path, prepared, tmp_path / "out", r"volume_index 5 is out of range",
                   volume_index=5)


def test_nan_and_inf_voxels(tmp_path, prepared):
    data = np.ones((8, 8, 8), np.float32)
    data[2, 3, 4], data[5, 5, 5] = np.nan, np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    assert_refused(path, prepared, tmp_path / "out", r"nan\.nii\.gz", r"2 voxel\(s\) are NaN or Inf")
    image, info = load_volume(path, geometry={"allow_nonfinite": True})
    assert np.isfinite(image.numpy()).all() and float(image[0, 2, 3, 4]) == 0.0
    assert any(w.startswith("finite_values") for w in info.warnings)


def test_voxel_limit_is_checked_from_the_header(tmp_path, prepared):
    # The header promises 300^3 voxels but the data are garbage: the limit must fire
    # before any decoding is attempted.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((300, 300, 300))
    hdr.set_data_dtype(np.float32)
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\0" * 4 + b"garbage"))
    cfg = write_tiny_config(tmp_path, geometry={"max_voxels": 10_000_000})
    assert_refused(path, prepare(cfg), tmp_path / "out", r"huge\.nii\.gz",
                   r"27,000,000 voxels, more than the limit of 10,000,000")


def test_voxel_limit_for_dicom(tmp_path):
    series(tmp_path, n=6)
    with pytest.raises(GeometryError, match=r"720 voxels, more than the limit of 500"):
        load_volume(tmp_path / "s", geometry={"max_voxels": 500})


def test_truncated_nifti(tmp_path, prepared):
    src = nibabel_file("anatomical.nii")
    path = tmp_path / "cut.nii"
    path.write_bytes(src.read_bytes()[:5000])
    assert_refused(path, prepared, tmp_path / "out", r"cut\.nii", r"truncated")


def test_corrupt_nifti_gz(tmp_path, prepared):
    src = nibabel_file("example4d.nii.gz")
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(src.read_bytes()[:2000])
    assert_refused(path, prepared, tmp_path / "out", r"cut\.nii\.gz",
                   r"truncated|corrupt|cannot be read", volume_index=0)


def test_unknown_geometry_option_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['slice_tolerence'\]"):
        load_volume(nibabel_file("anatomical.nii"), geometry={"slice_tolerence": 1})


def test_cli_reports_the_error_without_traceback(tmp_path, capsys):
    files = series(tmp_path)
    files[3].unlink()
    cfg = write_tiny_config(tmp_path)
    rc = cli_main(["explain", str(tmp_path / "s"), "--config", str(cfg), "--out",
                   str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and "missing slice" in err and "Traceback" not in err
    assert listing(tmp_path / "out") == []
