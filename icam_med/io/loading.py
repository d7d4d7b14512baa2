"""Loading a scan (DICOM series folder, DICOM file or NIfTI file) as a MONAI MetaTensor.

:func:`load_volume` validates the scan's geometry from its headers first
(:mod:`icam_med.io.validation`), then reads it with one MONAI ``LoadImaged`` whose readers
are MONAI's ``NibabelReader`` (NIfTI) and this package's registered
:class:`~icam_med.io.reader.SimpleITKDICOMReader` (DICOM), and returns

* a :class:`monai.data.MetaTensor` of shape ``(1, X, Y, Z)`` (channel first; spatial axes in
  the file's own index order: column, row, slice for DICOM), C-contiguous, whose ``affine``
  maps voxel indices to RAS world millimetres (MONAI's convention), and
* a :class:`ScanInfo` with what the audit record, the writers and the viewer need.

The voxels keep the type they are stored in when it is an 8- or 16-bit integer type (a CT's
int16 Hounsfield units: half the memory of float32, and no full-size float copy until the
preprocessing needs one, see :class:`~icam_med.io.preprocessing.Preprocessor`); every other
type becomes float32 (never float64). The audit's voxel hash is over the values as float32
either way (:func:`icam_med.audit.voxel_sha256`), so it does not depend on this choice.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.io.reader import SimpleITKDICOMReader
from icam_med.io.validation import (
    DicomSelection,
    GeometryCheck,
    GeometryError,
    GeometryOptions,
    check_finite,
    check_readable,
    validate_dicom,
    validate_nifti_affine,
)
from icam_med.paths import is_nifti

__all__ = ["KEPT_DTYPES", "ScanInfo", "detect_format", "load_volume", "make_loader"]

log = logging.getLogger(__name__)

_KEY = "image"

#: Voxel types a loaded volume keeps (float32 holds each of their values exactly); any other
#: type is converted to float32.
KEPT_DTYPES = (np.int8, np.uint8, np.int16, np.uint16)


@dataclass(frozen=True, eq=False)
class ScanInfo:
    """What is known about a loaded scan.

    Raw DICOM UIDs and file paths are kept in memory only: :meth:`to_dict` leaves them out
    unless asked, and the audit module hashes them.

    Attributes:
        path: the path the user gave (folder or file).
        format: ``"dicom"`` or ``"nifti"``.
        modality: DICOM Modality (``"CT"``, ``"MR"``...) or ``None`` for NIfTI.
        shape: spatial shape ``(X, Y, Z)`` of the loaded array (without channel).
        spacing: voxel size in mm along each array axis.
        affine: 4x4 voxel-to-RAS-world affine (float64), as in the MetaTensor.
        orientation: axis codes of the affine, e.g. ``"LPS"`` for an axial DICOM series.
        source_files: the files read, in slice order.
        checks: the geometry checks done, passed or warned.
        volume_index: the volume chosen from a 4-D NIfTI, else ``None``.
        n_volumes: number of volumes in the file (1 for 3-D).
        source_dtype: the stored voxel type (the loaded array keeps it when it is one of
            :data:`KEPT_DTYPES`, else it holds float32).
        series_description: DICOM Series Description (may be empty).
        study_instance_uid, series_instance_uid, frame_of_reference_uid: DICOM UIDs.
        sop_instance_uids: SOP Instance UID of each source file, in slice order.
        sop_class_uid: the source images' SOP Class UID.
        headers: pydicom datasets of the source files without pixel data (for highdicom's
            references); see :meth:`source_datasets`.
    """

    path: Path
    format: str
    modality: str | None
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: np.ndarray
    orientation: str
    source_files: tuple[Path, ...]
    checks: tuple[GeometryCheck, ...]
    volume_index: int | None = None
    n_volumes: int = 1
    source_dtype: str = ""
    series_description: str = ""
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    frame_of_reference_uid: str | None = None
    sop_instance_uids: tuple[str, ...] = ()
    sop_class_uid: str | None = None
    headers: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def warnings(self) -> list[str]:
        """Details of the checks that were accepted with a warning."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status == "warned"]

    def source_datasets(self, *, with_pixels: bool = False) -> list[Any]:
        """The source DICOM datasets (slice order), re-read from disk when needed.

        Args:
            with_pixels: also read the pixel data (default: headers only).
        """
        if self.format != "dicom":
            return []
        if self.headers and not with_pixels:
            return list(self.headers)
        import pydicom

        return [pydicom.dcmread(f, stop_before_pixels=not with_pixels) for f in self.source_files]

    def to_dict(self, *, include_identifiers: bool = False) -> dict[str, Any]:
        """JSON-safe description. Identifiers (paths, UIDs) only with ``include_identifiers``."""
        d: dict[str, Any] = {
            "format": self.format,
            "modality": self.modality,
            "shape": list(self.shape),
            "spacing": [float(s) for s in self.spacing],
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "orientation": self.orientation,
            "n_source_files": len(self.source_files),
            "volume_index": self.volume_index,
            "n_volumes": self.n_volumes,
            "source_dtype": self.source_dtype,
            "checks": [c.to_dict() for c in self.checks],
            "warnings": self.warnings,
        }
        if include_identifiers:
            d.update(
                path=str(self.path),
                source_files=[str(f) for f in self.source_files],
                series_description=self.series_description,
                study_instance_uid=self.study_instance_uid,
                series_instance_uid=self.series_instance_uid,
                frame_of_reference_uid=self.frame_of_reference_uid,
                sop_instance_uids=list(self.sop_instance_uids),
                sop_class_uid=self.sop_class_uid,
            )
        return d


