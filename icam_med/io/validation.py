"""Geometry validation of a scan, done from headers before any pixel is decoded.

Every problem is a :class:`GeometryError` (a :class:`ValueError`) naming the file and the
problem and saying what to do. A few problems may be downgraded to a *recorded warning*
where the user opts in through the ``geometry`` section of the config
(:class:`GeometryOptions`); the warning is then kept in :attr:`ScanInfo.checks
<icam_med.io.loading.ScanInfo.checks>` and ends up in the JSON summary and audit record.

Checks (DICOM series): unreadable path; non-DICOM or truncated file; no image series;
several series in one folder (the error lists them); mixed image size, orientation or
frame of reference; missing or non-finite Image Position/Orientation; zero, negative or
non-finite Pixel Spacing; an orientation that is not two orthogonal unit vectors;
duplicate slice positions; gantry tilt (slices not stacked along the image-plane normal);
non-uniform slice spacing or missing slices; a zero Rescale Slope (and whether pixels must
be read as floats); a single 2-D image without a position; a volume larger than
``max_voxels``. Multi-frame frames are validated like a series and put in spatial order.
Checks (NIfTI): unreadable or non-NIfTI file; truncated file; 4-D without a chosen volume
index; more than 4 dimensions; complex values; the sform/qform (singular, zero or negative
voxel size, sheared, or disagreeing; which one is used is recorded); no qform/sform
(position unknown, a warning); too large.
Checks (both, after decoding): NaN/Inf voxels; the loaded grid equals the grid recomputed
from the headers (in :mod:`icam_med.io.loading`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icam_med._schema_errors import describe_error

__all__ = [
    "GeometryCheck",
    "GeometryError",
    "GeometryOptions",
    "GeometrySchema",
    "check_readable",
]

log = logging.getLogger(__name__)


class GeometryError(ValueError):
    """A scan whose geometry or content cannot be trusted; the message says why and what to do."""


class NotAnImageError(GeometryError):
    """A file in a series folder that is not a DICOM image (not DICOM, or no pixel data):
    skippable with ``geometry.ignore_non_dicom``."""


@dataclass(frozen=True)
class GeometryCheck:
    """The outcome of one validation check.

    Attributes:
        name: short identifier, e.g. ``"slice_spacing"``.
        status: ``"passed"``, ``"warned"`` (a problem the user chose to accept) or
            ``"not_applicable"``.
        detail: a human-readable sentence (never contains patient data).
    """

    name: str
    status: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status, "detail": self.detail}


class GeometrySchema(BaseModel):
    """The typed ``geometry`` section of a config: the fields of :class:`GeometryOptions`.

    Unknown keys are refused and booleans must be real booleans (a quoted ``"false"`` is an
    error, never ``True``).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    slice_tolerance: Annotated[float, Field(ge=0)] = 0.0
    allow_irregular_slices: bool = False
    allow_gantry_tilt: bool = False
    allow_nonfinite: bool = False
    ignore_non_dicom: bool = False
    max_voxels: Annotated[int, Field(ge=1)] = 512 * 512 * 2048
    nifti_transform: Literal["refuse", "sform", "qform"] = "refuse"
    complex_values: Literal["refuse", "magnitude"] = "refuse"
    geometry_tolerance: Annotated[float, Field(ge=0)] = 1e-3
    allow_unknown_spacing: bool = False


@dataclass(frozen=True)
class GeometryOptions:
    """Options of geometry validation (the ``geometry`` section of a config).

    Attributes:
        slice_tolerance: extra tolerance in mm on slice spacing (and on duplicate/tilt
            detection) beyond decimal-string rounding (1e-3 mm plus 1e-4 of the spacing).
            Default 0: strict.
        allow_irregular_slices: accept non-uniform spacing or missing slices with a
            recorded warning instead of an error (the volume is then resampled by the
            reader on the mean spacing: positions are approximate).
        allow_gantry_tilt: accept a tilted (sheared) stack with a recorded warning; the
            map is then placed on the un-sheared grid the reader builds.
        allow_nonfinite: replace NaN/Inf voxels by 0 with a recorded warning.
        ignore_non_dicom: skip non-DICOM files in a series folder with a warning.
        max_voxels: refuse volumes with more voxels than this (checked from headers).
        nifti_transform: what to do with a NIfTI whose sform and qform disagree (or one of
            them is singular): ``"refuse"`` (default), or use the ``"sform"`` / ``"qform"``
            (recorded as a warning).
        complex_values: a complex-valued NIfTI is refused (``"refuse"``, default) or its
            magnitude is taken (``"magnitude"``, recorded as a warning).
        geometry_tolerance: largest difference (mm, per affine entry, relative to the
            voxel size for the linear part) between the loaded grid and the grid recomputed
            from the headers before the scan is refused.
        allow_unknown_spacing: a 2-D image (radiograph) with neither Pixel Spacing nor
            Imager Pixel Spacing is refused (default), or given 1 mm pixels with a
            recorded warning (:mod:`icam_med.io.radiograph`).
    """

    slice_tolerance: float = 0.0
    allow_irregular_slices: bool = False
    allow_gantry_tilt: bool = False
    allow_nonfinite: bool = False
    ignore_non_dicom: bool = False
    max_voxels: int = 512 * 512 * 2048
    nifti_transform: str = "refuse"
    complex_values: str = "refuse"
    geometry_tolerance: float = 1e-3
    allow_unknown_spacing: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | GeometryOptions | None) -> GeometryOptions:
        """Build options from a config's ``geometry`` mapping.

        Raises:
            ValueError: an unknown key or a value of the wrong type; the message names the
                key and the expected type.
        """
        if isinstance(data, GeometryOptions):
            return data
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(
                f"geometry options: expected a mapping, got {type(data).__name__} ({data!r})."
            )
        try:
            schema = GeometrySchema.model_validate(dict(data or {}))
        except ValidationError as exc:
            raise ValueError(
                "geometry options: " + "; ".join(
                    describe_error(e, GeometrySchema, ("geometry",)) for e in exc.errors()) + "."
            ) from None
        return cls(**schema.model_dump())


