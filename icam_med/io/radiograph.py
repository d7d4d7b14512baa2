"""2-D images (radiographs): DX, CR and MG DICOM files and 2-D NIfTI, in and out.

A projection radiograph has no place in 3-D patient space: DX, CR and MG files carry no
Image Position/Orientation (Patient), only a pixel spacing, and their display is defined
by the viewer's chain (modality LUT, VOI LUT or window, MONOCHROME1 shown inverted). This
module gives them their own path through icam-med:

* :func:`radiograph_source` decides whether a path is a 2-D image (a single-frame DICOM
  file of a projection modality or without a position, a folder holding exactly one such
  file, or a NIfTI whose third axis has one voxel) and :func:`load_radiograph` loads it:
  a float32 :class:`~monai.data.MetaTensor` ``(1, X, Y, 1)`` (column, row, one slice; the
  same layout as every scan, so the writers, report and viewer need nothing new) with the
  display values a viewer shows, and a :class:`~icam_med.io.ScanInfo` whose checks say
  which spacing was used and which display transforms were applied.
* Spacing: Pixel Spacing (0028,0030) where the file has a valid one (calibrated at the
  patient), else Imager Pixel Spacing (0018,1164) (at the detector plane, not corrected for
  geometric magnification); the one used is recorded in the ``pixel_spacing`` check. A
  file with neither is refused unless ``geometry.allow_unknown_spacing`` (1 mm assumed,
  recorded as a warning).
* Geometry convention for a file without Image Position/Orientation (Patient): columns run
  along x and rows along y with the first pixel's centre at the origin, as DICOM's default
  patient axes (LPS ``x = column * column_spacing``, ``y = row * row_spacing``); written
  in RAS (MONAI's space, as every DICOM here) that is ``diag(-dc, -dr, 1)``. A file that has
  a position and orientation is placed by them.
* Intensities: pydicom's :func:`~pydicom.pixels.apply_modality_lut`, then
  :func:`~pydicom.pixels.apply_voi_lut` (the first VOI LUT or window, as a viewer shows
  by default), then MONOCHROME1 inverted over the output range of the last step, so bright
  means dense for every file.
* The 2-D pipeline: :func:`preprocess_2d` runs the config's MONAI transforms on the image
  as a 2-D MetaTensor ``(1, X, Y)`` (3x3 affine) and :func:`invert_2d` carries a map back
  with MONAI's inverse onto the radiograph's own pixel grid ``(1, X, Y, 1)``.
* Outputs beside the NIfTI map: :func:`write_overlay_png` (the radiograph with the map in
  colour, rows down, as a viewer shows it) and :func:`write_presentation_state` (a DICOM
  Grayscale Softcopy Presentation State referencing the radiograph, whose graphic layer
  draws the map's iso-contours and peak over it; see docs/io.md for why this IOD).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.io.loading import _as_metatensor, _axcodes
from icam_med.io.validation import (
    GeometryCheck,
    GeometryError,
    GeometryOptions,
    check_finite,
    check_readable,
    check_voxel_limit,
)
from icam_med.paths import is_nifti

__all__ = [
    "PROJECTION_MODALITIES",
    "RADIOGRAPH_CHECK",
    "display_pixels",
    "invert_2d",
    "is_2d_image",
    "is_radiograph",
    "load_radiograph",
    "pixel_spacing",
    "preprocess_2d",
    "radiograph_files",
    "radiograph_source",
    "write_overlay_png",
    "write_presentation_state",
    "write_radiograph_outputs",
]

log = logging.getLogger(__name__)

#: DICOM modalities of single-frame projection images taken as 2-D.
PROJECTION_MODALITIES = frozenset({"DX", "CR", "MG", "RG", "IO", "PX", "XA", "RF"})
#: The check that marks a loaded scan as a 2-D image (its detail says why).
RADIOGRAPH_CHECK = "image_2d"
#: MetaTensor metadata key set on a 2-D image and on its preprocessed copy.
SPATIAL_DIMS_KEY = "icam_spatial_dims"
#: The 4x4 source affine kept in a 2-D image's metadata (the 2-D pipeline uses 3x3).
AFFINE_3D_KEY = "icam_affine_3d"


# ---------------------------------------------------------------------------------------
# Which paths are 2-D images
# ---------------------------------------------------------------------------------------

def _header(path: Path) -> Any | None:
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM (or unreadable): the 3-D path gives the clear error
        return None


def _is_2d_header(ds: Any) -> bool:
    """A single-frame, single-image DICOM of a projection modality, or without a position."""
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 or "Rows" not in ds:
        return False
    modality = str(getattr(ds, "Modality", "") or "").upper()
    positioned = "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
    return modality in PROJECTION_MODALITIES or not positioned


def radiograph_source(path: str | Path) -> Path | None:
    """The 2-D image file ``path`` is (or holds), else ``None`` (a 3-D scan).

    A 2-D image is a single-frame DICOM file of a projection modality (DX, CR, MG...) or
    one without Image Position/Orientation (Patient); a folder holding exactly one such
    file (and nothing else); or a NIfTI file whose third axis has one voxel (or none).

    Raises:
        GeometryError: a folder holds several 2-D images (each is its own scan).
    """
    p = Path(path).expanduser()
    if not p.exists():
        return None
    if p.is_file():
        if is_nifti(p):
            return p if _nifti_is_2d(p) else None
        ds = _header(p)
        return p if ds is not None and _is_2d_header(ds) else None
    files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
    first = _header(files[0]) if files else None
    if first is None or not _is_2d_header(first):
        return None  # a series folder: read no further header here
    headers = [first, *(_header(f) for f in files[1:])]
    flat = [f for f, ds in zip(files, headers, strict=True) if ds is not None and _is_2d_header(ds)]
    if not flat or len(flat) != len(files):
        return None  # a series (or a mixed folder): the 3-D path validates it
    if len(flat) > 1:
        names = ", ".join(f.name for f in flat[:5]) + (" ..." if len(flat) > 5 else "")
        raise GeometryError(
            f"{p}: holds {len(flat)} single 2-D images ({names}), not a series: each is a "
            "scan of its own. Give one file, or audit the folder with 'icam-med audit', "
            "which takes each file as a scan."
        )
    return flat[0]


def radiograph_files(files: Sequence[str | Path]) -> list[Path] | None:
    """``files`` (a folder's non-NIfTI files) when every one is a single 2-D DICOM image,
    each then a scan of its own; else ``None`` (the folder is a series)."""
    paths = [Path(f) for f in files]
    if not paths:
        return None
    for f in paths:
        ds = _header(f)
        if ds is None or not _is_2d_header(ds):
            return None
    return paths


def _nifti_is_2d(path: Path) -> bool:
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:
        return False  # the 3-D path gives the clear error
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return len(shape) == 2


def is_radiograph(info: Any) -> bool:
    """Whether a :class:`~icam_med.io.ScanInfo` describes a 2-D image."""
    return any(getattr(c, "name", None) == RADIOGRAPH_CHECK for c in getattr(info, "checks", ()))


def is_2d_image(image: Any) -> bool:
    """Whether a MetaTensor is a loaded 2-D image (or its preprocessed copy)."""
    meta = getattr(image, "meta", None)
    return isinstance(meta, Mapping) and int(meta.get(SPATIAL_DIMS_KEY, 3) or 3) == 2


# ---------------------------------------------------------------------------------------
# Spacing, geometry and display values of a DICOM radiograph
# ---------------------------------------------------------------------------------------

def _valid_pair(value: Any) -> tuple[float, float] | None:
    try:
        pair = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair[0], pair[1]


def pixel_spacing(ds: Any, source: str, options: GeometryOptions | None = None
                  ) -> tuple[tuple[float, float], GeometryCheck]:
    """The (row, column) spacing in mm of a 2-D DICOM image and the check saying which.

    Pixel Spacing (0028,0030) where valid (for DX/CR/MG: calibrated at the patient); else
    Imager Pixel Spacing (0018,1164) (at the detector's front plane; the Estimated
    Radiographic Magnification Factor, if any, is recorded, not applied, as viewers
    measure); else refused, or with ``options.allow_unknown_spacing`` 1 mm (a warning).

    Raises:
        GeometryError: neither tag holds two positive finite numbers.
    """
    options = GeometryOptions.from_mapping(options)
    found = []
    for keyword, tag, what in (("PixelSpacing", "(0028,0030)", "at the patient"),
                               ("ImagerPixelSpacing", "(0018,1164)", "at the detector plane")):
        if keyword not in ds:
            continue
        pair = _valid_pair(ds.get(keyword))
        raw = list(ds.get(keyword) or [])
        if pair is None:
            found.append(f"{keyword} {tag} {raw} is not two positive numbers")
            continue
        detail = (f"{keyword} {tag} used: {pair[0]:g} x {pair[1]:g} mm (row x column), {what}")
        if keyword == "ImagerPixelSpacing":
            factor = ds.get("EstimatedRadiographicMagnificationFactor")
            detail += ("; not corrected for geometric magnification"
                       + (f" (Estimated Radiographic Magnification Factor {float(factor):g})"
                          if factor not in (None, "") else ""))
        if found:
            detail += f" ({'; '.join(found)})"
        return pair, GeometryCheck("pixel_spacing", "passed", detail)
    why = "; ".join(found) or "neither Pixel Spacing (0028,0030) nor Imager Pixel Spacing " \
        "(0018,1164) is present"
    if not options.allow_unknown_spacing:
        raise GeometryError(
            f"{source}: the pixel size is unknown ({why}); a map on it would have no size. "
            "Fix the header, or set geometry.allow_unknown_spacing: true to assume 1 mm "
            "pixels (recorded as a warning)."
        )
    log.warning("%s: pixel size unknown (%s); 1 mm assumed (geometry.allow_unknown_spacing)",
                source, why)
    return (1.0, 1.0), GeometryCheck("pixel_spacing", "warned",
                                     f"pixel size unknown ({why}): 1 x 1 mm assumed")


def _affine_lps(ds: Any, spacing: tuple[float, float]) -> tuple[np.ndarray, str]:
    """The LPS voxel-to-world affine of the (column, row, 0) grid and how it was built."""
    dr, dc = spacing
    affine = np.eye(4)
    iop = ds.get("ImageOrientationPatient")
    ipp = ds.get("ImagePositionPatient")
    try:
        o = np.array([float(v) for v in iop], dtype=np.float64) if iop is not None else None
        pos = np.array([float(v) for v in ipp], dtype=np.float64) if ipp is not None else None
    except (TypeError, ValueError):
        o = pos = None
    if (o is not None and pos is not None and o.shape == (6,) and pos.shape == (3,)
            and np.all(np.isfinite(o)) and np.all(np.isfinite(pos))
            and abs(np.linalg.norm(o[:3]) - 1) < 1e-3 and abs(np.linalg.norm(o[3:]) - 1) < 1e-3
            and abs(float(o[:3] @ o[3:])) < 1e-3):
        affine[:3, 0] = o[:3] * dc
        affine[:3, 1] = o[3:] * dr
        affine[:3, 2] = np.cross(o[:3], o[3:])
        affine[:3, 3] = pos
        return affine, "placed by its Image Position/Orientation (Patient)"
    affine[0, 0], affine[1, 1] = dc, dr
    value = ds.get("PatientOrientation")
    orient = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) or (
        value is not None and not isinstance(value, str) and hasattr(value, "__iter__")) \
        else str(value or "")
    return affine, (
        "no patient coordinates (projection image): column -> x, row -> y, first pixel's "
        "centre at the origin" + (f"; Patient Orientation {orient}" if orient else ""))


def _range_after_modality(ds: Any) -> tuple[float, float]:
    """The output range of the modality transform for this file's stored values."""
    bits = int(getattr(ds, "BitsStored", 16) or 16)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    else:
        lo, hi = 0.0, 2.0 ** bits - 1
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    a, b = lo * slope + intercept, hi * slope + intercept
    return min(a, b), max(a, b)


def _window_range(ds: Any) -> tuple[float, float]:
    """pydicom's output range of windowing (``apply_windowing``) for this file."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, 2.0 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1
    bits = int(ds.BitsStored)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 0:
        y_min, y_max = 0.0, 2.0 ** bits - 1
    else:
        y_min, y_max = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    if ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        y_min = y_min * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        y_max = y_max * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return y_min, y_max


def display_pixels(ds: Any, source: str = "image") -> tuple[np.ndarray, GeometryCheck]:
    """The values a viewer displays for a 2-D DICOM image, rows x columns, float32.

    Modality LUT (or rescale), then the first VOI LUT (or window centre/width) with
    pydicom, then MONOCHROME1 inverted over the output range of the last step (a viewer
    shows MONOCHROME1's minimum as white), so higher values are brighter in every file.

    Raises:
        GeometryError: the pixels cannot be decoded, or the image is not grayscale.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    photometric = str(getattr(ds, "PhotometricInterpretation", "") or "").upper()
    if int(getattr(ds, "SamplesPerPixel", 1) or 1) != 1 or photometric not in (
            "MONOCHROME1", "MONOCHROME2"):
        raise GeometryError(
            f"{source}: is a colour image ({photometric or 'no Photometric Interpretation'}, "
            f"{int(getattr(ds, 'SamplesPerPixel', 1) or 1)} samples per pixel); a radiograph "
            "is grayscale (MONOCHROME1 or MONOCHROME2). Give the original grayscale image."
        )
    try:
        stored = ds.pixel_array
    except Exception as exc:
        raise GeometryError(
            f"{source}: its pixel data could not be decoded ({type(exc).__name__}: {exc}); "
            "the file is truncated, corrupt or uses an encoding without an installed decoder."
        ) from exc
    if stored.ndim != 2:
        raise GeometryError(f"{source}: expected one 2-D frame, got pixel data of shape "
                            f"{stored.shape}.")
    steps = []
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    lo, hi = _range_after_modality(ds)
    if ds.get("ModalityLUTSequence"):
        steps.append("modality LUT")
    else:
        steps.append(f"rescale slope {float(ds.get('RescaleSlope', 1) or 1):g}, intercept "
                     f"{float(ds.get('RescaleIntercept', 0) or 0):g}")
    if ds.get("VOILUTSequence"):
        # a LUT is indexed by the (integer) modality values: whole floats are given as ints
        lut_in = values.astype(np.int64) if np.array_equal(values, np.rint(values)) else values
        values = np.asarray(apply_voi_lut(lut_in, ds, index=0, prefer_lut=True),
                            dtype=np.float64)
        lo, hi = 0.0, 2.0 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
        steps.append("VOI LUT (first of "
                     f"{len(ds.VOILUTSequence)})")
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        lo, hi = _window_range(ds)
        centre = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
        width = ds.WindowWidth[0] if ds["WindowWidth"].VM > 1 else ds.WindowWidth
        steps.append(f"window centre {float(centre):g} width {float(width):g} "
                     f"({getattr(ds, 'VOILUTFunction', '') or 'LINEAR'!s})")
    else:
        steps.append("no VOI LUT or window in the file: full range")
    if photometric == "MONOCHROME1":
        values = (lo + hi) - values
        steps.append(f"MONOCHROME1 inverted over [{lo:g}, {hi:g}] (bright = dense)")
    return values.astype(np.float32), GeometryCheck("display_transform", "passed",
                                                    "; ".join(steps))


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def _as_2d_metatensor(plane_xy: np.ndarray, affine_ras: np.ndarray, path: Path) -> Any:
    """``(1, X, Y, 1)`` float32 MetaTensor with the 4x4 RAS affine, marked as 2-D."""
    return _as_metatensor(np.asarray(plane_xy)[:, :, None], affine_ras, path,
                          **{SPATIAL_DIMS_KEY: 2})


def load_radiograph(path: str | Path, *, geometry: GeometryOptions | Mapping[str, Any] | None
                    = None) -> tuple[Any, Any]:
    """Validate and load one 2-D image (see :func:`radiograph_source`).

    Args:
        path: a single-frame DICOM file (DX, CR, MG...), a folder holding exactly one, or a
            2-D NIfTI file.
        geometry: validation options (the config's ``geometry`` mapping).

    Returns:
        ``(image, info)``: a float32 MetaTensor ``(1, X, Y, 1)`` (column, row) with its
        4x4 RAS affine, and its :class:`~icam_med.io.ScanInfo` (checks ``image_2d``,
        ``pixel_spacing`` and ``display_transform`` for DICOM).

    Raises:
        FileNotFoundError, PermissionError: unreadable path.
        GeometryError: not a 2-D image, no usable spacing, undecodable or colour pixels.
    """
    from icam_med.io.loading import ScanInfo

    options = GeometryOptions.from_mapping(geometry)
    p = check_readable(path)
    source = radiograph_source(p)
    if source is None:
        raise GeometryError(f"{p}: is not a single 2-D image (a DX/CR/MG DICOM file or a 2-D "
                            "NIfTI); load it with icam_med.io.load_volume.")
    if is_nifti(source):
        return _load_nifti_2d(source, p, options)
    import pydicom

    try:
        ds = pydicom.dcmread(source)
    except Exception as exc:
        raise GeometryError(f"{source}: cannot be read as DICOM ({exc}); the file is truncated "
                            "or corrupt.") from exc
    checks = [check_voxel_limit(int(ds.Rows) * int(ds.Columns), str(source), options)]
    spacing, spacing_check = pixel_spacing(ds, str(source), options)
    lps, placement = _affine_lps(ds, spacing)
    modality = str(getattr(ds, "Modality", "") or "") or None
    checks.insert(0, GeometryCheck(RADIOGRAPH_CHECK, "passed",
                                   f"single-frame 2-D image (modality {modality or '?'}): "
                                   f"{placement}"))
    checks.append(spacing_check)
    rows_cols, display = display_pixels(ds, str(source))
    checks.append(display)
    fixed, finite = check_finite(rows_cols, str(source), options)
    checks.append(finite)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS, as every DICOM here
    image = _as_2d_metatensor(fixed.T, affine, p)
    header = pydicom.dcmread(source, stop_before_pixels=True)

    def tag(name: str) -> str | None:
        v = getattr(header, name, None)
        return str(v) if v not in (None, "") else None

    unsigned = int(getattr(ds, "PixelRepresentation", 0) or 0) == 0
    info = ScanInfo(
        path=p, format="dicom", modality=modality, shape=tuple(int(s) for s in image.shape[1:]),
        spacing=tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)), affine=affine,
        orientation=_axcodes(affine), source_files=(source,), checks=tuple(checks),
        source_dtype=f"{'u' if unsigned else ''}int{int(getattr(ds, 'BitsAllocated', 16))}",
        series_description=tag("SeriesDescription") or "",
        study_instance_uid=tag("StudyInstanceUID"), series_instance_uid=tag("SeriesInstanceUID"),
        frame_of_reference_uid=tag("FrameOfReferenceUID"),
        sop_instance_uids=(str(header.SOPInstanceUID),) if "SOPInstanceUID" in header else (),
        sop_class_uid=tag("SOPClassUID"), headers=(header,),
    )
    log.info("loaded 2-D %s image %s: %d x %d pixels, spacing %s mm", modality or "DICOM",
             source.name, info.shape[1], info.shape[0], tuple(round(s, 4) for s in spacing))
    return image, info


