"""Writing a known volume as a standards-conformant multi-file DICOM series (pydicom).

Used by tests and by the sample-data generator to produce real DICOM from a volume whose
geometry is known exactly, and by anyone who needs a CT or MR series on disk.

Conventions (read these before calling :func:`write_dicom_series`):

* ``volume`` is a NumPy array of shape ``(n_slices, rows, columns)``, i.e. ``(z, y, x)`` /
  ``(D, H, W)``: ``volume[k]`` is the k-th image of the series, ``volume[k, r, c]`` its pixel
  at row ``r`` and column ``c``, exactly as a DICOM viewer shows it.
* Geometry is given EITHER as ``affine`` OR as ``spacing``/``origin``/``direction``:

  - ``affine``: a 4x4 **RAS** matrix mapping the voxel index ``(c, r, k)`` (column, row,
    slice - the index order MONAI and nibabel use for a loaded series, shape
    ``(columns, rows, n_slices)``) to RAS world millimetres. The affine of a volume returned
    by :func:`icam_med.io.load_volume` can be passed back unchanged with
    ``volume=image[0].numpy().transpose(2, 1, 0)``.
  - ``spacing=(column_spacing, row_spacing, slice_spacing)`` in mm (ITK order x, y, z),
    ``origin`` = LPS position (mm) of the centre of the first pixel of the first slice,
    ``direction`` = 3x3 matrix whose **columns** are the LPS unit vectors of the column
    axis (along a row), the row axis (down a column) and the slice axis (SimpleITK's
    convention). A slice axis that is not the normal of the image plane gives a sheared
    stack, as a tilted CT gantry does.

* Pixel data are stored as signed 16-bit integers. A non-integer or out-of-range volume is
  quantised with a Rescale Slope/Intercept so that ``stored * slope + intercept``
  reproduces it to within ``slope / 2``; an integer volume that fits is stored exactly.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["lps_geometry_from_affine", "write_dicom_series"]

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}


def lps_geometry_from_affine(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a RAS voxel-to-world affine into ITK-style LPS ``(spacing, origin, direction)``.

    Args:
        affine: 4x4 RAS affine of a ``(columns, rows, slices)``-indexed volume.

    Returns:
        ``spacing`` (3,), ``origin`` (3,) in LPS mm, ``direction`` 3x3 (columns = unit axes, LPS).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be a 4x4 matrix, got shape {a.shape}.")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ a
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine {a.tolist()} has a zero-length axis; it is not a valid geometry.")
    direction = lps[:3, :3] / spacing
    return spacing, lps[:3, 3].copy(), direction


def _quantise(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    v = np.asarray(volume)
    if not np.all(np.isfinite(v)):
        raise ValueError("volume holds NaN or Inf values; DICOM integer pixel data cannot store them.")
    lo, hi = float(v.min()), float(v.max())
    info = np.iinfo(np.int16)
    if np.all(np.equal(np.mod(v, 1), 0)) and lo >= info.min and hi <= info.max:
        return v.astype(np.int16), 1.0, 0.0
    intercept = lo
    span = hi - lo
    slope = span / (info.max - 0) if span > 0 else 1.0
    # Round-trippable decimal strings (DS is at most 16 characters).
    slope = float(f"{slope:.10g}")
    intercept = float(f"{intercept:.10g}")
    stored = np.clip(np.rint((v - intercept) / slope), 0, info.max).astype(np.int16)
    return stored, slope, intercept


def _ds(value: float) -> str:
    """A DICOM Decimal String (<= 16 characters) for ``value``."""
    for digits in range(12, 3, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{value:.3e}"


def write_dicom_series(
    volume: np.ndarray,
    folder: str | Path,
    *,
    affine: np.ndarray | None = None,
    spacing: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    direction: np.ndarray | None = None,
    modality: str = "MR",
    series_description: str = "icam-med synthetic series",
    series_number: int = 1,
    patient_name: str = "Anonymous^Synthetic",
    patient_id: str = "SYNTH0001",
    patient_birth_date: str = "",
    patient_sex: str = "O",
    study_description: str = "icam-med synthetic study",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    filename_prefix: str = "IM",
    overwrite: bool = False,
    **tags: Any,
) -> list[Path]:
    """Write ``volume`` as a multi-file CT or MR Image Storage series, one file per slice.

    Args:
        volume: ``(n_slices, rows, columns)`` array (see the module docstring for the axes).
        folder: output folder (created if missing).
        affine: 4x4 RAS affine of the ``(columns, rows, slices)`` index; excludes the next three.
        spacing: ``(column, row, slice)`` spacing in mm (default ``(1, 1, 1)``).
        origin: LPS position of the first voxel in mm (default ``(0, 0, 0)``).
        direction: 3x3 LPS direction cosines as columns (default identity: axial, LPS).
        modality: ``"CT"`` or ``"MR"``; selects the SOP class.
        series_description, series_number, study_description: written as given.
        patient_name, patient_id, patient_birth_date, patient_sex: Patient module values
            (synthetic defaults; pass made-up identifiers to test de-identification).
        study_instance_uid, series_instance_uid, frame_of_reference_uid: reuse existing
            UIDs (e.g. two series in one study); new ones are generated when omitted.
        filename_prefix: files are named ``{prefix}{index:05d}.dcm``; never from a tag value.
        overwrite: replace files that already exist (default: refuse).
        **tags: any further DICOM keyword=value pairs set on every file (e.g.
            ``InstitutionName="General Hospital"``, ``AccessionNumber="A123"``); they are
            applied last, so they can override the defaults (not the geometry).

    Returns:
        The written file paths, in slice order.

    Raises:
        ValueError: bad volume shape/values, unknown modality, conflicting geometry or an
            unknown DICOM keyword.
        FileExistsError: a target file exists and ``overwrite`` is False.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    from icam_med.io.atomic import atomic_write

    vol = np.asarray(volume)
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(
            f"volume must be a 3-D (n_slices, rows, columns) array, got shape {vol.shape}."
        )
    modality = modality.upper()
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}.")
    if affine is not None and any(x is not None for x in (spacing, origin, direction)):
        raise ValueError("give either affine or spacing/origin/direction, not both.")
    if affine is not None:
        sp, org, dirn = lps_geometry_from_affine(affine)
    else:
        sp = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), dtype=np.float64)
        org = np.asarray(origin if origin is not None else (0.0, 0.0, 0.0), dtype=np.float64)
        dirn = np.asarray(direction if direction is not None else np.eye(3), dtype=np.float64)
        if sp.shape != (3,) or org.shape != (3,) or dirn.shape != (3, 3) or np.any(sp <= 0):
            raise ValueError(
                f"spacing (3 positive values), origin (3) and direction (3x3) expected; got "
                f"{sp.tolist()}, {org.tolist()}, {dirn.tolist()}."
            )
        dirn = dirn / np.linalg.norm(dirn, axis=0)
    row_dir, col_dir, slice_dir = dirn[:, 0], dirn[:, 1], dirn[:, 2]
    if abs(float(np.dot(row_dir, col_dir))) > 1e-6:
        raise ValueError("the column and row axes of direction must be orthogonal.")
    normal = np.cross(row_dir, col_dir)
    if float(np.dot(normal, slice_dir)) <= 0:
        raise ValueError(
            "the slice axis of the geometry points against the image-plane normal "
            "(row x column); DICOM slices are written in increasing position along it. "
            "Flip the volume's first axis instead."
        )
    stored, slope, intercept = _quantise(vol)

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    n = vol.shape[0]
    paths = [out / f"{filename_prefix}{k + 1:05d}.dcm" for k in range(n)]
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{existing[0]} already exists ({len(existing)} file(s) of this series would be "
            "replaced); choose an empty folder or pass overwrite=True."
        )

    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()
    now = _dt.datetime.now(_dt.UTC)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_class = _SOP_CLASS[modality]
    # Slice thickness: the distance between planes along the normal.
    plane_gap = float(sp[2] * np.dot(normal, slice_dir))
    wmin, wmax = float(vol.min()), float(vol.max())

    for k, path in enumerate(paths):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "ICAM_MED"

        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
        # Patient
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = patient_birth_date
        ds.PatientSex = patient_sex
        # General Study
        ds.StudyInstanceUID = study_uid
        ds.StudyDate, ds.StudyTime = date, time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.StudyDescription = study_description
        # General Series
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(series_number)
        ds.SeriesDate, ds.SeriesTime = date, time
        ds.SeriesDescription = series_description
        ds.PatientPosition = "HFS"
        ds.Laterality = ""  # Type 2C; dciodvfy cannot evaluate the condition, so send it empty
        # Frame of Reference
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        # General Equipment
        ds.Manufacturer = "icam-med"
        ds.ManufacturerModelName = "synthetic"
        ds.SoftwareVersions = "icam-med"
        # General Image / Acquisition
        ds.InstanceNumber = k + 1
        ds.AcquisitionNumber = 1
        ds.ContentDate, ds.ContentTime = date, time
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.BurnedInAnnotation = "NO"
        # Image Plane
        position = org + k * sp[2] * slice_dir
        ds.PixelSpacing = [_ds(sp[1]), _ds(sp[0])]  # row spacing \ column spacing
        ds.ImageOrientationPatient = [_ds(x) for x in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [_ds(x) for x in position]
        ds.SliceThickness = _ds(plane_gap)
        ds.SpacingBetweenSlices = _ds(plane_gap) if modality == "MR" else None
        if modality == "CT":
            del ds.SpacingBetweenSlices
        ds.SliceLocation = _ds(float(np.dot(position, normal)))
        # Image Pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(vol.shape[1]), int(vol.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        if modality == "CT" or (slope, intercept) != (1.0, 0.0):
            # Required for CT; for MR only when the volume had to be quantised (readers
            # such as GDCM/SimpleITK and pydicom apply it, dciodvfy notes it as a warning).
            ds.RescaleIntercept = _ds(intercept)
            ds.RescaleSlope = _ds(slope)
        if modality == "CT":
            ds.RescaleType = "HU"
        ds.WindowCenter = _ds((wmin + wmax) / 2)
        ds.WindowWidth = _ds(max(wmax - wmin, 1.0))
        if modality == "CT":
            ds.KVP = ""
        else:
            ds.ScanningSequence = "RM"
            ds.SequenceVariant = "NONE"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = ""
            ds.EchoTime = ""
            ds.EchoTrainLength = ""
            ds.ImagedNucleus = "1H"
            ds.MagneticFieldStrength = ""
        for keyword, value in tags.items():
            if not pydicom.datadict.dictionary_has_tag(keyword) and keyword not in (
                pydicom.datadict.keyword_dict
            ):
                raise ValueError(f"{keyword!r} is not a DICOM keyword; tag overrides use keywords.")
            setattr(ds, keyword, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()

        with atomic_write(path, overwrite=overwrite) as fh:
            ds.save_as(fh, enforce_file_format=True)
    log.debug("wrote %d-slice %s series to %s", n, modality, out)
    return paths