def check_readable(path: str | Path) -> Path:
    """Resolve ``path`` and check it exists and can be read.

    Raises:
        FileNotFoundError: nothing at ``path``.
        PermissionError: it cannot be read.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"scan {p} does not exist; pass a DICOM series folder, a DICOM file or a "
            "NIfTI file (.nii or .nii.gz)."
        )
    if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
        raise PermissionError(f"scan {p} cannot be read (permission denied); check its permissions.")
    return p


def check_voxel_limit(n_voxels: int, source: str, options: GeometryOptions) -> GeometryCheck:
    if n_voxels > options.max_voxels:
        raise GeometryError(
            f"{source}: the volume has {n_voxels:,} voxels, more than the limit of "
            f"{options.max_voxels:,} (geometry.max_voxels); crop or downsample it first, or "
            "raise the limit in the config."
        )
    return GeometryCheck("voxel_limit", "passed", f"{n_voxels} voxels <= {options.max_voxels}")


def check_finite(array: np.ndarray, source: str, options: GeometryOptions
                 ) -> tuple[np.ndarray, GeometryCheck]:
    """Refuse NaN/Inf voxels, or (opt-in) replace them by 0 with a recorded warning."""
    finite = np.isfinite(array)
    if finite.all():
        return array, GeometryCheck("finite_values", "passed", "no NaN/Inf voxels")
    n_bad = int(finite.size - finite.sum())
    msg = f"{source}: {n_bad} voxel(s) are NaN or Inf"
    if not options.allow_nonfinite:
        raise GeometryError(
            msg + "; the model and the map would be undefined there. Fix the scan, or set "
            "geometry.allow_nonfinite: true to replace them by 0 (recorded as a warning)."
        )
    log.warning("%s; replaced by 0 (geometry.allow_nonfinite)", msg)
    return np.where(finite, array, 0).astype(array.dtype), GeometryCheck(
        "finite_values", "warned", f"{n_bad} NaN/Inf voxel(s) replaced by 0")


# ---------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesSummary:
    """One series found in a folder (no patient data)."""

    series_uid: str
    description: str
    modality: str
    n_files: int

    def line(self) -> str:
        desc = self.description or "(no description)"
        return f"  {self.series_uid}  {self.modality or '?':<3} {self.n_files:>4} file(s)  {desc}"


@dataclass(frozen=True)
class DicomSelection:
    """The validated, ordered files of one DICOM series and what was checked.

    Attributes:
        header_affine: the RAS voxel-to-world affine of the ``(column, row, slice)`` grid
            recomputed from the headers (sorted positions, orientation, pixel spacing), or
            ``None`` where the headers place nothing (a multi-frame image without plane
            positions). The loaded grid is compared with it.
        header_columns: how many columns of ``header_affine`` the headers determine: 3, or
            2 where the slice axis is not fixed by them (one slice, or an accepted tilt or
            irregular stack, which the reader resamples).
        frame_order: for a multi-frame file, the frame indices (0-based, file order) in
            spatial order along the slice normal; ``None`` otherwise.
        float_pixels: some slice's Rescale Slope/Intercept is non-integer or they differ
            between slices: read the pixels as floats, never in the first slice's type.
    """

    folder: Path | None
    files: tuple[Path, ...]          # ordered along the slice normal
    headers: tuple[Any, ...]         # pydicom datasets without pixel data, same order
    series_uid: str
    checks: tuple[GeometryCheck, ...]
    n_frames: int
    header_affine: np.ndarray | None = None
    header_columns: int = 3
    frame_order: tuple[int, ...] | None = None
    float_pixels: bool = False


_SKIP_NAMES = {"DICOMDIR"}


def _read_header(path: Path) -> Any:
    """Read a DICOM header (pixel data deferred) and check the file is complete."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError as exc:
        raise NotAnImageError(
            f"{path}: is not a DICOM file ({exc}); remove it from the series folder, or set "
            "geometry.ignore_non_dicom: true to skip it."
        ) from exc
    except Exception as exc:  # pydicom raises various errors on a cut-off header
        raise GeometryError(
            f"{path}: cannot be read as DICOM; the file is truncated or corrupt ({exc}). "
            "Copy the series again from its source."
        ) from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise NotAnImageError(
            f"{path}: is a DICOM object without pixel data (SOP class "
            f"{getattr(ds, 'SOPClassUID', '?')}), not an image; remove it from the series folder."
        )
    elem = ds.get_item("PixelData", keep_deferred=True)  # its size only: never read it here
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    size = path.stat().st_size
    if length is not None and tell is not None and length != 0xFFFFFFFF and tell + length > size:
        raise GeometryError(
            f"{path}: is truncated: its pixel data should end at byte {tell + length} but the "
            f"file has {size} bytes. Copy the series again from its source."
        )
    if length is not None and length != 0xFFFFFFFF and "Rows" in ds and "Columns" in ds:
        expected = (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1))
                    * int(getattr(ds, "NumberOfFrames", 1) or 1)
                    * int(getattr(ds, "BitsAllocated", 16)) // 8)
        if length < expected:
            raise GeometryError(
                f"{path}: pixel data holds {length} bytes but Rows x Columns x frames needs "
                f"{expected}; the file is truncated or inconsistent."
            )
    return ds


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.upper() not in _SKIP_NAMES
    )