def detect_format(path: str | Path) -> str:
    """``"dicom"`` for a folder or DICOM file, ``"nifti"`` for ``.nii``/``.nii.gz``.

    Raises:
        FileNotFoundError / PermissionError: unreadable path.
        GeometryError: any other file type (the message lists the supported ones).
    """
    from icam_med.io.reader import is_dicom_file

    p = check_readable(path)
    if p.is_dir():
        return "dicom"
    if is_nifti(p):
        return "nifti"
    if is_dicom_file(p):
        return "dicom"
    raise GeometryError(
        f"{p}: is neither a DICOM file (no 'DICM' marker) nor a NIfTI file (.nii/.nii.gz). "
        "Supported inputs: a DICOM series folder, a DICOM file, a NIfTI file."
    )


def make_loader(keys: str | list[str] = "image", *, series_uid: str | None = None,
                file_names: list[str] | None = None, dtype: Any = np.float32) -> Any:
    """A MONAI ``LoadImaged`` that reads NIfTI (nibabel) and DICOM (SimpleITK) alike.

    The :class:`~icam_med.io.reader.SimpleITKDICOMReader` is registered on top of MONAI's
    ``NibabelReader``, so folders and DICOM files go to it and NIfTI files to nibabel. The
    result is channel-first, of type ``dtype`` (``None``: as the reader gives it). Use it as
    the first transform of a user's own pipeline.
    """
    import warnings

    from monai.transforms import LoadImaged

    # LoadImage instantiates every reader MONAI knows; the GPU DICOM reader complains
    # (logger warning + UserWarning) when nvImageCodec is absent. That is not news here.
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            loader = LoadImaged(keys=keys, reader="NibabelReader", image_only=True,
                                ensure_channel_first=True, dtype=dtype)
    finally:
        plugin_log.setLevel(level)
    loader.register(SimpleITKDICOMReader(series_uid=series_uid, file_names=file_names))
    return loader


@functools.lru_cache(maxsize=4)
def _shared_loader(dtype: str | None = None) -> Any:
    """The loader giving ``dtype`` (``None``: the reader's own type; load_volume decides)."""
    return make_loader(_KEY, dtype=None if dtype is None else np.dtype(dtype))


def _nifti_load_dtype(nii: Any) -> str:
    """The type a NIfTI's voxels are loaded in: its stored type in native byte order when
    that is one of :data:`KEPT_DTYPES` and no scaling applies, else float32."""
    stored = np.dtype(nii.get_data_dtype()).newbyteorder("=")
    proxy = nii.dataobj
    slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
    scaled = not (np.all(np.asarray(slope) == 1) and np.all(np.asarray(inter) == 0))
    if not scaled and any(stored == np.dtype(t) for t in KEPT_DTYPES):
        return stored.str
    return np.dtype(np.float32).str


