"""File-name conventions, owned once.

Every place that recognises a scan by its name, strips a suffix to get a stem, or names an
output file (the fused map, the Parametric Map, the JSON summary, per-layer maps, class
contrasts, the audit record) asks this module. It imports nothing from the rest of the
package, so I/O, audit, batch, report and the napari plugin can all use it.

Example::

    >>> scan_stem("/data/sub-01_T1w.nii.gz")
    'sub-01_T1w'
    >>> output_paths("out", is_dicom=False)["cam_nifti"].name
    'cam.nii.gz'
    >>> record_path_for("out/cam.nii.gz").name
    'cam.icam.json'
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "AUDIT_FOLDER_SUFFIX",
    "DICOM_SUFFIXES",
    "MAP_STEM",
    "NIFTI_SUFFIXES",
    "PARAMETRIC_MAP_SUFFIX",
    "RECORD_SUFFIX",
    "SCANS_DIR",
    "SIDECAR_SUFFIX",
    "SUMMARY_JSON",
    "audit_folder_for",
    "class_stem",
    "is_dicom_name",
    "is_nifti",
    "layer_map_path",
    "map_path",
    "output_paths",
    "parametric_map_path",
    "record_path_for",
    "region_path",
    "safe_layer_name",
    "scan_stem",
    "sidecar_path_for",
    "summary_path",
]

#: NIfTI file endings, longest first so ``x.nii.gz`` never strips to ``x.nii``.
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
#: File endings taken as DICOM by name (the ``DICM`` magic is checked by :mod:`icam_med.io`).
DICOM_SUFFIXES: tuple[str, ...] = (".dcm", ".dicom", ".ima")
#: A map ``x.nii.gz`` has its audit record at ``x.icam.json``.
RECORD_SUFFIX = ".icam.json"
#: The default stem of an explanation's outputs (``cam.nii.gz``, ``cam.icam.json``...).
MAP_STEM = "cam"
#: ``{stem}_summary.json`` lists every output of one explanation with its SHA-256.
SUMMARY_JSON = "summary.json"
#: ``{stem}_parametric_map.dcm`` is the DICOM Parametric Map of a DICOM input.
PARAMETRIC_MAP_SUFFIX = "_parametric_map.dcm"
#: A batch audit folder keeps scan ``S``'s outputs in ``scans/S/``.
SCANS_DIR = "scans"
#: A map saved from napari gets its record or summary beside it as ``x.record.json``.
SIDECAR_SUFFIX = ".record.json"
#: The napari widget's "Save audit" folder for ``/data/t1.nii.gz`` is ``/data/t1_icam/``.
AUDIT_FOLDER_SUFFIX = "_icam"


def _strip(name: str, suffixes: Sequence[str]) -> str | None:
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def is_nifti(path: str | Path) -> bool:
    """True for a name ending in ``.nii`` or ``.nii.gz`` (any case); the file is not opened."""
    return _strip(Path(path).name, NIFTI_SUFFIXES) is not None


def is_dicom_name(path: str | Path) -> bool:
    """True for a name ending in ``.dcm``, ``.dicom`` or ``.ima`` (any case)."""
    return _strip(Path(path).name, DICOM_SUFFIXES) is not None


def scan_stem(path: str | Path) -> str:
    """A scan's name without its file ending.

    ``t1.nii.gz`` -> ``t1``, ``t1.NII`` -> ``t1``, ``slice.dcm`` -> ``slice``; a DICOM series
    folder (or any other name) is kept whole, dots included (``ct.series`` stays). Scan ids,
    record names and the widget's audit folder all start from this stem.
    """
    name = Path(path).name
    stripped = _strip(name, (*NIFTI_SUFFIXES, ".dcm"))
    return stripped if stripped is not None else name


def safe_layer_name(layer: str) -> str:
    """A dotted layer name (``features.3.conv``) as a file-name part (``features-3-conv``)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in layer.replace(".", "-"))


def class_stem(target_class: int) -> str:
    """The output stem of a class-contrast map (``cam_class2``), beside the default ``cam``."""
    return f"{MAP_STEM}_class{int(target_class)}"


def map_path(out_dir: str | Path, stem: str = MAP_STEM) -> Path:
    """The fused map ``{out_dir}/{stem}.nii.gz``."""
    return Path(out_dir) / f"{stem}.nii.gz"


def parametric_map_path(out_dir: str | Path, stem: str = MAP_STEM) -> Path:
    """The DICOM Parametric Map ``{out_dir}/{stem}_parametric_map.dcm``."""
    return Path(out_dir) / f"{stem}{PARAMETRIC_MAP_SUFFIX}"


def layer_map_path(out_dir: str | Path, layer: str, stem: str = MAP_STEM) -> Path:
    """One layer's map ``{out_dir}/{stem}_layer_<layer>.nii.gz``."""
    return Path(out_dir) / f"{stem}_layer_{safe_layer_name(layer)}.nii.gz"


def summary_path(out_dir: str | Path, stem: str = MAP_STEM) -> Path:
    """The JSON summary ``{out_dir}/{stem}_summary.json``."""
    return Path(out_dir) / f"{stem}_{SUMMARY_JSON}"


def region_path(out_dir: str | Path, stem: str = MAP_STEM) -> Path:
    """A segmentation target's region on the scan's grid ``{out_dir}/{stem}_region.nii.gz``."""
    return Path(out_dir) / f"{stem}_region.nii.gz"


def output_paths(out_dir: str | Path, *, is_dicom: bool, layer_names: Sequence[str] = (),
                 stem: str = MAP_STEM, region: bool = False,
                 two_d: bool = False) -> dict[str, Path]:
    """The files one explanation writes, by role (names never come from tags).

    Roles: ``cam_nifti``, ``parametric_map`` (DICOM input only), ``layer_map:<layer>`` per
    layer, ``target_region`` (a segmentation target's region), ``summary``; a 2-D image
    (``two_d``) has ``overlay_png`` and, for DICOM input, ``presentation_state`` (a
    Grayscale Softcopy Presentation State) in place of the Parametric Map.
    """
    paths = {"cam_nifti": map_path(out_dir, stem)}
    if is_dicom and not two_d:
        paths["parametric_map"] = parametric_map_path(out_dir, stem)
    if two_d:  # a 2-D image: a PNG overlay and, for DICOM, a Presentation State instead
        paths["overlay_png"] = Path(out_dir) / f"{stem}_overlay.png"
        if is_dicom:
            paths["presentation_state"] = Path(out_dir) / f"{stem}_gsps.dcm"
    for name in layer_names:
        paths[f"layer_map:{name}"] = layer_map_path(out_dir, name, stem)
    if region:
        paths["target_region"] = region_path(out_dir, stem)
    paths["summary"] = summary_path(out_dir, stem)
    return paths


def record_path_for(map_file: str | Path) -> Path:
    """``<folder>/<map-name>.icam.json`` for a map ``<folder>/<map-name>.nii[.gz]`` (or ``.dcm``)."""
    p = Path(map_file)
    return p.with_name(scan_stem(p) + RECORD_SUFFIX)


def sidecar_path_for(map_file: str | Path) -> Path:
    """``<folder>/<map-name>.record.json``: the JSON napari writes beside a saved map."""
    p = Path(map_file)
    return p.with_name(scan_stem(p) + SIDECAR_SUFFIX)


def audit_folder_for(scan_path: str | Path) -> Path:
    """The widget's audit folder beside a scan: ``/data/t1.nii.gz`` -> ``/data/t1_icam``."""
    p = Path(scan_path).expanduser()
    return p.with_name(scan_stem(p) + AUDIT_FOLDER_SUFFIX)