def list_series(folder: str | Path, *, options: GeometryOptions | None = None
                ) -> list[SeriesSummary]:
    """The image series in ``folder`` (GDCM discovery, pydicom for descriptions/counts)."""
    folder = check_readable(folder)
    series, _ = _scan_folder(folder, GeometryOptions.from_mapping(options))
    return [s for s, _ in series.values()]


def _scan_folder(folder: Path, options: GeometryOptions
                 ) -> tuple[dict[str, tuple[SeriesSummary, list[tuple[Path, Any]]]],
                            list[GeometryCheck]]:
    checks: list[GeometryCheck] = []
    by_uid: dict[str, list[tuple[Path, Any]]] = {}
    skipped = []
    files = _candidate_files(folder)
    if not files:
        raise GeometryError(f"{folder}: the folder holds no files; expected a DICOM series.")
    for f in files:
        if not os.access(f, os.R_OK):
            raise PermissionError(f"{f}: cannot be read (permission denied); check its permissions.")
        try:
            ds = _read_header(f)
        except NotAnImageError:
            if not options.ignore_non_dicom:
                raise
            skipped.append(f.name)
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", ""))
        by_uid.setdefault(uid, []).append((f, ds))
    if skipped:
        log.warning("%s: skipped %d non-DICOM/non-image file(s)", folder, len(skipped))
        checks.append(GeometryCheck("non_dicom_files", "warned",
                                    f"skipped {len(skipped)} non-DICOM or non-image file(s)"))
    else:
        checks.append(GeometryCheck("non_dicom_files", "passed", "every file is a DICOM image"))
    out = {}
    for uid, items in by_uid.items():
        ds0 = items[0][1]
        out[uid] = (SeriesSummary(uid, str(getattr(ds0, "SeriesDescription", "") or ""),
                                  str(getattr(ds0, "Modality", "") or ""), len(items)), items)
    if not out:
        raise GeometryError(f"{folder}: no DICOM image files found.")
    return out, checks


def _vec(ds: Any, keyword: str, n: int, path: Path) -> np.ndarray:
    value = getattr(ds, keyword, None)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        out = None
    if out is None or out.shape != (n,):
        raise GeometryError(
            f"{path}: has no valid {keyword}; its position in space is unknown, so a map could "
            "not be placed on it. Only images with Image Position/Orientation (Patient) are supported."
        )
    if not np.all(np.isfinite(out)):
        raise GeometryError(f"{path}: {keyword} {out.tolist()} holds NaN or Inf values; the "
                            "header is corrupt. Export the series again.")
    return out