def _load_nifti_2d(source: Path, path: Path, options: GeometryOptions) -> tuple[Any, Any]:
    from icam_med.io.loading import ScanInfo
    from icam_med.io.validation import validate_nifti_affine

    nii, checks, affine = validate_nifti_affine(source, options=options)
    data = np.asarray(nii.dataobj)
    if np.iscomplexobj(data):
        data = np.abs(data)  # validation refused it unless the magnitude was asked for
    while data.ndim > 2:
        data = data[..., 0]
    fixed, finite = check_finite(np.asarray(data, dtype=np.float32), str(source), options)
    checks = [GeometryCheck(RADIOGRAPH_CHECK, "passed",
                            "2-D NIfTI: placed by its own transform"), *checks, finite]
    image = _as_2d_metatensor(fixed, affine, path)
    info = ScanInfo(
        path=path, format="nifti", modality=None, shape=tuple(int(s) for s in image.shape[1:]),
        spacing=tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)),
        affine=np.asarray(affine, dtype=np.float64), orientation=_axcodes(affine),
        source_files=(source,), checks=tuple(checks), source_dtype=str(nii.get_data_dtype()),
    )
    return image, info


# ---------------------------------------------------------------------------------------
# The 2-D pipeline and its way back
# ---------------------------------------------------------------------------------------