def _kept(image: Any) -> Any:
    """The loaded image in its stored type if that is one of :data:`KEPT_DTYPES`, else in
    float32; C-contiguous (readers hand over transposed views), metadata kept."""
    import torch

    kept = {torch.int8, torch.uint8, torch.int16, torch.uint16}
    if image.dtype not in kept and image.dtype != torch.float32:
        image = image.to(torch.float32)  # one conversion; contiguous like its source
    if not image.is_contiguous():
        image = image.contiguous()
    return image


def _spatial_affine(affine: Any) -> np.ndarray:
    """The 4x4 spatial part of a 5x5 affine MONAI builds for a 4-D (X, Y, Z, T) NIfTI."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    keep = [0, 1, 2, a.shape[0] - 1]
    return a[np.ix_(keep, keep)]


def _axcodes(affine: np.ndarray) -> str:
    import nibabel as nib

    return "".join(c or "?" for c in nib.aff2axcodes(np.asarray(affine)[:4, :4]))


def _as_metatensor(array_xyz: np.ndarray, affine: np.ndarray, path: Path,
                   **extra_meta: Any) -> Any:
    """A channel-first float32 MetaTensor with the metadata MONAI's readers give (plus
    ``extra_meta``, e.g. the 2-D marker of a radiograph)."""
    import torch
    from monai.data import MetaTensor
    from monai.utils import MetaKeys, SpaceKeys

    a = np.ascontiguousarray(array_xyz, dtype=np.float32)[None]
    aff = np.asarray(affine, dtype=np.float64)
    meta = {
        MetaKeys.ORIGINAL_AFFINE: aff.copy(),
        MetaKeys.SPACE: SpaceKeys.RAS,
        MetaKeys.SPATIAL_SHAPE: np.asarray(a.shape[1:]),
        MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
        "spacing": np.linalg.norm(aff[:3, :3], axis=0),
        "filename_or_obj": str(path),
        **extra_meta,
    }
    return MetaTensor(torch.from_numpy(a), affine=torch.as_tensor(aff), meta=meta)


def _hd_affine_ras(vol: Any) -> np.ndarray:
    """highdicom's (slice, row, column) -> LPS affine as our (column, row, slice) -> RAS."""
    perm = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(vol.affine, dtype=np.float64) @ perm


def _load_multiframe(sel: DicomSelection, path: Path, tol: float) -> Any:
    """A multi-frame image with plane positions: frames in spatial order, header affine.

    Frames are read with highdicom (its modality transform applies each frame's own
    rescale) in the order validation sorted them along the slice normal, never in file
    order. highdicom's own volume, where it can build one, is a second opinion: the same
    voxels and grid or a refusal.
    """
    import highdicom as hd

    assert sel.frame_order is not None and sel.header_affine is not None
    image = hd.imread(str(path))
    # Each frame rescaled in float64 (as every earlier version), then held as float32: the
    # same values, without a full-size float64 copy.
    frames = [image.get_frame(i + 1, dtype=np.float64, apply_real_world_transform=False)
              .astype(np.float32) for i in sel.frame_order]
    array_xyz = np.transpose(np.stack(frames), (2, 1, 0))  # (k, r, c) -> (c, r, k)
    try:
        vol = image.get_volume(dtype=np.float32, apply_real_world_transform=False)
    except Exception as exc:  # irregular or tilted stacks: highdicom builds no volume
        log.debug("%s: highdicom built no volume (%s); frames sorted by position only", path, exc)
        return _as_metatensor(array_xyz, sel.header_affine, path)
    other = np.transpose(np.asarray(vol.array, dtype=np.float32), (2, 1, 0))
    other_aff = _hd_affine_ras(vol)
    if other.shape == array_xyz.shape and float(other_aff[:3, 2] @ sel.header_affine[:3, 2]) < 0:
        other = other[:, :, ::-1]  # highdicom stacked the frames the other way round
        last = other_aff @ np.array([0.0, 0.0, other.shape[2] - 1, 1.0])
        other_aff[:3, 2] *= -1
        other_aff[:3, 3] = last[:3]
    if (other.shape != array_xyz.shape or not np.allclose(other, array_xyz, atol=1e-6)
            or not np.allclose(other_aff, sel.header_affine, atol=tol)):
        raise GeometryError(
            f"{path}: the frames sorted by their plane positions do not agree with the volume "
            "highdicom builds from the same headers; the multi-frame header is inconsistent."
        )
    return _as_metatensor(array_xyz, sel.header_affine, path)