def _check_plane(ds: Any, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Image Orientation (orthonormal) and Pixel Spacing (finite, > 0) of one image plane.

    Returns:
        ``(iop, pixel_spacing)`` as floats.
    """
    iop = _vec(ds, "ImageOrientationPatient", 6, path)
    ps = _vec(ds, "PixelSpacing", 2, path)
    if np.any(ps <= 0):
        raise GeometryError(
            f"{path}: Pixel Spacing {ps.tolist()} mm is zero or negative; the voxel size is "
            "unknown and no size may be assumed. Fix the header (or export the series again)."
        )
    row, col = iop[:3], iop[3:]
    norms = np.array([np.linalg.norm(row), np.linalg.norm(col)])
    cos = float(row @ col) / max(float(norms.prod()), 1e-12)
    if np.any(np.abs(norms - 1) > 1e-3) or abs(cos) > 1e-3:
        raise GeometryError(
            f"{path}: Image Orientation (Patient) {iop.round(6).tolist()} is not two orthogonal "
            f"unit vectors (lengths {norms.round(6).tolist()}, cosine between them "
            f"{cos:.6f}); the image plane is undefined. Fix the header: it must hold the "
            "direction cosines of the rows and columns."
        )
    return iop, ps


def _affine_from_plane(position: np.ndarray, iop: np.ndarray, ps: np.ndarray,
                       slice_step: np.ndarray) -> np.ndarray:
    """RAS affine of the (column, row, slice) index from DICOM plane attributes (LPS)."""
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * ps[1]      # along a row: column index, column spacing
    lps[:3, 1] = iop[3:] * ps[0]      # down a column: row index, row spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = position
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


_MULTIFRAME_RESCALE = GeometryCheck(
    "rescale", "passed", "multi-frame: each frame's own pixel value transformation applied, as floats")


def _rescale_check(headers: list[Any], source: str) -> tuple[bool, GeometryCheck]:
    """Whether pixels must be read as floats: any non-integer or varying slope/intercept."""
    pairs = set()
    for ds in headers:
        try:
            slope = getattr(ds, "RescaleSlope", None)
            intercept = getattr(ds, "RescaleIntercept", None)
            slope = 1.0 if slope is None or slope == "" else float(slope)
            intercept = 0.0 if intercept is None or intercept == "" else float(intercept)
        except (TypeError, ValueError) as exc:
            raise GeometryError(f"{source}: Rescale Slope/Intercept is not a number ({exc}).") from exc
        if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
            raise GeometryError(
                f"{source}: Rescale Slope {slope} / Intercept {intercept} cannot map stored "
                "values to real ones (zero or not finite); fix the header."
            )
        pairs.add((slope, intercept))
    fractional = any(s != round(s) or i != round(i) for s, i in pairs)
    if fractional or len(pairs) > 1:
        return True, GeometryCheck(
            "rescale", "passed",
            f"{len(pairs)} distinct Rescale Slope/Intercept pair(s)"
            + (", non-integer" if fractional else "") + ": pixels read as floats, per slice")
    return False, GeometryCheck("rescale", "passed", "one integer Rescale Slope/Intercept")


def _check_stack(items: list[tuple[Path, Any]], options: GeometryOptions
                 ) -> tuple[list[tuple[Path, Any]], list[GeometryCheck], np.ndarray, int]:
    """Consistency, ordering, duplicates, tilt and spacing of a multi-file series.

    Returns:
        The items sorted along the slice normal, the checks, the RAS affine recomputed from
        the sorted headers and how many of its columns the headers fix (2 or 3).
    """
    checks = []
    p0, ds0 = items[0]
    ref_size = (int(ds0.Rows), int(ds0.Columns))
    ref_iop, ref_ps = _check_plane(ds0, p0)
    ref_for = getattr(ds0, "FrameOfReferenceUID", None)
    positions = []
    for p, ds in items:
        if (int(ds.Rows), int(ds.Columns)) != ref_size:
            raise GeometryError(
                f"{p}: is {int(ds.Rows)}x{int(ds.Columns)} pixels but {p0.name} is "
                f"{ref_size[0]}x{ref_size[1]}: the series mixes image sizes and is not one volume."
            )
        iop = _vec(ds, "ImageOrientationPatient", 6, p)
        if np.max(np.abs(iop - ref_iop)) > 1e-4:
            raise GeometryError(
                f"{p}: Image Orientation (Patient) {iop.round(5).tolist()} differs from "
                f"{p0.name} ({ref_iop.round(5).tolist()}): mixed orientations are not one volume. "
                "Export the series again, or split it by orientation."
            )
        if np.max(np.abs(_vec(ds, "PixelSpacing", 2, p) - ref_ps)) > 1e-4:
            raise GeometryError(f"{p}: Pixel Spacing differs from {p0.name}: mixed pixel spacing.")
        if getattr(ds, "FrameOfReferenceUID", None) != ref_for:
            raise GeometryError(
                f"{p}: has a different Frame of Reference UID from {p0.name}: the files do not "
                "share one patient coordinate system and cannot form one volume."
            )
        positions.append(_vec(ds, "ImagePositionPatient", 3, p))
    checks.append(GeometryCheck("consistent_orientation", "passed",
                                "one image size, orientation, pixel spacing and frame of reference"))
    row, col = ref_iop[:3], ref_iop[3:]
    normal = np.cross(row, col)
    pos = np.asarray(positions)
    dist = pos @ normal
    order = np.argsort(dist, kind="stable")
    items = [items[i] for i in order]
    pos, dist = pos[order], dist[order]
    if len(items) < 2:
        checks.append(GeometryCheck("slice_spacing", "not_applicable", "single slice"))
        thickness = float(getattr(items[0][1], "SliceThickness", 0) or 0)
        step = normal * (thickness if math.isfinite(thickness) and thickness > 0 else 1.0)
        return items, checks, _affine_from_plane(pos[0], ref_iop, ref_ps, step), 2
    gaps = np.diff(dist)
    median = float(np.median(gaps))
    tol = options.slice_tolerance + 1e-3 + 1e-4 * abs(median)
    dup = np.flatnonzero(gaps <= 1e-3 + 1e-4 * abs(median))
    if dup.size:
        i = int(dup[0])
        raise GeometryError(
            f"{items[i + 1][0]}: has the same slice position ({dist[i + 1]:.3f} mm along the "
            f"normal) as {items[i][0].name}; {dup.size} duplicate position(s) in the series. "
            "Remove the duplicates (often a second acquisition or a localizer) and retry."
        )
    # Gantry tilt: consecutive slices displaced off the image-plane normal.
    step = pos[-1] - pos[0]
    along = float(step @ normal)
    inplane = float(np.linalg.norm(step - along * normal))
    tilt_deg = math.degrees(math.atan2(inplane, abs(along)))
    tag_tilt = float(getattr(items[0][1], "GantryDetectorTilt", 0) or 0)
    if inplane > tol or abs(tag_tilt) > 1e-3:
        tilt = tilt_deg if inplane > tol else abs(tag_tilt)
        msg = (f"{items[0][0].parent}: slices are stacked {tilt:.2f} degrees off the image-plane "
               "normal (gantry tilt)")
        if not options.allow_gantry_tilt:
            raise GeometryError(
                msg + "; the volume is sheared and a map could not be placed exactly. Resample "
                "the series to an orthogonal grid first, or set geometry.allow_gantry_tilt: "
                "true to accept an approximate placement (recorded as a warning)."
            )
        log.warning("%s; accepted (geometry.allow_gantry_tilt)", msg)
        checks.append(GeometryCheck("gantry_tilt", "warned", f"tilt {tilt:.2f} degrees accepted"))
    else:
        checks.append(GeometryCheck("gantry_tilt", "passed", "slices stacked along the normal"))
    bad = np.flatnonzero(np.abs(gaps - median) > tol)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / median
        if abs(ratio - round(ratio)) * median <= tol and round(ratio) >= 2:
            what = (f"{round(ratio) - 1} missing slice(s) between {items[i][0].name} and "
                    f"{items[i + 1][0].name} (gap {gaps[i]:.3f} mm, spacing {median:.3f} mm)")
            name = "missing_slices"
        else:
            what = (f"non-uniform slice spacing: {gaps[i]:.3f} mm between {items[i][0].name} and "
                    f"{items[i + 1][0].name}, {median:.3f} mm elsewhere "
                    f"(tolerance {tol:.4f} mm)")
            name = "slice_spacing"
        msg = f"{items[0][0].parent}: {what}"
        if not options.allow_irregular_slices:
            raise GeometryError(
                msg + ". Re-export the complete series, raise geometry.slice_tolerance, or set "
                "geometry.allow_irregular_slices: true to accept approximate positions "
                "(recorded as a warning)."
            )
        log.warning("%s; accepted (geometry.allow_irregular_slices)", msg)
        checks.append(GeometryCheck(name, "warned", what))
    else:
        checks.append(GeometryCheck("slice_spacing", "passed",
                                    f"{len(items)} slices, uniform spacing {median:.4f} mm"))
    approximate = any(c.status == "warned" for c in checks)
    affine = _affine_from_plane(pos[0], ref_iop, ref_ps, (pos[-1] - pos[0]) / (len(items) - 1))
    return items, checks, affine, 2 if approximate else 3


def _check_multiframe(path: Path, ds: Any, options: GeometryOptions
                      ) -> tuple[list[GeometryCheck], np.ndarray | None, int, tuple[int, ...] | None]:
    """Per-frame positions of an enhanced multi-frame image: uniform, untilted, no duplicates.

    Returns:
        The checks, the header affine (``None`` without plane positions), its fixed columns
        and the frames' spatial order (0-based frame indices sorted along the normal).
    """
    frames = getattr(ds, "PerFrameFunctionalGroupsSequence", None)
    shared = getattr(ds, "SharedFunctionalGroupsSequence", [None])[0]
    if not frames:
        log.warning("%s: multi-frame image without per-frame plane positions", path)
        return [GeometryCheck("scanner_position", "warned",
                              "multi-frame image without per-frame plane positions: "
                              "voxel grid only, scanner position unknown")], None, 0, None
    fake = []
    for i, fg in enumerate(frames):
        pos = getattr(fg, "PlanePositionSequence", None)
        ori = getattr(fg, "PlaneOrientationSequence", None) or (
            getattr(shared, "PlaneOrientationSequence", None) if shared is not None else None)
        meas = getattr(fg, "PixelMeasuresSequence", None) or (
            getattr(shared, "PixelMeasuresSequence", None) if shared is not None else None)
        if not pos or not ori or not meas:
            raise GeometryError(
                f"{path}: frame {i + 1} has no plane position/orientation/pixel measures; the "
                "frames cannot be placed in space."
            )
        import pydicom

        d = pydicom.Dataset()
        d.Rows, d.Columns = ds.Rows, ds.Columns
        d.ImagePositionPatient = pos[0].ImagePositionPatient
        d.ImageOrientationPatient = ori[0].ImageOrientationPatient
        d.PixelSpacing = meas[0].PixelSpacing
        d.FrameOfReferenceUID = getattr(ds, "FrameOfReferenceUID", None)
        fake.append((Path(f"{path}#frame{i + 1}"), d))
    if len(fake) != int(getattr(ds, "NumberOfFrames", 1) or 1):
        raise GeometryError(
            f"{path}: has {len(fake)} per-frame functional group items for "
            f"{int(getattr(ds, 'NumberOfFrames', 1) or 1)} frames; the header is inconsistent."
        )
    ordered, checks, affine, ncols = _check_stack(fake, options)
    order = tuple(int(str(p).rsplit("#frame", 1)[1]) - 1 for p, _ in ordered)
    if order != tuple(range(len(order))):
        checks.append(GeometryCheck("frame_order", "passed",
                                    "frames stored out of spatial order: sorted along the normal"))
    return checks, affine, ncols, order


def validate_dicom(path: str | Path, *, series_uid: str | None = None,
                   options: GeometryOptions | None = None) -> DicomSelection:
    """Validate a DICOM series folder (or single DICOM file) from its headers.

    Args:
        path: a folder holding one (or, with ``series_uid``, several) series, or one file.
        series_uid: the Series Instance UID to use when the folder holds several.
        options: validation options.

    Returns:
        The selected series' files in slice order, their headers and the checks done.

    Raises:
        GeometryError: any problem listed in the module docstring.
    """
    options = GeometryOptions.from_mapping(options)
    p = check_readable(path)
    if p.is_file():
        ds = _read_header(p)
        n_frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        checks = [check_voxel_limit(int(ds.Rows) * int(ds.Columns) * n_frames, str(p), options)]
        float_pixels, rescale = _rescale_check([ds], str(p))
        if n_frames > 1:
            float_pixels, rescale = True, _MULTIFRAME_RESCALE
        checks.append(rescale)
        order = None
        if n_frames > 1:
            more, affine, ncols, order = _check_multiframe(p, ds, options)
            checks += more
        else:
            if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
                raise GeometryError(
                    f"{p}: is a single 2-D image without Image Position/Orientation (Patient) "
                    f"(modality {getattr(ds, 'Modality', '?')}, e.g. CR, DX or a secondary "
                    "capture): it has no place in 3-D space, and the models here need a 3-D "
                    "volume. Give a CT/MR series folder or a multi-frame volume instead."
                )
            _, _, affine, ncols = _check_stack([(p, ds)], options)
            checks.append(GeometryCheck("slice_spacing", "not_applicable", "single image"))
        return DicomSelection(None, (p,), (ds,), str(getattr(ds, "SeriesInstanceUID", "")),
                              tuple(checks), n_frames, header_affine=affine,
                              header_columns=ncols, frame_order=order, float_pixels=float_pixels)

    series, checks = _scan_folder(p, options)
    if series_uid is not None:
        if series_uid not in series:
            listing = "\n".join(s.line() for s, _ in series.values())
            raise GeometryError(
                f"{p}: holds no series with UID {series_uid}. Series in this folder:\n{listing}"
            )
        uid = series_uid
    elif len(series) > 1:
        listing = "\n".join(s.line() for s, _ in series.values())
        raise GeometryError(
            f"{p}: holds {len(series)} DICOM series; choose one with --series-uid "
            f"(series_uid=...). Series in this folder:\n{listing}"
        )
    else:
        uid = next(iter(series))
    summary, items = series[uid]
    checks.append(GeometryCheck("single_series", "passed",
                                f"{len(series)} series in folder; using 1 with {summary.n_files} file(s)"))
    ds0 = items[0][1]
    n_frames = int(getattr(ds0, "NumberOfFrames", 1) or 1)
    if n_frames > 1 and len(items) > 1:
        raise GeometryError(
            f"{p}: the series holds {len(items)} multi-frame files; only a single multi-frame "
            "file or a series of single-frame files is supported."
        )
    checks.append(check_voxel_limit(int(ds0.Rows) * int(ds0.Columns) * n_frames * len(items),
                                    str(p), options))
    order = None
    if n_frames > 1:
        more, affine, ncols, order = _check_multiframe(items[0][0], ds0, options)
        checks += more
    else:
        items, stack_checks, affine, ncols = _check_stack(items, options)
        checks += stack_checks
    float_pixels, rescale = _rescale_check([d for _, d in items], str(p))
    if n_frames > 1:
        float_pixels, rescale = True, _MULTIFRAME_RESCALE
    checks.append(rescale)
    return DicomSelection(p, tuple(f for f, _ in items), tuple(d for _, d in items), uid,
                          tuple(checks), n_frames, header_affine=affine, header_columns=ncols,
                          frame_order=order, float_pixels=float_pixels)


# ---------------------------------------------------------------------------------------
# NIfTI
# ---------------------------------------------------------------------------------------

def validate_nifti(path: str | Path, *, volume_index: int | None = None,
                   options: GeometryOptions | None = None) -> tuple[Any, list[GeometryCheck]]:
    """Validate a NIfTI file from its header (no voxel data read).

    Returns:
        The nibabel image (lazy) and the checks done.

    Raises:
        GeometryError: not NIfTI, truncated, 4-D without ``volume_index`` (or out of range),
            more than 4 dimensions, too many voxels, or a transform :func:`nifti_affine`
            refuses.
    """
    img, checks, _ = validate_nifti_affine(path, volume_index=volume_index, options=options)
    return img, checks


def validate_nifti_affine(path: str | Path, *, volume_index: int | None = None,
                          options: GeometryOptions | None = None
                          ) -> tuple[Any, list[GeometryCheck], np.ndarray]:
    """:func:`validate_nifti`, also returning the checked RAS affine of :func:`nifti_affine`
    (so a loader neither re-reads the header nor logs its warnings twice)."""
    import nibabel as nib

    options = GeometryOptions.from_mapping(options)
    p = check_readable(path)
    if p.is_dir():
        raise GeometryError(f"{p}: is a folder but holds no DICOM series.")
    try:
        img = nib.load(str(p))
    except Exception as exc:
        raise GeometryError(
            f"{p}: cannot be read as NIfTI ({exc}); expected a .nii or .nii.gz file."
        ) from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise GeometryError(f"{p}: is a {type(img).__name__}, not NIfTI; convert it to .nii.gz.")
    checks: list[GeometryCheck] = []
    shape = tuple(int(s) for s in img.shape)
    if not p.name.lower().endswith(".gz"):
        offset = int(img.header.get_data_offset())
        need = offset + int(np.prod(shape)) * img.header.get_data_dtype().itemsize
        if p.stat().st_size < need:
            raise GeometryError(
                f"{p}: is truncated: its header describes {need} bytes but the file has "
                f"{p.stat().st_size}. Copy it again from its source."
            )
    while len(shape) > 4 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise GeometryError(
            f"{p}: has {len(shape)} dimensions {shape}; only 3-D volumes and 4-D series of "
            "volumes are supported."
        )
    checks.append(check_voxel_limit(int(np.prod(shape)), str(p), options))
    n_vol = shape[3] if len(shape) == 4 else 1
    if n_vol > 1 and volume_index is None:
        raise GeometryError(
            f"{p}: is 4-D with {n_vol} volumes (shape {shape}); choose one with --volume-index "
            f"(volume_index=0..{n_vol - 1})."
        )
    if volume_index is not None and not 0 <= volume_index < n_vol:
        raise GeometryError(
            f"{p}: volume_index {volume_index} is out of range; the file holds {n_vol} volume(s) "
            f"(0..{n_vol - 1})."
        )
    checks.append(GeometryCheck("volume_selection", "passed" if n_vol > 1 else "not_applicable",
                                f"volume {volume_index} of {n_vol}" if n_vol > 1 else "3-D"))
    dtype = img.header.get_data_dtype()
    if np.issubdtype(dtype, np.complexfloating):
        msg = (f"{p}: holds complex values ({dtype}); a CAM needs real intensities and the "
               "imaginary part would be lost")
        if options.complex_values != "magnitude":
            raise GeometryError(
                msg + ". Convert it to magnitude (or phase) first, or set "
                "geometry.complex_values: magnitude to use the magnitude (recorded as a warning)."
            )
        log.warning("%s; using the magnitude (geometry.complex_values)", msg)
        checks.append(GeometryCheck("complex_values", "warned",
                                    f"complex {dtype} values: magnitude used"))
    affine, transform_checks = nifti_affine(img, p, options)
    checks += transform_checks
    return img, checks, affine


def _usable_affine(a: np.ndarray) -> str | None:
    """Why a voxel-to-world affine cannot place voxels (None if it can)."""
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        return "holds NaN or Inf values"
    zooms = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(zooms <= 1e-9):
        return f"has a zero voxel size (column lengths {zooms.round(6).tolist()} mm)"
    if abs(float(np.linalg.det(a[:3, :3]))) <= 1e-9 * float(np.prod(zooms)):
        return "is singular (its axes are not independent)"
    unit = a[:3, :3] / zooms
    off = unit.T @ unit - np.eye(3)
    if float(np.max(np.abs(off))) > 1e-3:
        return (f"is sheared (axes not orthogonal: largest cosine {float(np.max(np.abs(off))):.4f})"
                "; a map could not be written with the same geometry")
    return None


def _raw_header(img: Any, path: Path) -> Any:
    """The header as stored: nibabel's loader silently repairs it (zero pixdim becomes 1 mm,
    negative pixdim positive), and a repaired header must not pass validation."""
    import nibabel as nib

    try:
        with nib.openers.ImageOpener(str(path)) as fh:
            return type(img.header).from_fileobj(fh, check=False)
    except Exception:  # a header nibabel cannot re-read raw: use the one it loaded
        return img.header


def nifti_affine(img: Any, path: str | Path, options: GeometryOptions | None = None
                 ) -> tuple[np.ndarray, list[GeometryCheck]]:
    """The voxel-to-world (RAS) affine a NIfTI's header defines, checked.

    The sform is used when set, else the qform, else the voxel sizes (position unknown,
    a recorded warning), as nibabel does. A transform that is singular, has zero, negative
    or non-finite voxel sizes, or is sheared is refused; an sform and a qform that disagree
    by more than ``geometry_tolerance`` (mm) are refused unless ``options.nifti_transform``
    names the one to use (a recorded warning). The check records which one was used.

    Raises:
        GeometryError: as above; the message names the file, the transform and the fix.
    """
    options = GeometryOptions.from_mapping(options)
    p = Path(path)
    hdr = _raw_header(img, p)
    sform_code = int(hdr["sform_code"]) if "sform_code" in hdr else 0
    qform_code = int(hdr["qform_code"]) if "qform_code" in hdr else 0
    zooms = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if sform_code == 0 and qform_code == 0:
        if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
            raise GeometryError(
                f"{p}: has no qform/sform and its voxel sizes (pixdim {zooms.tolist()}) are "
                "zero, negative or not finite: the voxel size is unknown and none may be "
                "assumed. Fix the header."
            )
        log.warning("%s: no qform/sform; the position in scanner space is unknown", p)
        return np.asarray(img.affine, dtype=np.float64), [GeometryCheck(
            "scanner_position", "warned",
            "no qform/sform in the header: voxel spacing only, scanner position unknown")]
    candidates: dict[str, np.ndarray] = {}
    problems: dict[str, str] = {}
    if sform_code > 0:
        candidates["sform"] = np.asarray(hdr.get_sform(), dtype=np.float64)
    if qform_code > 0:
        try:
            candidates["qform"] = np.asarray(hdr.get_qform(), dtype=np.float64)
        except Exception as exc:  # nibabel refuses e.g. negative pixdim
            candidates["qform"] = np.full((4, 4), np.nan)
            problems["qform"] = f"cannot be built ({exc})"
        if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
            problems["qform"] = f"has zero, negative or non-finite voxel sizes (pixdim {zooms.tolist()})"
    for name, a in candidates.items():
        why = _usable_affine(a)
        if why and name not in problems:
            problems[name] = why
    chosen = "sform" if "sform" in candidates else "qform"
    conflict = ""
    if len(candidates) == 2 and not problems:
        diff = float(np.max(np.abs(candidates["sform"] - candidates["qform"])))
        if diff > options.geometry_tolerance:
            conflict = (f"its sform and qform disagree by up to {diff:.4g} mm (readers that "
                        "prefer the qform, such as SimpleITK, would place it elsewhere)")
    elif len(candidates) == 2 and len(problems) == 1:
        bad = next(iter(problems))
        conflict = f"its {bad} {problems[bad]} while its {'qform' if bad == 'sform' else 'sform'} is usable"
    if len(problems) == len(candidates):
        detail = "; ".join(f"its {k} {v}" for k, v in problems.items())
        raise GeometryError(f"{p}: {detail}. The voxels cannot be placed in space; fix the header.")
    if conflict:
        pick = options.nifti_transform
        if pick == "refuse" or pick not in candidates or pick in problems:
            usable = [k for k in candidates if k not in problems]
            raise GeometryError(
                f"{p}: {conflict}. Fix the header, or set geometry.nifti_transform to "
                f"{' or '.join(repr(u) for u in usable)} to choose the transform to use "
                "(recorded as a warning)."
            )
        log.warning("%s: %s; using the %s (geometry.nifti_transform)", p, conflict, pick)
        return candidates[pick], [GeometryCheck(
            "nifti_transform", "warned", f"{conflict}; the {pick} was used (as chosen)")]
    if chosen in problems:
        raise GeometryError(f"{p}: its {chosen} {problems[chosen]}. Fix the header.")
    other = " (the qform agrees)" if len(candidates) == 2 else ""
    return candidates[chosen], [GeometryCheck(
        "nifti_transform", "passed",
        f"{chosen} used (sform_code {sform_code}, qform_code {qform_code}){other}")]