def _plane(affine4: np.ndarray) -> np.ndarray:
    """The 3x3 affine of the (column, row) plane of a (X, Y, 1) grid's 4x4 affine, in the
    plane's own (x, y) world: rows 0, 1 and the translation column."""
    a = np.asarray(affine4, dtype=np.float64)
    keep = [0, 1, 3]
    return a[np.ix_(keep, keep)]


def preprocess_2d(compose: Any, image: Any, *, source: str = "config") -> Any:
    """Run a config's (MONAI ``Compose``) preprocessing on a 2-D image as a 2-D MetaTensor.

    Args:
        compose: the built pipeline (:attr:`icam_med.io.Preprocessor.compose`).
        image: the ``(1, X, Y, 1)`` MetaTensor from :func:`load_radiograph`.
        source: where the pipeline comes from, for the error message.

    Returns:
        The preprocessed ``(C, H, W)`` MetaTensor, marked 2-D.

    Raises:
        ValueError: a step fails on a 2-D image (a 3-D pipeline): the message names the fix.
    """
    import torch
    from monai.data import MetaTensor

    affine4 = np.asarray(image.affine, dtype=np.float64)
    meta = {k: v for k, v in image.meta.items() if k not in ("affine", "original_affine")}
    plane = _plane(affine4)
    meta.update(original_affine=plane.copy(), spatial_shape=np.asarray(image.shape[1:3]))
    meta[AFFINE_3D_KEY] = affine4
    x2 = MetaTensor(image.as_tensor()[..., 0].clone(), affine=torch.as_tensor(plane), meta=meta)
    try:
        out = compose({"image": x2})["image"]
    except Exception as exc:
        raise ValueError(
            f"{image.meta.get('filename_or_obj', 'the image')}: is a 2-D image and the "
            f"{source} preprocessing failed on it in 2-D ({type(exc).__name__}: {exc}). A 2-D "
            "image needs a 2-D model and 2-D transforms (e.g. Resized with two sizes): see "
            "configs/demo2d.yaml."
        ) from exc
    if not isinstance(out, MetaTensor) or out.ndim != 3:
        raise ValueError(
            f"the {source} preprocessing turned a 2-D image into shape "
            f"{tuple(getattr(out, 'shape', ()))}; a 2-D model takes (C, H, W).")
    out.meta[SPATIAL_DIMS_KEY] = 2
    out.meta[AFFINE_3D_KEY] = affine4
    return out


