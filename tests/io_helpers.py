"""Helpers for the I/O tests: known volumes, real test-data paths, tiny configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest


def pydicom_file(name: str) -> Path:
    """A file shipped with pydicom (or pydicom-data), found offline."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def dicomdir_series(sub: str) -> Path:
    """A folder under pydicom's dicomdirtests (real DICOM written by others)."""
    return pydicom_file("CT_small.dcm").parent / "dicomdirtests" / sub


def nibabel_file(name: str) -> Path:
    import nibabel

    path = Path(nibabel.__file__).parent / "tests" / "data" / name
    if not path.is_file():
        pytest.skip(f"nibabel test file {name} not installed")
    return path


def blob_volume(shape_zyx=(12, 14, 16), centre_zyx=(6, 5, 11), sigma=1.5, background=10.0,
                peak=1000.0) -> np.ndarray:
    """A smooth blob on a constant background: an integer-valued (z, y, x) volume."""
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij")
    d2 = (z - centre_zyx[0]) ** 2 + (y - centre_zyx[1]) ** 2 + (x - centre_zyx[2]) ** 2
    return np.rint(background + peak * np.exp(-d2 / (2 * sigma**2))).astype(np.int16)


def world_of(affine, index) -> np.ndarray:
    return (np.asarray(affine, dtype=float) @ np.r_[np.asarray(index, dtype=float), 1.0])[:3]


def peak_index(array) -> tuple[int, ...]:
    a = np.asarray(array)
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(a)), a.shape))


TINY_MODEL = {
    "name": "tiny-classifier",
    "architecture": "Classifier",
    "args": {"in_shape": [1, 16, 16, 16], "classes": 2, "channels": [4, 8], "strides": [2, 2]},
    "labels": ["absent", "present"],
    "input": {"channels": 1, "spatial_size": [16, 16, 16]},
}

TINY_PREPROCESSING = [
    {"name": "Orientationd", "axcodes": "RAS"},
    {"name": "Spacingd", "pixdim": [2.0, 2.0, 2.0], "mode": "bilinear"},
    {"name": "ResizeWithPadOrCropd", "spatial_size": [16, 16, 16]},
    {"name": "NormalizeIntensityd"},
]


def write_tiny_config(folder: Path, *, weights: Path | None = None, geometry: dict | None = None,
                      name: str = "tiny.yaml") -> Path:
    """A config with a tiny MONAI Classifier (random weights unless ``weights``)."""
    import yaml

    model = dict(TINY_MODEL)
    if weights is not None:
        model["weights"] = str(weights)
    data = {"model": model, "preprocessing": TINY_PREPROCESSING,
            "method": {"name": "integrative"}}
    if geometry:
        data["geometry"] = geometry
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' dciodvfy; returns (errors, warnings). Skips if it is not installed."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed; run "
                    "scripts/install_system_deps.sh")
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([exe, str(_inflated(Path(path), Path(tmp)))], capture_output=True,
                              text=True, timeout=60, env={**os.environ, "LC_ALL": "C"})
    lines = (proc.stdout + proc.stderr).splitlines()
    return ([ln for ln in lines if ln.startswith("Error")],
            [ln for ln in lines if ln.startswith("Warning")])


def _inflated(path: Path, folder: Path) -> Path:
    """A Deflated Explicit VR Little Endian file as the same dataset, inflated into
    ``folder`` (dciodvfy reads no deflated file: "Tag read failed"); any other file as is."""
    meta = pydicom.filereader.read_file_meta_info(path)
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return path
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    out = folder / path.name
    ds.save_as(out, enforce_file_format=True)
    return out


def listing(folder: Path) -> list[str]:
    """Every entry under ``folder`` (hidden ones too), or [] when it does not exist."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


def write_multiframe_ct(volume_kji: np.ndarray, path: Path, *, spacing=(0.4, 0.5, 10.0),
                        origin_lps=(99.5, -301.5, -159.0), frame_order=None,
                        slopes=None) -> Path:
    """An Enhanced CT multi-frame file built on pydicom's real eCT_Supplemental.dcm header.

    Args:
        volume_kji: ``(slices, rows, columns)`` real values (Hounsfield units), slice ``k``
            at ``origin + k * spacing[2]`` along the image-plane normal.
        spacing: ``(column, row, slice)`` spacing in mm.
        origin_lps: position of slice 0's first pixel.
        frame_order: the slice stored as frame ``i`` is ``frame_order[i]`` (default: in order).
        slopes: per-frame Rescale Slope (default: 1 everywhere); intercept is -1024.

    Returns:
        ``path``. Stored values are ``round((value + 1024) / slope)`` as unsigned 16-bit.
    """
    import copy

    import pydicom
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(pydicom_file("eCT_Supplemental.dcm"))
    vol = np.asarray(volume_kji, dtype=np.float64)
    n, rows, cols = vol.shape
    order = list(frame_order) if frame_order is not None else list(range(n))
    slopes = list(slopes) if slopes is not None else [1.0] * n
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, n
    shared = ds.SharedFunctionalGroupsSequence[0]
    shared.PixelMeasuresSequence[0].PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[0]:.6g}"]
    shared.PixelMeasuresSequence[0].SliceThickness = f"{spacing[2]:.6g}"
    iop = np.array([float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    if "PixelValueTransformationSequence" in shared:
        del shared.PixelValueTransformationSequence
    item0 = template.PerFrameFunctionalGroupsSequence[0]
    frames, stored_frames = [], []
    for i, k in enumerate(order):
        fg = copy.deepcopy(item0)
        pos = np.asarray(origin_lps, dtype=np.float64) + k * spacing[2] * normal
        fg.PlanePositionSequence[0].ImagePositionPatient = [f"{v:.6f}" for v in pos]
        fg.FrameContentSequence[0].InStackPositionNumber = k + 1
        fg.FrameContentSequence[0].DimensionIndexValues = [1, k + 1]
        pvt = pydicom.Dataset()
        pvt.RescaleIntercept, pvt.RescaleSlope, pvt.RescaleType = "-1024", f"{slopes[i]:.6g}", "HU"
        fg.PixelValueTransformationSequence = [pvt]
        frames.append(fg)
        stored = np.rint((vol[k] + 1024) / float(f"{slopes[i]:.6g}"))
        stored_frames.append(np.clip(stored, 0, 65535).astype("<u2"))
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack(stored_frames).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def edit_series(folder: Path, edit) -> None:
    """Apply ``edit(ds, index)`` to every file of a series folder (sorted names) and save."""
    import pydicom

    for k, f in enumerate(sorted(Path(folder).iterdir())):
        ds = pydicom.dcmread(f)
        edit(ds, k)
        ds.save_as(f)
