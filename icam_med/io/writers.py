"""Writers for maps on the scan's own grid: NIfTI and DICOM Parametric Map.

* :func:`write_nifti`: float32 NIfTI-1 with the map's (= the source's) RAS affine as both
  sform and qform, the source's qform/sform codes (scanner-anatomical for DICOM input),
  millimetre units and ``cal_min``/``cal_max`` 0..1; never an identity affine by accident.
* :func:`write_parametric_map`: a DICOM Parametric Map (highdicom) with unsigned 16-bit
  pixel data and a Real World Value Mapping (slope 1/65535: values within 1/65535),
  uncompressed (float32 and JPEG-LS lossless on request: dcmqi 1.5.7 reads float pixel
  data only, and no compressed syntax), one frame per source slice, referencing the source series, its quantity coded as a
  class-activation map, and the algorithm (name, version, method and parameters) identified
  in the Contributing Equipment and the frames' derivation description. Frame ``i`` holds
  the map slice at source frame ``i``'s position (checked against the loaded grid, which is
  sorted along the normal, so a multi-frame source stored out of order is right), the Frame Anatomy (with the source's side as Frame Laterality,
  else unpaired) is shared by all frames (dcmqi needs it) and replaces the series-level
  Laterality, which must then be absent; a de-identified
  source whose Type 2 patient/study attributes are missing or empty gives them empty.

Both write atomically (temporary file, fsync, rename) and refuse to overwrite unless asked.
No output path is ever built from a DICOM tag value.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icam_med._version import __version__
from icam_med.io.atomic import atomic_write, check_writable

__all__ = ["CAM_QUANTITY_CODE", "quantise_uint16", "write_nifti", "write_parametric_map"]

log = logging.getLogger(__name__)

#: gzip level of ``.nii.gz`` maps, chosen by measurement (scripts/bench_outputs.py): on a
#: smooth 256x256x150 float32 map every level from 1 to 9 gives 0.75-0.754 of the raw
#: bytes (the low mantissa bits do not compress), and level 1 is the fastest.
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
        out: Any = (gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=NIFTI_GZIP_LEVEL,
                                  mtime=0) if name.endswith(".gz") else contextlib.nullcontext(fh))
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


def _deidentified_safe(datasets: list[Any]) -> list[Any]:
    """Copies of the source headers with missing Type 2 patient/study attributes empty, and
    an invalid birth date, study date/time or a Patient's Sex outside DICOM's enumeration
    (M, F, O) emptied. The originals are never changed (new element objects replace the
    shared ones), and values are never logged."""
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
        d = pydicom.Dataset({tag: ds.get_item(tag) for tag in ds.keys()})  # noqa: SIM118
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


def _slices_of_source_frames(scan_info: Any, sources: list[Any], n_slices: int) -> list[int]:
    """For each source frame (file order), the slice of the loaded grid it lies on.

    The Parametric Map copies each source frame's position and references it, so map
    frame ``i`` must hold the map slice at source frame ``i``'s position: a multi-frame
    source may store its frames in any order, and the loaded grid is always sorted along
    the normal. Where the loaded grid is an approximation the user accepted (gantry tilt,
    irregular slices) the nearest slice along the normal is taken; otherwise every frame
    must lie on a slice of the grid.

    Raises:
        ValueError: a source frame lies off the grid, or two share a slice.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(scan_info.affine, dtype=np.float64)
    inverse = np.linalg.inv(lps)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    approximate = any(c.status == "warned" and c.name in {"gantry_tilt", "slice_spacing",
                                                          "missing_slices"}
                      for c in getattr(scan_info, "checks", ()))
    out = []
    for i, pos in enumerate(_source_plane_positions(sources)):
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