def invert_2d(preprocessor: Any, cam_map: Any, preprocessed: Any, *,
              source_shape: Sequence[int] | None = None, source_affine: Any = None,
              mode: str = "bilinear") -> Any:
    """Carry a map on the 2-D model grid back onto the radiograph's pixel grid.

    MONAI's inverse of each step (:meth:`icam_med.io.Preprocessor.invert_reference`) in
    2-D, checked against the source plane's shape and affine, then given the source's
    ``(1, X, Y, 1)`` layout and exactly its 4x4 affine.
    """
    import torch

    shape3 = tuple(int(s) for s in source_shape) if source_shape is not None else None
    affine4 = np.asarray(torch.as_tensor(
        source_affine if source_affine is not None else preprocessed.meta[AFFINE_3D_KEY]).cpu(),
        dtype=np.float64)
    m = torch.as_tensor(cam_map).detach().float().cpu()
    if m.ndim == 4 and m.shape[-1] == 1 and preprocessed.ndim == 3 and m.shape[1:3] == \
            preprocessed.shape[1:]:
        m = m[..., 0]
    out = preprocessor.invert_reference(
        m, preprocessed, source_shape=shape3[:2] if shape3 is not None else None,
        source_affine=_plane(affine4), mode=mode)
    from monai.data import MetaTensor

    back = MetaTensor(out.as_tensor()[..., None].float(), affine=torch.as_tensor(affine4))
    if shape3 is not None and tuple(back.shape[1:]) != shape3:
        raise ValueError(f"the 2-D map came back as {tuple(back.shape[1:])}, not the "
                         f"radiograph's {shape3}.")
    return back