def _check_grid(loaded: np.ndarray, expected: np.ndarray | None, columns: int, source: Path,
                tol: float) -> GeometryCheck:
    """The loaded grid against the one recomputed from the headers: equal, or refused."""
    if expected is None:
        return GeometryCheck("header_geometry", "not_applicable",
                             "the headers define no position to compare with")
    cols = [*[0, 1, 2][:columns], 3]
    diff = float(np.max(np.abs(np.asarray(loaded)[:3, cols] - np.asarray(expected)[:3, cols])))
    if not math.isfinite(diff) or diff > tol:
        raise GeometryError(
            f"{source}: the loaded voxel grid differs from the one its headers define by up to "
            f"{diff:.4g} mm (tolerance {tol} mm, geometry.geometry_tolerance): loaded affine "
            f"{np.round(loaded, 4).tolist()}, headers {np.round(expected, 4).tolist()}. The "
            "reader misplaced it; a map on it would be wrong. Check the headers or convert "
            "the scan to NIfTI with a trusted tool."
        )
    what = "origin, axes and spacing" if columns == 3 else "origin and in-plane axes"
    return GeometryCheck("header_geometry", "passed",
                         f"loaded grid equals the headers' ({what}) within {diff:.2g} mm")


def load_volume(
    path: str | Path,
    *,
    series_uid: str | None = None,
    volume_index: int | None = None,
    geometry: GeometryOptions | dict[str, Any] | None = None,
) -> tuple[Any, ScanInfo]:
    """Validate and load one scan.

    Args:
        path: a DICOM series folder, a DICOM file (single or multi-frame) or a NIfTI file.
        series_uid: Series Instance UID to load when the folder holds several series.
        volume_index: the volume to load from a 4-D NIfTI (required for 4-D).
        geometry: validation options (:class:`~icam_med.io.validation.GeometryOptions` or the
            config's ``geometry`` mapping).

    Returns:
        ``(image, info)``: a :class:`~monai.data.MetaTensor` ``(1, X, Y, Z)`` with the RAS
        affine, in the stored voxel type when that is one of :data:`KEPT_DTYPES` (int16 for
        a CT) and float32 otherwise, and its :class:`ScanInfo`.

    Raises:
        FileNotFoundError, PermissionError: the path cannot be read.
        GeometryError (a ValueError): the scan fails validation; the message names the file
            and the problem.
    """
    options = GeometryOptions.from_mapping(geometry)
    fmt = detect_format(path)
    p = Path(path).expanduser()
    from icam_med.io import radiograph  # 2-D images (DX/CR/MG, 2-D NIfTI): their own path

    if volume_index is None and series_uid is None and radiograph.radiograph_source(p):
        return radiograph.load_radiograph(p, geometry=options)
    data_key = _KEY
    if fmt == "dicom":
        if volume_index is not None:
            raise ValueError(f"{p}: volume_index applies to 4-D NIfTI only, not to DICOM.")
        sel = validate_dicom(p, series_uid=series_uid, options=options)
        checks = list(sel.checks)
        reader = SimpleITKDICOMReader(file_names=[str(f) for f in sel.files],
                                      float_pixels=sel.float_pixels)
        source_files = sel.files
        n_volumes = 1
    else:
        if series_uid is not None:
            raise ValueError(f"{p}: series_uid applies to DICOM only, not to NIfTI.")
        nii, checks, header_affine = validate_nifti_affine(p, volume_index=volume_index,
                                                           options=options)
        n_volumes = int(nii.shape[3]) if len(nii.shape) >= 4 else 1
        reader = None
        source_files = (p,)
        source_dtype = str(nii.get_data_dtype())
    complex_nifti = fmt == "nifti" and np.issubdtype(nii.get_data_dtype(), np.complexfloating)
    try:
        if fmt == "dicom" and sel.frame_order is not None:
            image = _load_multiframe(sel, p, options.geometry_tolerance)
        elif complex_nifti:  # validation refused it unless the magnitude was asked for
            data = np.abs(np.asarray(nii.dataobj))
            if data.ndim == 4:
                data = data[..., volume_index or 0]
            while data.ndim > 3:
                data = data[..., 0]
            if data.ndim == 2:
                data = data[..., None]
            image = _as_metatensor(data, header_affine, p)
        else:
            load_dtype = _nifti_load_dtype(nii) if fmt == "nifti" else None
            image = _shared_loader(load_dtype)({data_key: str(p)}, reader)[data_key]
    except (GeometryError, FileNotFoundError, PermissionError):
        raise
    except Exception as exc:
        raise GeometryError(
            f"{p}: could not be decoded ({type(exc).__name__}: {exc}); the file is truncated, "
            "corrupt or uses an unsupported encoding."
        ) from exc
    if fmt == "nifti" and not complex_nifti:
        if image.ndim == 5:  # (1, X, Y, Z, T): NibabelReader keeps time last
            image = image[..., volume_index or 0]
            image.affine = _spatial_affine(image.affine)
            image.meta["original_affine"] = _spatial_affine(image.meta["original_affine"])
            image.meta["spatial_shape"] = np.asarray(image.shape[1:])
        elif image.shape[0] > 1:  # (T, X, Y, Z)
            idx = volume_index or 0
            image = image[idx: idx + 1]
        if image.ndim == 3:  # a 2-D NIfTI: add a singleton slice axis so maps stay 3-D
            image = image.unsqueeze(-1)
    elif fmt == "dicom":
        h = sel.headers[0]
        unsigned = int(getattr(h, "PixelRepresentation", 0)) == 0
        source_dtype = f"{'u' if unsigned else ''}int{int(getattr(h, 'BitsAllocated', 16))}"
    image = _kept(image)
    if image.is_floating_point():
        fixed, finite_check = check_finite(image.numpy(), str(p), options)
        if finite_check.status == "warned":
            import torch

            image = image.clone()
            image.data = torch.as_tensor(fixed)
    else:  # integer voxels are finite: no full-size test array
        finite_check = GeometryCheck("finite_values", "passed", "no NaN/Inf voxels")
    checks.append(finite_check)
    image.meta["filename_or_obj"] = str(p)
    affine = np.asarray(image.affine, dtype=np.float64)
    if fmt == "nifti":
        if affine.shape == (4, 4) and not np.allclose(affine, header_affine, atol=1e-6):
            # The transform validation chose (e.g. the qform, by the user's choice) is not
            # the one nibabel handed MONAI (the sform): put the chosen one on the image.
            image.affine = header_affine.copy()
            image.meta["original_affine"] = header_affine.copy()
            affine = header_affine.copy()
        checks.append(_check_grid(affine, header_affine, 3, p, options.geometry_tolerance))
    else:
        # Positions rounded in their decimal strings, accepted by slice_tolerance, may move
        # the mean slice step that much.
        checks.append(_check_grid(affine, sel.header_affine, sel.header_columns, p,
                                  options.geometry_tolerance + options.slice_tolerance))
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))

    h0 = sel.headers[0] if fmt == "dicom" else None

    def tag(name: str) -> str | None:
        v = getattr(h0, name, None) if h0 is not None else None
        return str(v) if v not in (None, "") else None

    info = ScanInfo(
        path=p,
        format=fmt,
        modality=tag("Modality"),
        shape=tuple(int(s) for s in image.shape[1:]),
        spacing=spacing,
        affine=affine,
        orientation=_axcodes(affine),
        source_files=tuple(Path(f) for f in source_files),
        checks=tuple(checks),
        volume_index=volume_index,
        n_volumes=n_volumes,
        source_dtype=source_dtype,
        series_description=tag("SeriesDescription") or "",
        study_instance_uid=tag("StudyInstanceUID"),
        series_instance_uid=tag("SeriesInstanceUID"),
        frame_of_reference_uid=tag("FrameOfReferenceUID"),
        sop_instance_uids=tuple(str(h.SOPInstanceUID) for h in sel.headers) if h0 else (),
        sop_class_uid=tag("SOPClassUID"),
        headers=tuple(sel.headers) if h0 is not None else (),
    )
    log.info("loaded %s scan %s: shape %s, spacing %s, orientation %s", fmt, p.name,
             info.shape, tuple(round(s, 4) for s in spacing), info.orientation)
    return image, info