def _frames_ascending(pm: Any) -> None:
    """Store the map's frames in ascending order along the normal (row x column).

    highdicom sorts frames along its own normal, which runs the other way; any order is
    legal DICOM, but dcmqi (3D Slicer's reader) stacks frames in stored order from the
    lowest position, which would turn the map upside down along the slice axis. The
    frames, their functional groups and the position index values are reordered together.
    """
    fgs = list(pm.PerFrameFunctionalGroupsSequence)
    if len(fgs) < 2:
        return
    iop = np.array([float(v) for v in
                    pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
                    .ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    dist = [float(np.array([float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient])
                  @ normal) for fg in fgs]
    order = np.argsort(dist, kind="stable")
    if list(order) == list(range(len(fgs))):
        return
    n, rows, cols = len(fgs), int(pm.Rows), int(pm.Columns)
    keyword = next(k for k in ("FloatPixelData", "DoubleFloatPixelData", "PixelData") if k in pm)
    dtype = {"FloatPixelData": "<f4", "DoubleFloatPixelData": "<f8"}.get(
        keyword, f"<u{int(pm.BitsAllocated) // 8}")
    frames = np.frombuffer(pm[keyword].value, dtype=dtype)[: n * rows * cols].reshape(n, rows, cols)
    setattr(pm, keyword, np.ascontiguousarray(frames[order]).tobytes())
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
    pixel_type: str = "uint16",
    compress: bool = False,
) -> Path:
    """Write a map on the grid of a DICOM source as a DICOM Parametric Map.

    Pixel data are unsigned 16-bit with a Real World Value Mapping (slope ``1/65535``,
    intercept 0 for a map in [0, 1]: values within ``1/65535``: half a step plus float32
    rounding), Explicit VR Little
    Endian: half the bytes of float32; dciodvfy, pydicom, highdicom and dcm2niix read it.
    dcmqi 1.5.7 (3D Slicer's reader) reads float pixel data only: ``pixel_type="float32"``
    writes that. ``compress=True`` stores uint16 frames JPEG-LS lossless (about a third again
    on a smooth map; pydicom, highdicom and dcm2niix read it, dcmqi reads no encapsulated
    pixel data).

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
        pixel_type: ``"uint16"`` (default: integer pixels + RWVM) or ``"float32"`` (float
            pixel data, twice the bytes; the one dcmqi 1.5.7, 3D Slicer's reader, reads).
        compress: JPEG-LS lossless transfer syntax (uint16 only; not read by dcmqi);
            default uncompressed.

    Returns:
        The written path.

    Raises:
        ValueError: the source is not DICOM, lacks plane positions, or the map is not on
            its grid.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if pixel_type not in ("uint16", "float32"):
        raise ValueError(f"pixel_type {pixel_type!r}: expected 'uint16' or 'float32'.")
    if compress and pixel_type != "uint16":
        raise ValueError("compress=True needs pixel_type='uint16' (DICOM defines no "
                         "compression for float pixel data).")
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
    # (X, Y, Z) = (column, row, slice) -> frames (slice, row, column), one per source frame
    # in the source's own frame order: highdicom copies each source frame's position.
    # (Positions passed explicitly would be re-sorted by highdicom, against the normal,
    # an order dcmqi misreads.)
    slices = _slices_of_source_frames(scan_info, sources, data.shape[2])
    # (a view: the uint16 frames are quantised from it slab by slab, with no float copy)
    frames = np.transpose(data, (2, 1, 0))
    if slices != list(range(data.shape[2])):
        frames = frames[slices]

    params_json = json.dumps(dict(parameters or {}), sort_keys=True, default=str,
                             separators=(",", ":"))
    description = _truncate(
        f"icam-med {__version__} {method} class-activation map"
        + (f" for class '{target_label}'" if target_label else "")
        + f"; parameters {params_json}", 1024)
    quantity = hd.sr.CodedConcept(*CAM_QUANTITY_CODE)
    if pixel_type == "uint16":
        stored, slope, intercept = quantise_uint16(frames)
        value_range: tuple[Any, Any] = (0, _UINT16_MAX)
        window = (32767.5, 65536.0)  # the window applies to stored values: all of them
    else:
        stored, slope, intercept = np.ascontiguousarray(frames), 1.0, 0.0
        value_range, window = (0.0, 1.0), (0.5, 1.0)
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
    with _header_values_withheld():  # highdicom quotes e.g. an unusual Patient's Name
        pm = _parametric_map(hd, sources, stored, rwvm, equipment, method, int(series_number),
                             window)
    pm.SeriesDescription = _truncate(series_description, 64)
    if "ContentCreatorName" not in pm:
        pm.ContentCreatorName = ""  # Type 2 in Content Identification: present, empty
    # The side goes in the Frame Anatomy's Frame Laterality (Type 1). General Series
    # Laterality is Type 2C, required only where no Frame Laterality is present: with Frame
    # Anatomy it must be absent (dciodvfy flags it, empty or not).
    if "Laterality" in pm:
        del pm.Laterality
    pm.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = [_frame_anatomy(sources[0])]
    _frames_ascending(pm)
    for fg in pm.PerFrameFunctionalGroupsSequence:
        for item in getattr(fg, "DerivationImageSequence", []):
            item.DerivationDescription = description
    if compress:
        from pydicom.uid import JPEGLSLossless

        # Lossless JPEG-LS (CharLS via pyjpegls, a highdicom dependency): read by pydicom,
        # highdicom and dcm2niix, not by dcmqi 1.5.7 (no encapsulated pixel data; neither RLE
        # nor Deflate is read by all four). Frames are encoded once their order is final.
        pm.compress(JPEGLSLossless, encoding_plugin="pyjpegls")
    pm.preamble = b"\x00" * 128
    with _header_values_withheld(), atomic_write(p, overwrite=overwrite) as fh:
        pm.save_as(fh, enforce_file_format=True)  # straight to the temporary file
    log.info("wrote DICOM Parametric Map %s (%d frames, %s, RWVM slope %.6g%s)", p,
             frames.shape[0], pixel_type, slope, ", JPEG-LS lossless" if compress else "")
    return p


_UINT16_MAX = 65535


def quantise_uint16(values: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Map values to unsigned 16-bit stored values and their Real World Value Mapping.

    The range is ``[min(0, lo), max(1, hi)]`` (a CAM map in [0, 1] gets slope ``1/65535``,
    intercept 0); stored ``v`` means ``v * slope + intercept``, within ``slope / 2`` of the
    float value (plus float32 rounding: within ``slope`` in all).

    Returns:
        ``(stored, slope, intercept)``.
    """
    a = np.asarray(values, dtype=np.float32)
    lo = min(0.0, float(a.min())) if a.size else 0.0
    hi = max(1.0, float(a.max())) if a.size else 1.0
    slope = (hi - lo) / _UINT16_MAX
    stored = np.empty(a.shape, dtype=np.uint16)
    chunk = max(1, 4_000_000 // max(1, int(np.prod(a.shape[1:]))))
    for i in range(0, a.shape[0], chunk):  # slab by slab: no float64 copy of the whole map
        part = (a[i:i + chunk] - np.float32(lo)) * np.float32(1.0 / slope)
        np.clip(np.rint(part, out=part), 0, _UINT16_MAX, out=part)
        stored[i:i + chunk] = part
    return stored, float(slope), float(lo)


def _parametric_map(hd: Any, sources: list[Any], frames: np.ndarray, rwvm: Any,
                    equipment: Any, method: str, series_number: int,
                    window: tuple[float, float]) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian

    return hd.pm.ParametricMap(
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