# ---------------------------------------------------------------------------------------
# Outputs beside the NIfTI map
# ---------------------------------------------------------------------------------------

def _display_plane(info: Any) -> np.ndarray:
    """The radiograph's display values, (rows, columns), re-read from its file."""
    src = Path(info.source_files[0])
    if info.format == "nifti":
        import nibabel as nib

        data = np.asarray(nib.load(str(src)).dataobj)
        if np.iscomplexobj(data):
            data = np.abs(data)
        while data.ndim > 2:
            data = data[..., 0]
        return np.asarray(data, dtype=np.float32).T
    import pydicom

    return display_pixels(pydicom.dcmread(src), str(src))[0]


def _map_plane(cam_map: Any) -> np.ndarray:
    """A (1, X, Y, 1) / (X, Y, 1) / (X, Y) map as (rows, columns) float32."""
    import torch

    a = cam_map.detach().cpu().numpy() if isinstance(cam_map, torch.Tensor) else np.asarray(cam_map)
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 4:
        a = a[0]
    if a.ndim == 3:
        a = a[..., 0]
    if a.ndim != 2:
        raise ValueError(f"expected a 2-D map (X, Y) or (1, X, Y, 1), got shape {a.shape}.")
    return a.T


def write_overlay_png(cam_map: Any, info: Any, path: str | Path, *, overwrite: bool = False,
                      description: str = "icam-med class-activation map",
                      alpha: float = 0.6, colormap: str = "inferno") -> Path:
    """The radiograph (its display values, rows down) with the map blended over it in
    colour, as an RGB PNG of the radiograph's own size, pixel for pixel.

    The map's colour is ``colormap`` at each pixel's value in [0, 1], blended with weight
    ``alpha * value`` (so a zero map leaves the radiograph as it is). ``description`` goes
    into the PNG's ``Description`` text chunk.

    Raises:
        ValueError: the map is not on the radiograph's grid.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from matplotlib import colormaps
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    from icam_med.io.atomic import atomic_write_bytes, check_writable

    p = check_writable(path, overwrite=overwrite)
    heat = np.clip(_map_plane(cam_map), 0.0, 1.0)
    gray = _display_plane(info)
    if gray.shape != heat.shape:
        raise ValueError(f"the map ({heat.shape[0]} rows x {heat.shape[1]} columns) is not on "
                         f"the radiograph's grid ({gray.shape[0]} x {gray.shape[1]}); invert "
                         "the preprocessing first.")
    lo, hi = float(gray.min()), float(gray.max())
    base = (gray - lo) / (hi - lo) if hi > lo else np.zeros_like(gray)
    rgb = colormaps[colormap](heat)[..., :3]
    weight = (alpha * heat)[..., None]
    out = (1.0 - weight) * base[..., None] + weight * rgb
    pixels = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    text = PngInfo()
    text.add_text("Description", description)
    text.add_text("Software", "icam-med")
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", pnginfo=text)
    atomic_write_bytes(p, buf.getvalue(), overwrite=overwrite)
    log.info("wrote PNG overlay %s (%d x %d)", p, pixels.shape[1], pixels.shape[0])
    return p


def _contours(plane: np.ndarray, level: float, tolerance: float = 0.75) -> list[np.ndarray]:
    """Iso-contours of a (rows, columns) map at ``level`` as (column, row) points in DICOM
    PIXEL units (the top-left corner of the top-left pixel is 0, 0), simplified."""
    from skimage.measure import approximate_polygon, find_contours

    padded = np.pad(plane, 1, constant_values=0.0)  # close contours at the image edge
    out = []
    for c in find_contours(padded, level):
        c = approximate_polygon(c - 1.0, tolerance=tolerance)
        if len(c) < 3:
            continue
        rows = np.clip(c[:, 0], -0.5, plane.shape[0] - 0.5) + 0.5
        cols = np.clip(c[:, 1], -0.5, plane.shape[1] - 0.5) + 0.5
        out.append(np.stack([cols, rows], axis=1).astype(np.float32))
    return out


def write_presentation_state(cam_map: Any, info: Any, path: str | Path, *, method: str,
                             target_label: str | None = None, overwrite: bool = False,
                             levels: Sequence[float] = (0.25, 0.5, 0.75),
                             series_number: int = 9002) -> Path:
    """A DICOM Grayscale Softcopy Presentation State that draws the map over the radiograph.

    It references the source image and holds one graphic layer ``ICAM``: the map's
    iso-contours at ``levels`` (fractions of the map's maximum) as closed polylines and a
    circle with a text label at its peak, all in PIXEL units of the radiograph; the
    source's own VOI (window or VOI LUT) is kept, and MONOCHROME1 gets the INVERSE
    presentation LUT, so the viewer shows the image as it shows the source. Why this IOD
    and not a Parametric Map: see docs/io.md ("2-D radiographs").

    Raises:
        ValueError: the source is not DICOM, or the map is not on its grid.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import highdicom as hd
    import pydicom

    from icam_med._version import __version__
    from icam_med.io.atomic import atomic_write, check_writable
    from icam_med.io.writers import _deidentified_safe, _header_values_withheld, _truncate

    p = check_writable(path, overwrite=overwrite)
    if info.format != "dicom":
        raise ValueError("a Presentation State needs a DICOM source; NIfTI input gets the "
                         "NIfTI map and the PNG overlay.")
    plane = _map_plane(cam_map)
    rows_cols = (int(info.shape[1]), int(info.shape[0]))
    if plane.shape != rows_cols:
        raise ValueError(f"the map ({plane.shape}) is not on the radiograph's grid {rows_cols}; "
                         "invert the preprocessing first.")
    with _header_values_withheld():
        src = _deidentified_safe([pydicom.dcmread(info.source_files[0], stop_before_pixels=True)])[0]
    peak = float(plane.max())
    layer = hd.pr.GraphicLayer(layer_name="ICAM", order=1,
                               description=_truncate(f"icam-med {method} CAM", 64))
    objects = []
    if peak > 0:
        for level in levels:
            for pts in _contours(plane, level * peak):
                closed = np.vstack([pts, pts[:1]])
                objects.append(hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, closed,
                                                   hd.pr.AnnotationUnitsValues.PIXEL))
    r, c = np.unravel_index(int(np.argmax(plane)), plane.shape)
    centre = np.array([[c + 0.5, r + 0.5]], dtype=np.float32)
    radius = max(3.0, 0.02 * max(plane.shape))
    objects.append(hd.pr.GraphicObject(
        hd.pr.GraphicTypeValues.CIRCLE, centre + np.array([[0.0, 0.0], [radius, 0.0]], dtype=np.float32),
        hd.pr.AnnotationUnitsValues.PIXEL))
    label = _truncate(f"CAM peak ({method}{', ' + target_label if target_label else ''})", 64)
    text = hd.pr.TextObject(label, hd.pr.AnnotationUnitsValues.PIXEL,
                            anchor_point=(float(centre[0, 0]), float(centre[0, 1] + radius)))
    annotation = hd.pr.GraphicAnnotation(referenced_images=[src], graphic_layer=layer,
                                         graphic_objects=objects, text_objects=[text])
    inverse = str(getattr(src, "PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    plut = hd.PresentationLUTTransformation(
        presentation_lut_shape=(hd.PresentationLUTShapeValues.INVERSE if inverse
                                else hd.PresentationLUTShapeValues.IDENTITY))
    with _header_values_withheld():
        ps = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=[src], series_instance_uid=hd.UID(), series_number=series_number,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="icam-med",
            manufacturer_model_name="icam-med", software_versions=__version__,
            device_serial_number="none", content_label="ICAM",
            content_description=_truncate(f"{method} class-activation map contours", 64),
            graphic_annotations=[annotation], graphic_layers=[layer],
            presentation_lut_transformation=plut)
    ps.SeriesDescription = "icam-med CAM overlay"
    # General Series Laterality (Type 2C): the source's side of a paired part, else empty.
    side = str(getattr(src, "Laterality", "") or getattr(src, "ImageLaterality", "") or "")
    ps.Laterality = side.upper() if side.upper() in ("R", "L") else ""
    ps.preamble = b"\x00" * 128
    with _header_values_withheld(), atomic_write(p, overwrite=overwrite) as fh:
        ps.save_as(fh, enforce_file_format=True)
    log.info("wrote DICOM Grayscale Softcopy Presentation State %s (%d graphic objects)", p,
             len(objects))
    return p


def write_radiograph_outputs(explanation: Any, paths: Mapping[str, Path], *,
                             overwrite: bool = False) -> list[tuple[str, Path]]:
    """Write a 2-D explanation's PNG overlay and (DICOM input) Presentation State.

    Args:
        explanation: an :class:`icam_med.explain.Explanation` of a 2-D image.
        paths: the run's output paths by role (``overlay_png``, ``presentation_state``).
        overwrite: replace existing files.

    Returns:
        ``(role, path)`` of each file written, in order.
    """
    from icam_med._version import __version__

    method = explanation.result.method
    label = explanation.target_label
    out = []
    if "overlay_png" in paths:
        desc = (f"icam-med {__version__} {method} class-activation map"
                + (f" for class '{label}'" if label else "") + " over the radiograph")
        out.append(("overlay_png", write_overlay_png(explanation.fused, explanation.scan_info,
                                                     paths["overlay_png"], overwrite=overwrite,
                                                     description=desc)))
    if "presentation_state" in paths:
        out.append(("presentation_state", write_presentation_state(
            explanation.fused, explanation.scan_info, paths["presentation_state"],
            method=method, target_label=label, overwrite=overwrite)))
    return out
