"""Writers for maps on the scan's own grid: NIfTI and DICOM Parametric Map.

* :func:`write_nifti`: float32 NIfTI-1 with the map's (= the source's) RAS affine as both
  sform and qform, the source's qform/sform codes (scanner-anatomical for DICOM input),
  millimetre units and ``cal_min``/``cal_max`` 0..1; never an identity affine by accident.
* :func:`write_parametric_map`: a DICOM Parametric Map (highdicom), by default float pixel
  data quantised to multiples of 2**-16 in the Deflated Explicit VR Little Endian transfer
  syntax (read by dcmqi, highdicom and pydicom; a twentieth of the float32 bytes for the
  example CT pipeline's map); uncompressed float32, and unsigned 16-bit pixels with a Real
  World Value Mapping (uncompressed, deflated, JPEG-LS or RLE lossless) on request. One
  frame per source slice, referencing the source series, its quantity coded as a
  class-activation map, and the algorithm (name, version, method and parameters) identified
  in the Contributing Equipment and the frames' derivation description. Frame ``i`` holds
  the map slice at its own position (checked against the loaded grid, which is sorted
  along the normal, so a multi-frame source stored out of order is right); frames are
  stored ascending along the normal; the pixel data is encoded a few frames at a time
  while the file is written. The Frame Anatomy (with the source's side as Frame
  Laterality, else unpaired) is shared by all frames (dcmqi needs it) and replaces the
  series-level Laterality, which must then be absent; a de-identified source whose Type 2
  patient/study attributes are missing or empty gives them empty.

Both write atomically (temporary file, fsync, rename) and refuse to overwrite unless asked.
No output path is ever built from a DICOM tag value.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import json
import logging
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icam_med._version import __version__
from icam_med.io.atomic import atomic_write, check_writable

__all__ = ["CAM_QUANTITY_CODE", "FLOAT_QUANTUM", "quantise_float", "quantise_map_",
           "quantise_uint16", "write_nifti", "write_parametric_map"]

log = logging.getLogger(__name__)

#: gzip level of ``.nii.gz`` maps, chosen by measurement (scripts/bench_outputs.py): on a
#: smooth 256x256x150 float32 map every level from 1 to 9 gives 0.75-0.754 of the raw
#: bytes (the low mantissa bits do not compress), and level 1 is the fastest. The maps
#: explain writes are quantised first (:func:`quantise_map_`): a 512x512x300 CT's map then
#: gzips at level 1 to 11.9 MB instead of 32.4 MB (ISA-L, 0.19 s either way).
NIFTI_GZIP_LEVEL = 1

# No standard code exists for a class-activation map: a private (99-prefixed) coding scheme.
CAM_CODING_SCHEME = "99ICAMMED"
CAM_QUANTITY_CODE = ("ICAM-CAM", CAM_CODING_SCHEME, "Class activation map")


def _map_array(cam_map: Any) -> np.ndarray:
    a = cam_map.detach().cpu().numpy() if isinstance(cam_map, torch.Tensor) else np.asarray(cam_map)
    if a.ndim == 4:
        if a.shape[0] != 1:
            raise ValueError(f"expected a single-channel map (1, X, Y, Z), got shape {a.shape}.")
        a = a[0]
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D map (X, Y, Z) or (1, X, Y, Z), got shape {a.shape}.")
    a = np.asarray(a, dtype=np.float32)  # no copy of a float32 map
    if not np.isfinite(a).all():
        raise ValueError("the map holds NaN or Inf values; refusing to write it.")
    return a


def _affine_of(cam_map: Any, affine: Any) -> np.ndarray:
    if affine is None:
        affine = getattr(cam_map, "affine", None)
    if affine is None:
        raise ValueError(
            "no affine: pass the map as a MetaTensor from icam_med (it carries the source "
            "affine) or give affine=...; a map is never written with an assumed identity affine."
        )
    a = np.asarray(torch.as_tensor(affine).cpu(), dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)) or abs(np.linalg.det(a[:3, :3])) < 1e-12:
        raise ValueError(f"affine {a.tolist()} is not a valid 4x4 voxel-to-world matrix.")
    return a


def write_nifti(
    cam_map: Any,
    path: str | Path,
    *,
    affine: Any = None,
    reference: Any = None,
    description: str = "icam-med class-activation map",
    overwrite: bool = False,
) -> Path:
    """Write a map as float32 NIfTI on the source grid.

    Args:
        cam_map: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` map; a MetaTensor supplies its affine.
        path: output ``.nii`` or ``.nii.gz`` file.
        affine: RAS affine; default ``cam_map.affine``.
        reference: the source's :class:`~icam_med.io.ScanInfo`: for NIfTI sources its
            qform/sform codes are copied and the affine must equal the source's.
        description: the header's ``descrip`` (truncated to 79 bytes).
        overwrite: replace an existing file.

    Returns:
        The written path.

    Raises:
        ValueError: bad shape, no/invalid affine, or an affine different from the reference.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import nibabel as nib

    p = check_writable(path, overwrite=overwrite)
    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"NIfTI output {p} must end in .nii or .nii.gz.")
    data = _map_array(cam_map)
    aff = _affine_of(cam_map, affine)
    sform_code = qform_code = 1  # NIFTI_XFORM_SCANNER_ANAT: DICOM patient coordinates
    if reference is not None:
        ref_aff = np.asarray(reference.affine, dtype=np.float64)
        if tuple(reference.shape) != data.shape or not np.allclose(ref_aff, aff, atol=1e-4):
            raise ValueError(
                f"the map (shape {data.shape}) is not on the source grid (shape "
                f"{tuple(reference.shape)}) or its affine differs from the source's; invert the "
                "preprocessing first (icam_med.io.Preprocessor.invert)."
            )
        if reference.format == "nifti":
            src = nib.load(str(reference.source_files[0]))
            # Same codes as the source (0/0 stays 0/0: position unknown there too).
            sform_code = int(src.header["sform_code"])
            qform_code = int(src.header["qform_code"])
    img = nib.Nifti1Image(data, aff)
    hdr = img.header
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(aff, code=sform_code)
    hdr.set_qform(aff, code=qform_code)
    hdr.set_xyzt_units(xyz="mm", t="sec")
    hdr["descrip"] = description.encode("ascii", "replace")[:79]
    hdr["intent_name"] = b"CAM"
    hdr["cal_min"], hdr["cal_max"] = 0.0, max(1.0, float(data.max()))
    hdr.set_data_offset(352)  # 348-byte header + 4-byte extension flag (no extensions)
    with atomic_write(p, overwrite=overwrite) as fh:
        out: Any = (_gzip_file(fh, NIFTI_GZIP_LEVEL) if name.endswith(".gz")
                    else contextlib.nullcontext(fh))
        with out as stream:
            stream.write(hdr.binaryblock)
            stream.write(b"\x00" * 4)
            # NIfTI stores x fastest: slab by slab along z, each slab (z, y, x) C-order
            # bytes; never a second full copy of the map in memory.
            step = max(1, 4_000_000 // max(1, data.shape[0] * data.shape[1]))
            for z0 in range(0, data.shape[2], step):
                stream.write(np.ascontiguousarray(
                    data[:, :, z0: z0 + step].transpose(2, 1, 0)).astype("<f4", copy=False)
                    .tobytes())
    log.info("wrote NIfTI map %s (shape %s)", p, data.shape)
    return p


def _deflate_module() -> Any:
    """ISA-L's zlib (pip ``isal``) where installed: the same deflate and gzip formats,
    about 5x faster at level 1 (0.17 s against 0.95 s, and 4 % fewer bytes, for a
    512x512x300 CT's map on the 2-core VM); else the standard library's zlib."""
    try:
        from isal import isal_zlib
    except ImportError:
        return zlib
    return isal_zlib


def _gzip_file(fh: Any, level: int) -> Any:
    """A gzip writer onto ``fh`` (mtime 0: the same map gives the same bytes), ISA-L's
    where installed (levels 0-3; ``level`` is capped at 3)."""
    try:
        from isal import igzip
    except ImportError:
        return gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=level, mtime=0)
    return igzip.IGzipFile(fileobj=fh, mode="wb", compresslevel=min(level, 3), mtime=0)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# Type 2 attributes of the Patient and General Study modules that highdicom copies from the
# first source image: de-identification often removes them; DICOM then wants them empty.
_TYPE2_FROM_SOURCE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                      "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                      "AccessionNumber")

# BodyPartExamined -> SNOMED CT anatomic region (CID 4031) for the Frame Anatomy.
_BODY_PART_SCT = {
    "HEAD": ("69536005", "Head"), "BRAIN": ("12738006", "Brain"),
    "SKULL": ("89546000", "Skull"), "NECK": ("45048000", "Neck"),
    "CHEST": ("51185008", "Chest"), "THORAX": ("51185008", "Chest"),
    "LUNG": ("39607008", "Lung"), "HEART": ("80891009", "Heart"),
    "BREAST": ("76752008", "Breast"), "ABDOMEN": ("818981001", "Abdomen"),
    "LIVER": ("10200004", "Liver"), "KIDNEY": ("64033007", "Kidney"),
    "PELVIS": ("816092008", "Pelvis"), "PROSTATE": ("41216001", "Prostate"),
    "SPINE": ("421060004", "Spine"), "KNEE": ("72696002", "Knee"),
}
_WHOLE_BODY = ("38266002", "Entire body")


# Float Pixel Data, Double Float Pixel Data, Pixel Data
_PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})


def _deidentified_safe(datasets: list[Any]) -> list[Any]:
    """Copies of the source headers with missing Type 2 patient/study attributes empty, and
    an invalid birth date, study date/time or a Patient's Sex outside DICOM's enumeration
    (M, F, O) emptied; without pixel data. The originals are never changed (new element
    objects replace the shared ones; deferred pixel data is not read), and values are never
    logged."""
    import pydicom
    from pydicom.valuerep import DA, TM

    def replace(d: Any, keyword: str, value: str) -> None:
        if keyword in d:
            del d[keyword]  # drop the element shared with the original, then add a new one
        setattr(d, keyword, value)

    out, warned = [], set()
    for ds in datasets:
        # A new top-level mapping of the same (raw, undecoded) elements: replacing one below
        # never touches the original; nested sequences stay shared and are only read.
        # (``ds.keys()``: iterating a Dataset itself would decode every element)
        # No pixel data: highdicom needs none, and the loader's headers hold it deferred
        # (reading it here kept every source slice in memory: 150 MB for 300 CT slices).
        d = pydicom.Dataset({tag: ds.get_item(tag) for tag in ds.keys()  # noqa: SIM118
                             if tag not in _PIXEL_DATA_TAGS})
        if hasattr(ds, "file_meta"):
            d.file_meta = ds.file_meta
        for keyword in _TYPE2_FROM_SOURCE:
            if keyword not in d or d.get(keyword) is None:
                replace(d, keyword, "")
        for keyword, parse in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
            value = d.get(keyword)
            if not value:
                continue
            try:
                parse(str(value))
            except (ValueError, TypeError):
                if keyword not in warned:
                    log.warning("source %s is not a valid DICOM %s; written empty in the map "
                                "(value withheld)", keyword, parse.__name__)
                    warned.add(keyword)
                replace(d, keyword, "")
        sex = str(d.get("PatientSex") or "")
        if sex.upper() not in {"M", "F", "O", ""}:
            replace(d, "PatientSex", "")
        elif sex != sex.upper():
            replace(d, "PatientSex", sex.upper())
        out.append(d)
    return out


def _frame_anatomy(src: Any) -> Any:
    """The Frame Anatomy functional group item: the source's anatomic region where it has
    one (or its Body Part Examined), else the entire body; its laterality, else unpaired."""
    from pydicom import Dataset

    region = None
    shared = getattr(src, "SharedFunctionalGroupsSequence", None)
    for holder in ([shared[0]] if shared else []) + [src]:
        fa = getattr(holder, "FrameAnatomySequence", None)
        if fa and "AnatomicRegionSequence" in fa[0]:
            region = fa[0].AnatomicRegionSequence[0]
            break
        if "AnatomicRegionSequence" in holder:
            region = holder.AnatomicRegionSequence[0]
            break
    if region is None or not all(k in region for k in ("CodeValue", "CodingSchemeDesignator",
                                                       "CodeMeaning")):
        value, meaning = _BODY_PART_SCT.get(str(getattr(src, "BodyPartExamined", "") or "")
                                            .upper(), _WHOLE_BODY)
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = value, "SCT", meaning
    else:
        code = Dataset()
        code.CodeValue = region.CodeValue
        code.CodingSchemeDesignator = region.CodingSchemeDesignator
        code.CodeMeaning = region.CodeMeaning
        region = code
    laterality = str(getattr(src, "Laterality", "") or getattr(src, "ImageLaterality", "")
                     or "").upper()
    item = Dataset()
    item.AnatomicRegionSequence = [region]
    item.FrameLaterality = laterality if laterality in {"R", "L", "B", "U"} else "U"
    return item


def _source_plane_positions(sources: list[Any]) -> list[np.ndarray]:
    """Image Position (Patient) of every source frame, in the sources' frame order."""
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        return [np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
                for fg in sources[0].PerFrameFunctionalGroupsSequence]
    return [np.array([float(v) for v in ds.ImagePositionPatient]) for ds in sources]


def _slices_of_source_frames(scan_info: Any, positions: list[np.ndarray],
                             n_slices: int) -> list[int]:
    """For each frame position (LPS mm), the slice of the loaded grid it lies on.

    Each map frame must hold the map slice at its own position: a multi-frame source may
    store its frames in any order, and the loaded grid is always sorted along the normal.
    Where the loaded grid is an approximation the user accepted (gantry tilt, irregular
    slices) the nearest slice along the normal is taken; otherwise every frame must lie on
    a slice of the grid.

    Raises:
        ValueError: a frame lies off the grid, or two share a slice.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(scan_info.affine, dtype=np.float64)
    inverse = np.linalg.inv(lps)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    approximate = any(c.status == "warned" and c.name in {"gantry_tilt", "slice_spacing",
                                                          "missing_slices"}
                      for c in getattr(scan_info, "checks", ()))
    out = []
    for i, pos in enumerate(positions):
        index = (inverse @ np.r_[pos, 1.0])[:3]
        k = round(float(index[2]))
        off = np.abs(index - [0.0, 0.0, k]) * spacing
        if not 0 <= k < n_slices or (not approximate and float(off.max()) > 1e-2):
            raise ValueError(
                f"{scan_info.path}: source frame {i + 1} at {np.round(pos, 3).tolist()} mm does "
                f"not lie on the loaded grid (off by {float(off.max()):.3g} mm); a Parametric "
                "Map would misplace the map. Use the NIfTI output."
            )
        out.append(k)
    if sorted(out) != list(range(n_slices)):
        raise ValueError(
            f"{scan_info.path}: the source frames do not map one to one onto the "
            f"{n_slices} slices of the loaded grid; a Parametric Map cannot be placed on it."
        )
    return out


def _frames_ascending(pm: Any) -> list[np.ndarray]:
    """Order the map's frames ascending along the image normal (row x column).

    highdicom sorts frames along its own normal, which runs the other way; any order is
    legal DICOM, but dcmqi (3D Slicer's reader) stacks frames in stored order from the
    lowest position, which would turn the map upside down along the slice axis. The
    functional groups and the position index values are reordered together (the pixel data
    is written afterwards, frame by frame from these positions).

    Returns:
        Each stored frame's Image Position (Patient), in the new order.
    """
    fgs = list(pm.PerFrameFunctionalGroupsSequence)
    positions = [np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
                 for fg in fgs]
    if len(fgs) < 2:
        return positions
    iop = np.array([float(v) for v in
                    pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                    .ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    order = np.argsort([float(p @ normal) for p in positions], kind="stable")
    if list(order) == list(range(len(fgs))):
        return positions
    pm.PerFrameFunctionalGroupsSequence = [fgs[i] for i in order]
    pointers = [item.DimensionIndexPointer for item in pm.DimensionIndexSequence]
    position_dim = pointers.index(0x00200032) if 0x00200032 in pointers else None
    if position_dim is not None:
        for rank, fg in enumerate(pm.PerFrameFunctionalGroupsSequence, 1):
            values = fg.FrameContentSequence[0].DimensionIndexValues
            values = list(values) if isinstance(values, list | tuple) or hasattr(
                values, "__iter__") else [values]
            values[position_dim] = rank
            fg.FrameContentSequence[0].DimensionIndexValues = values if len(values) > 1 else rank
    return [positions[i] for i in order]


class _FrameBytes(io.BufferedIOBase):
    """A map's frames as stored pixel bytes, encoded a few frames at a time when read.

    pydicom 3 writes a Pixel Data value given as a readable, seekable buffer chunk by chunk
    (a "buffered" value), so the pixel data of a Parametric Map never exists in memory as a
    whole: frame ``j`` is slice ``slices[j]`` of the ``(X, Y, Z)`` map, encoded by
    ``encode`` (a ``(n, rows, columns)`` float32 slab to little-endian stored values).
    """

    def __init__(self, data: np.ndarray, slices: list[int],
                 encode: Callable[[np.ndarray], np.ndarray], itemsize: int) -> None:
        super().__init__()
        self._data, self._slices, self._encode = data, list(slices), encode
        self._frame_bytes = data.shape[0] * data.shape[1] * itemsize
        self._step = max(1, 8_000_000 // max(1, self._frame_bytes))  # frames per slab
        self._length = len(self._slices) * self._frame_bytes
        self._pos = 0
        self._cached: tuple[int, bytes] = (-1, b"")

    def frames(self, start: int, stop: int) -> np.ndarray:
        """Stored frames ``start:stop`` as an array ``(n, rows, columns)``."""
        slab = np.stack([self._data[:, :, k].T for k in self._slices[start:stop]])
        return self._encode(slab)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = self._length if size is None or size < 0 else min(self._length, self._pos + size)
        parts = []
        slab_bytes = self._step * self._frame_bytes
        while self._pos < end:
            index = self._pos // slab_bytes
            if self._cached[0] != index:
                start = index * self._step
                self._cached = (index, self.frames(start, start + self._step).tobytes())
            offset = self._pos - index * slab_bytes
            part = self._cached[1][offset: offset + end - self._pos]
            parts.append(part)
            self._pos += len(part)
        return b"".join(parts)


class _Deflating:
    """A write-only file object: raw deflate (RFC 1951, as DICOM's Deflated transfer syntax
    needs) of everything written, onto ``fh``."""

    def __init__(self, fh: Any, level: int) -> None:
        self._fh = fh
        z = _deflate_module()
        self._z = z.compressobj(min(level, 3) if z is not zlib else level, z.DEFLATED,
                                -zlib.MAX_WBITS)
        self.written = 0  # deflated bytes
        self._position = 0  # bytes given

    def write(self, data: bytes) -> int:
        out = self._z.compress(data)
        self._fh.write(out)
        self.written += len(out)
        self._position += len(data)
        return len(data)

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: 0, io.SEEK_CUR: self._position}.get(whence, -1) + offset
        if target != self._position:
            raise io.UnsupportedOperation("a deflating stream is written straight through")
        return self._position

    def finish(self) -> None:
        out = self._z.flush()
        self._fh.write(out)
        self.written += len(out)
        if self.written % 2:  # PS3.5 A.5: a deflated stream of odd length gets a null byte
            self._fh.write(b"\x00")


@contextlib.contextmanager
def _buffered_read_size(size: int) -> Iterator[None]:
    """pydicom reads buffered values in ``size`` chunks meanwhile (its default, 8 KiB,
    costs a second of Python calls per 300 MB of pixel data)."""
    from pydicom.config import settings

    before = settings.buffered_read_size
    settings.buffered_read_size = size
    try:
        yield
    finally:
        settings.buffered_read_size = before


def _save_deflated(pm: Any, fh: Any, level: int) -> None:
    """Write ``pm`` with the Deflated Explicit VR Little Endian transfer syntax, streamed.

    pydicom deflates a whole encoded dataset held in memory; here the file meta is written
    as is and the dataset through a deflating stream, so the pixel data (a buffered value)
    goes from the map to the file a few frames at a time."""
    from pydicom.dataset import validate_file_meta
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = pm.file_meta
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = pm.SOPClassUID
    meta.MediaStorageSOPInstanceUID = pm.SOPInstanceUID
    validate_file_meta(meta, enforce_standard=True)
    head = DicomFileLike(fh)
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(pm.preamble)
    head.write(b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    sink = _Deflating(fh, level)
    body = DicomFileLike(sink)
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, pm)
    sink.finish()


# Library messages that quote a header value (a name, a birth date...): withheld.
_QUOTES_VALUES = ("Invalid value for VR", "intended person name", "patient_name",
                  "potentially invalid")


class _NoHeaderValues(logging.Filter):
    """A logging filter dropping pydicom's and highdicom's messages that quote header values."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg)
        return not any(q in text for q in _QUOTES_VALUES)


@contextlib.contextmanager
def _header_values_withheld() -> Iterator[None]:
    """No warning or log record quoting a header value reaches a terminal meanwhile."""
    quiet = _NoHeaderValues()
    loggers = [logging.getLogger(name) for name in ("pydicom", "highdicom", "highdicom.base")]
    for lg in loggers:
        lg.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            for q in _QUOTES_VALUES:
                warnings.filterwarnings("ignore", message=f".*{q}.*")
            yield
    finally:
        for lg in loggers:
            lg.removeFilter(quiet)


#: Float Parametric Maps written deflated hold the map quantised to multiples of 2**-16
#: (``round(v * 65536) / 65536``, exact in float32): within 2**-17 of the float map, and the
#: low mantissa bits, which deflate cannot compress, are all zero.
FLOAT_QUANTUM = 2.0 ** -16

#: zlib level of deflated Parametric Maps, chosen by measurement (docs/io.md, "The DICOM
#: Parametric Map"): level 6 saves 15 % more bytes on a 512x512x300 CT's map at 3x the time.
DEFLATE_LEVEL = 1

#: ``compress`` values of :func:`write_parametric_map` (``True`` means ``"jpeg-ls"``,
#: ``False`` ``"none"``).
PM_COMPRESSIONS = ("deflate", "none", "jpeg-ls", "rle")


def _compression(compress: bool | str, pixel_type: str) -> str:
    if pixel_type not in ("uint16", "float32"):
        raise ValueError(f"pixel_type {pixel_type!r}: expected 'uint16' or 'float32'.")
    name = {True: "jpeg-ls", False: "none"}.get(compress, compress)  # type: ignore[call-overload]
    if name not in PM_COMPRESSIONS:
        raise ValueError(f"compress {compress!r}: expected one of {', '.join(PM_COMPRESSIONS)}.")
    if name in ("jpeg-ls", "rle") and pixel_type != "uint16":
        raise ValueError(f"compress={compress!r} needs pixel_type='uint16' (DICOM defines no "
                         "encapsulated compression for float pixel data; 'deflate' compresses "
                         "float maps).")
    return str(name)


def write_parametric_map(
    cam_map: Any,
    scan_info: Any,
    path: str | Path,
    *,
    method: str,
    parameters: Mapping[str, Any] | None = None,
    target_label: str | None = None,
    series_description: str = "icam-med CAM",
    series_number: int = 9001,
    overwrite: bool = False,
    pixel_type: str = "float32",
    compress: bool | str = "deflate",
) -> Path:
    """Write a map on the grid of a DICOM source as a DICOM Parametric Map.

    The default is float pixel data quantised to multiples of :data:`FLOAT_QUANTUM`
    (2**-16; values within 2**-17 of the float map) with the Deflated Explicit VR Little
    Endian transfer syntax: read by dcmqi (3D Slicer's reader), highdicom and pydicom, not by
    dcm2niix (inflate it first) nor directly by dciodvfy (it validates the inflated file).
    Options: ``compress="none"`` (float pixel data exact, uncompressed: every reader);
    ``pixel_type="uint16"``, unsigned 16-bit pixels with a Real World Value Mapping (slope
    ``1/65535``: values within ``1/65535``), with ``compress`` ``"none"``, ``"deflate"``,
    ``"jpeg-ls"`` (JPEG-LS lossless, also ``True``) or ``"rle"`` (RLE lossless); dcmqi
    1.5.7 reads no integer map.

    The pixel data is encoded a few frames at a time while the file is written: no full
    copy of the frames is held in memory.

    Args:
        cam_map: ``(1, X, Y, Z)`` map on the source grid (as from
            :meth:`~icam_med.io.Preprocessor.invert`), values in [0, 1].
        scan_info: the source's :class:`~icam_med.io.ScanInfo` (DICOM format).
        path: output file (e.g. ``out/cam.dcm``); its name is never taken from a tag.
        method: CAM method name (e.g. ``"integrative"``).
        parameters: the method's options, recorded as JSON in the derivation description.
        target_label: class explained (e.g. ``"present"``), for the LUT explanation.
        series_description, series_number: of the new series.
        overwrite: replace an existing file.
        pixel_type: ``"float32"`` (default: float pixel data) or ``"uint16"`` (integer
            pixels + RWVM).
        compress: ``"deflate"`` (default), ``"none"`` (or ``False``), ``"jpeg-ls"`` (or
            ``True``; uint16 only) or ``"rle"`` (uint16 only).

    Returns:
        The written path.

    Raises:
        ValueError: the source is not DICOM, lacks plane positions, the map is not on
            its grid, or an unknown pixel type or compression.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    compression = _compression(compress, pixel_type)
    p = check_writable(path, overwrite=overwrite)
    if scan_info.format != "dicom":
        raise ValueError("a DICOM Parametric Map needs a DICOM source; write NIfTI for NIfTI input.")
    from icam_med.io.radiograph import is_radiograph

    if is_radiograph(scan_info):
        raise ValueError(
            f"{scan_info.path}: is a 2-D image (radiograph) without patient coordinates, where "
            "a Parametric Map's frames cannot be placed; write its Presentation State "
            "(icam_med.io.radiograph.write_presentation_state) and the NIfTI map instead.")
    data = _map_array(cam_map)
    if tuple(scan_info.shape) != data.shape:
        raise ValueError(
            f"the map (shape {data.shape}) is not on the source grid {tuple(scan_info.shape)}; "
            "invert the preprocessing first."
        )
    with _header_values_withheld():
        sources = _deidentified_safe(scan_info.source_datasets())
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        src = sources[0]
        if "PerFrameFunctionalGroupsSequence" not in src or not any(
                "PlanePositionSequence" in fg for fg in src.PerFrameFunctionalGroupsSequence):
            raise ValueError(
                f"{scan_info.path}: the multi-frame source has no per-frame plane positions, so "
                "a Parametric Map cannot be placed on it; use the NIfTI output."
            )
    elif len(sources) != data.shape[2]:
        raise ValueError(
            f"{scan_info.path}: {len(sources)} source image(s) for {data.shape[2]} slice(s)."
        )
    # Every source frame must lie on a slice of the loaded grid (checked before any work).
    _slices_of_source_frames(scan_info, _source_plane_positions(sources), data.shape[2])

    params_json = json.dumps(dict(parameters or {}), sort_keys=True, default=str,
                             separators=(",", ":"))
    description = _truncate(
        f"icam-med {__version__} {method} class-activation map"
        + (f" for class '{target_label}'" if target_label else "")
        + f"; parameters {params_json}", 1024)
    quantity = hd.sr.CodedConcept(*CAM_QUANTITY_CODE)
    encode: Callable[[np.ndarray], np.ndarray]
    if pixel_type == "uint16":
        slope, intercept = _uint16_scale(data)
        value_range: tuple[Any, Any] = (0, _UINT16_MAX)
        window = (32767.5, 65536.0)  # the window applies to stored values: all of them
        encode = functools.partial(_quantised_uint16, slope=slope, intercept=intercept)
        dtype: Any = np.uint16
    else:
        slope, intercept = 1.0, 0.0
        value_range, window = (0.0, 1.0), (0.5, 1.0)
        encode = quantise_float if compression == "deflate" else _float32_le
        dtype = np.float32
    rwvm = hd.pm.RealWorldValueMapping(
        lut_label="ICAM",
        lut_explanation=_truncate(f"{method} CAM" + (f" {target_label}" if target_label else ""), 64),
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=value_range,
        slope=slope,
        intercept=intercept,
        quantity_definition=quantity,
    )
    equipment = hd.ContributingEquipment(
        manufacturer="icam-med",
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_truncate(f"icam-med {method}", 64),
        software_versions=__version__,
        contribution_description=description,
    )
    # highdicom builds the header from the sources: one frame per source frame, at its
    # position. It is given no real pixels (a read-only zero view of the frames' shape):
    # the pixel data is written from the map, frame by frame, at save time.
    shape = (len(_source_plane_positions(sources)), data.shape[1], data.shape[0])
    with _header_values_withheld():  # highdicom quotes e.g. an unusual Patient's Name
        pm = _parametric_map(hd, sources, np.broadcast_to(np.zeros((), dtype), shape), rwvm,
                             equipment, method, int(series_number), window)
    pm.SeriesDescription = _truncate(series_description, 64)
    if "ContentCreatorName" not in pm:
        pm.ContentCreatorName = ""  # Type 2 in Content Identification: present, empty
    # The side goes in the Frame Anatomy's Frame Laterality (Type 1). General Series
    # Laterality is Type 2C, required only where no Frame Laterality is present: with Frame
    # Anatomy it must be absent (dciodvfy flags it, empty or not).
    if "Laterality" in pm:
        del pm.Laterality
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(sources[0])]
    for fg in pm.PerFrameFunctionalGroupsSequence:
        for item in getattr(fg, "DerivationImageSequence", []):
            item.DerivationDescription = description
    # Frame j holds the map slice at frame j's own position (the grid is sorted along the
    # normal; a multi-frame source may store its frames in any order).
    slices = _slices_of_source_frames(scan_info, _frames_ascending(pm), data.shape[2])
    pixels = _FrameBytes(data, slices, encode, np.dtype(dtype).itemsize)
    keyword = "FloatPixelData" if pixel_type == "float32" else "PixelData"
    for k in ("FloatPixelData", "PixelData"):
        if k in pm:
            del pm[k]
    pm.preamble = b"\x00" * 128
    with _header_values_withheld(), _buffered_read_size(1 << 20), \
            atomic_write(p, overwrite=overwrite) as fh:
        if compression in ("jpeg-ls", "rle"):
            from pydicom.uid import JPEGLSLossless, RLELossless

            # Lossless JPEG-LS (CharLS via pyjpegls, a highdicom dependency) or RLE: read
            # by pydicom, highdicom, dcm2niix and dciodvfy, not by dcmqi 1.5.7 (no
            # encapsulated pixel data). pydicom encodes frames from the whole stored array.
            setattr(pm, keyword, b"")
            pm.compress(JPEGLSLossless if compression == "jpeg-ls" else RLELossless,
                        pixels.frames(0, len(slices)), generate_instance_uid=False,
                        **({"encoding_plugin": "pyjpegls"} if compression == "jpeg-ls" else {}))
            pm.save_as(fh, enforce_file_format=True)
        else:
            setattr(pm, keyword, pixels)  # a buffered value: pydicom reads it chunk by chunk
            if compression == "deflate":
                _save_deflated(pm, fh, DEFLATE_LEVEL)
            else:
                pm.save_as(fh, enforce_file_format=True)  # straight to the temporary file
    log.info("wrote DICOM Parametric Map %s (%d frames, %s, %s, RWVM slope %.6g)", p,
             len(slices), pixel_type, compression, slope)
    return p


_UINT16_MAX = 65535


def _uint16_scale(values: np.ndarray) -> tuple[float, float]:
    """``(slope, intercept)`` of the uint16 mapping of ``values`` (see quantise_uint16)."""
    lo = min(0.0, float(values.min())) if values.size else 0.0
    hi = max(1.0, float(values.max())) if values.size else 1.0
    return (hi - lo) / _UINT16_MAX, lo


def _quantised_uint16(part: np.ndarray, *, slope: float, intercept: float) -> np.ndarray:
    """Stored little-endian uint16 values of a float32 slab (a new array)."""
    part = (np.asarray(part, dtype=np.float32) - np.float32(intercept)) * np.float32(1.0 / slope)
    np.clip(np.rint(part, out=part), 0, _UINT16_MAX, out=part)
    return part.astype("<u2")


def quantise_uint16(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Map values to unsigned 16-bit stored values and their Real World Value Mapping.

    The range is ``[min(0, lo), max(1, hi)]`` (a CAM map in [0, 1] gets slope ``1/65535``,
    intercept 0); stored ``v`` means ``v * slope + intercept``, within ``slope / 2`` of the
    float value (plus float32 rounding: within ``slope`` in all).

    Returns:
        ``(stored, slope, intercept)``.
    """
    a = np.asarray(values, dtype=np.float32)
    slope, lo = _uint16_scale(a)
    stored = np.empty(a.shape, dtype=np.uint16)
    chunk = max(1, 4_000_000 // max(1, int(np.prod(a.shape[1:]))))
    for i in range(0, a.shape[0], chunk):  # slab by slab: no float64 copy of the whole map
        stored[i:i + chunk] = _quantised_uint16(a[i:i + chunk], slope=slope, intercept=lo)
    return stored, float(slope), float(lo)


def quantise_float(values: np.ndarray) -> np.ndarray:
    """``values`` as little-endian float32 multiples of :data:`FLOAT_QUANTUM` (a new array).

    ``round(v * 2**16) / 2**16`` in float32: scaling by a power of two and rounding to an
    integer are exact, so each result is exactly ``k / 65536`` for an integer ``k``, within
    ``2**-17`` of ``v``. Of a value in [0, 1], the 8 low mantissa bits are zero.
    """
    out = np.multiply(values, np.float32(1.0 / FLOAT_QUANTUM), dtype=np.float32)
    np.rint(out, out=out)
    out *= np.float32(FLOAT_QUANTUM)
    return out.astype("<f4", copy=False)


def quantise_map_(cam_map: torch.Tensor) -> torch.Tensor:
    """``cam_map`` clamped to [0, 1] and rounded to multiples of :data:`FLOAT_QUANTUM`, in
    place (returned for chaining): the values every written map holds.

    The same rounding as :func:`quantise_float` (half to even, exact in float32), applied to
    the map on the scan's grid before anything reads it, so the statistics in the record,
    the NIfTI file, the Parametric Map and a viewer all see the same values. Each value moves
    by at most ``2**-17``; the zeroed low mantissa bits make a full-size CT's gzip NIfTI map
    0.37 of its unquantised size (32.4 -> 11.9 MB), and the bytes the coordinator re-hashes
    per scan fall with it.
    """
    q = 1.0 / FLOAT_QUANTUM
    return cam_map.clamp_(0.0, 1.0).mul_(q).round_().mul_(FLOAT_QUANTUM)


def _float32_le(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype="<f4")


def _parametric_map(hd: Any, sources: list[Any], frames: np.ndarray, rwvm: Any,
                    equipment: Any, method: str, series_number: int,
                    window: tuple[float, float]) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian

    return _header_only_parametric_map(hd)(
        source_images=sources,
        pixel_array=frames,
        series_instance_uid=hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="icam-med",
        manufacturer_model_name="icam-med",
        software_versions=__version__,
        device_serial_number="none",
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[rwvm],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=window[0],
                                                         window_width=window[1])],
        transfer_syntax_uid=ExplicitVRLittleEndian,
        content_description=_truncate(f"{method} class-activation map", 64),
        content_creator_name=None,
        content_label="ICAM",
        contributing_equipment=[equipment],
    )


@functools.cache
def _header_only_parametric_map(hd: Any) -> type:
    """highdicom's ParametricMap, less its in-memory pixel data.

    highdicom (0.28) encodes every frame to bytes and joins them: two full copies of the
    pixel data, which :func:`write_parametric_map` writes from the map at save time anyway.
    Here the per-frame bytes are empty (if a later highdicom no longer calls this hook, it
    only costs that memory again: the pixel data is replaced all the same)."""

    class HeaderOnlyParametricMap(hd.pm.ParametricMap):  # type: ignore[misc,name-defined]
        def _encode_pixels_native(self, planes: np.ndarray) -> bytes:
            return b""

    return HeaderOnlyParametricMap
