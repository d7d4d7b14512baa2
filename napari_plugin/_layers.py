"""Pure functions that turn scans, explanations and audit folders into napari layer data.

Nothing here imports Qt or builds a viewer: every function returns napari *layer data
tuples* ``(data, kwargs, layer_type)`` and is unit-tested without a display.

Spatial convention
------------------
``icam_med`` loads a scan as a channel-first array ``(1, X, Y, Z)`` (the file's own index
order) whose 4x4 affine maps voxel indices ``(i, j, k)`` to **RAS** millimetres (MONAI and
NIfTI convention). napari layers here hold the array with its axes reversed, ``(k, j, i)``
(slice, row, column for an axial DICOM series), and get a napari ``affine`` such that the
napari world coordinates are **DICOM patient coordinates (LPS) in millimetres, listed in
napari's axis order (z, y, x)**: world axis 0 = S (superior), 1 = P (posterior), 2 = L
(left). An axial DICOM series therefore shows with a diagonal, positive affine in the
usual radiological orientation (patient's left on the screen's right, anterior up), and
any two layers built from grids of the same scanner space overlay exactly, in 2D slices
along any axis and in 3D.

Every layer names its world axes anatomically (:data:`AXIS_LABELS`: ``S-I``, ``A-P``,
``R-L``) and its units as millimetres, so napari's sliders and scale bar read in patient
terms; :func:`napari_plugin._view.radiological_view` turns the 2D camera so superior is up in
coronal and sagittal planes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.display import DISPLAY_THRESHOLD, MAP_CMAP, REGION_COLOUR
from icam_med.paths import (
    AUDIT_FOLDER_SUFFIX,
    RECORD_SUFFIX,
    audit_folder_for,
    is_nifti,
    record_path_for,
    scan_stem,
    sidecar_path_for,
)

__all__ = [
    "AXIS_LABELS",
    "DEFAULT_THRESHOLD",
    "METADATA_KEY",
    "UNITS",
    "audit_folder_layers",
    "audit_name_for",
    "contour_layer",
    "dicom_window",
    "difference_colormap",
    "difference_layer",
    "explanation_layers",
    "find_audit_scan",
    "from_napari_array",
    "is_audit_folder",
    "is_saved_map",
    "looks_like_mask",
    "map_colormap",
    "map_file_layers",
    "napari_affine",
    "new_audit_folder_for",
    "ras_affine",
    "region_layer",
    "scan_layer",
    "symmetric_limits",
    "to_napari_array",
    "volume_layer",
]

METADATA_KEY = "icam_med"
"""Every layer this plugin makes keeps its provenance under ``layer.metadata["icam_med"]``."""

AXIS_LABELS = ("S-I", "A-P", "R-L")
"""napari world axes (z, y, x) in anatomical terms: 0 runs inferior -> superior, 1 anterior ->
posterior, 2 right -> left (LPS)."""
UNITS = ("mm", "mm", "mm")
"""World units of every layer this plugin makes."""

_REVERSE = np.eye(4)[[2, 1, 0, 3]]       # (i, j, k, 1) <-> (k, j, i, 1)
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


DEFAULT_THRESHOLD = DISPLAY_THRESHOLD
"""Map values below this are not drawn by default (fixed 0-1 scale): the report's display
threshold, defined once in :data:`icam_med.display.DISPLAY_THRESHOLD`, so the viewer
and the report cut maps at the same value."""


def map_colormap(threshold: float = 0.0) -> Any:
    """The colormap of map overlays (a napari ``Colormap`` for contrast limits ``(0, 1)``).

    Inferno on the fixed 0-1 scale of the maps, cut hard at ``threshold``: a value below it
    is fully transparent, a value at or above it keeps the colour it has at any threshold
    (the threshold hides weak voxels; it never re-stretches the colours). Zero is always
    transparent.

    Raises:
        ValueError: ``threshold`` is outside ``[0, 1)``.
    """
    from napari.utils.colormaps import Colormap
    from napari.utils.colormaps.colormap_utils import ensure_colormap

    thr = float(threshold)
    if not 0.0 <= thr < 1.0:
        raise ValueError(f"map threshold {threshold} must lie in [0, 1).")
    eps = 1e-4
    controls = np.linspace(0.0, 1.0, 65)
    if thr > 0.0:
        controls = np.unique(np.concatenate([controls, [max(thr - eps, 0.0), thr]]))
    colors = np.asarray(ensure_colormap(MAP_CMAP).map(controls), dtype=float)
    colors[:, 3] = ((controls >= thr) & (controls > 0.0)).astype(float)
    return Colormap(colors=colors, controls=controls,
                    name=f"icam inferno (cut at {thr:.2f})")


def difference_colormap() -> Any:
    """Diverging blue-transparent-red colormap for signed differences (symmetric limits):
    blue where the second map is larger, red where the first is, nothing drawn at zero."""
    from napari.utils.colormaps import Colormap

    controls = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    colors = np.array([
        [0.0, 0.25, 1.0, 1.0],
        [0.3, 0.55, 1.0, 0.8],
        [1.0, 1.0, 1.0, 0.0],
        [1.0, 0.45, 0.3, 0.8],
        [1.0, 0.1, 0.0, 1.0],
    ])
    return Colormap(colors=colors, controls=controls, name="icam difference (transparent zero)")


def symmetric_limits(data: Any) -> tuple[float, float]:
    """``(-m, m)`` with ``m`` the largest absolute finite value (1 for an all-zero map)."""
    arr = np.asarray(data)
    finite = arr[np.isfinite(arr)]
    m = float(np.abs(finite).max()) if finite.size else 0.0
    m = m if m > 0.0 else 1.0
    return -m, m


def difference_layer(first: Any, second: Any, *, name: str,
                     metadata: Mapping[str, Any] | None = None,
                     opacity: float = 0.6) -> tuple:
    """The signed difference ``first - second`` of two map layers on one grid, as a layer
    data tuple: red where the first map is larger, blue where the second is, transparent
    at zero, limits symmetric about 0.

    Args:
        first, second: napari image layers (or anything with ``data`` and a napari
            ``affine``) holding maps of the same scan grid.

    Raises:
        ValueError: the two maps are not on one grid (shape or affine differ); the message
            names both.
    """
    a, b = np.asarray(first.data, dtype=np.float32), np.asarray(second.data, dtype=np.float32)
    aff_a = np.asarray(getattr(first.affine, "affine_matrix", first.affine), dtype=np.float64)
    aff_b = np.asarray(getattr(second.affine, "affine_matrix", second.affine), dtype=np.float64)
    if a.shape != b.shape or not np.allclose(aff_a, aff_b, atol=1e-3):
        raise ValueError(
            f"'{getattr(first, 'name', 'A')}' (shape {a.shape}) and "
            f"'{getattr(second, 'name', 'B')}' (shape {b.shape}) are not on one grid, so a "
            "voxel-wise difference means nothing; compare them side by side instead.")
    diff = a - b
    kwargs = _map_kwargs(name, ras_affine(aff_a), {"kind": "difference", **dict(metadata or {})},
                         colormap=difference_colormap(), contrast_limits=symmetric_limits(diff),
                         opacity=opacity)
    return diff, kwargs, "image"


def napari_affine(ras_affine: Any) -> np.ndarray:
    """napari affine (data ``(k, j, i)`` -> world LPS ``(z, y, x)``) from a voxel-to-RAS affine.

    Args:
        ras_affine: 4x4 affine mapping ``(i, j, k)`` voxel indices to RAS mm.
    """
    a = np.asarray(ras_affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 voxel-to-RAS affine, got shape {a.shape}.")
    return _REVERSE @ _RAS_TO_LPS @ a @ _REVERSE


def ras_affine(napari_aff: Any) -> np.ndarray:
    """Inverse of :func:`napari_affine`: the voxel-to-RAS affine of a napari 3D affine."""
    a = np.asarray(napari_aff, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"expected a 4x4 napari affine for a 3D layer, got shape {a.shape}.")
    return _RAS_TO_LPS @ _REVERSE @ a @ _REVERSE


def to_napari_array(volume: Any) -> np.ndarray:
    """``(1, X, Y, Z)`` or ``(X, Y, Z)`` tensor/array -> ``(Z, Y, X)`` numpy array (a view)."""
    if hasattr(volume, "detach"):
        volume = volume.detach().cpu()
        volume = volume.as_tensor() if hasattr(volume, "as_tensor") else volume
        volume = volume.numpy()
    arr = np.asarray(volume)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D volume (optionally with one channel), got shape {arr.shape}.")
    return arr.transpose(2, 1, 0)


def from_napari_array(data: Any) -> np.ndarray:
    """``(Z, Y, X)`` napari data -> ``(1, X, Y, Z)`` float32 array (the library's layout)."""
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(
            f"the image layer has {arr.ndim} dimension(s) (shape {arr.shape}); explaining needs "
            "one 3D volume. Open a single volume (e.g. one time point of a 4-D series) or "
            "slice the layer first."
        )
    return np.ascontiguousarray(arr.transpose(2, 1, 0)[None], dtype=np.float32)


def _percentile_limits(arr: np.ndarray) -> tuple[float, float]:
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return 0.0, 1.0
    sample = finite if finite.size <= 2_000_000 else finite[:: finite.size // 2_000_000 + 1]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def dicom_window(info: Any) -> tuple[float, float] | None:
    """The contrast limits of a DICOM scan's first Window Center/Width (e.g. CT 40/400 ->
    ``(-160, 240)``), or ``None`` for NIfTI or a series without a usable window."""
    if getattr(info, "format", None) != "dicom":
        return None
    from icam_med.io.radiograph import is_radiograph

    if is_radiograph(info):  # its values are already the windowed display values
        return None
    try:
        datasets = info.source_datasets()
    except (OSError, ValueError, AttributeError):
        return None
    for ds in datasets[:1]:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        try:
            c = float(center[0] if hasattr(center, "__len__") and not isinstance(center, str)
                      else center)
            w = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str)
                      else width)
        except (TypeError, ValueError, IndexError):
            return None
        if not (math.isfinite(c) and math.isfinite(w) and w > 1.0):
            return None
        return c - w / 2.0, c + w / 2.0
    return None


MAX_MASK_LABELS = 64
"""A volume of whole numbers 0-255 with at most this many distinct values is a mask."""


def looks_like_mask(data: Any) -> bool:
    """True for a label volume: whole numbers from 0 (background) to at most 255, at most
    :data:`MAX_MASK_LABELS` distinct values (a scan has far more grey levels, or values
    beyond a label's range: a synthetic phantom of 0/100/1000 is a scan)."""
    arr = np.asarray(data)
    if arr.size == 0:
        return False
    step = max(1, arr.size // 200_000)
    for sample in (arr.reshape(-1)[::step], arr):  # a cheap look first, then all of it
        if not np.isfinite(sample).all() or sample.min() < 0 or not (
                np.mod(sample, 1) == 0).all():
            return False
        values = np.unique(sample)
        if (values.size > MAX_MASK_LABELS or values.size < 2 or values[0] != 0
                or values[-1] > 255):
            return False
    return True


def scan_layer(image: Any, info: Any, *, name: str | None = None) -> tuple:
    """Layer data tuple of a scan loaded by :func:`icam_med.io.load_volume`.

    The layer's metadata keeps the scan's :class:`~icam_med.io.ScanInfo` (in memory only)
    and the RAS affine, so the widget can explain it through the library. A DICOM scan opens
    with its own window (Window Center/Width, :func:`dicom_window`), anything else with the
    0.5-99.5 percentile range.
    """
    data = to_napari_array(image)
    aff = np.asarray(info.affine, dtype=np.float64)
    path = Path(info.path)
    label = name or scan_stem(path)
    window = dicom_window(info)
    kwargs = {
        "name": label,
        "affine": napari_affine(aff),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "colormap": "gray",
        "contrast_limits": window if window is not None else _percentile_limits(data),
        "metadata": {METADATA_KEY: {
            "kind": "scan",
            "source_path": str(path),
            "scan_info": info,
            "affine_ras": aff.tolist(),
            "window": window,
            "world": "LPS mm, napari axes (z, y, x)",
        }},
    }
    return data, kwargs, "image"


def volume_layer(image: Any, info: Any) -> tuple:
    """A loaded volume as napari shows it best: a mask (:func:`looks_like_mask`) as a
    Labels layer, anything else as a scan (:func:`scan_layer`)."""
    data = to_napari_array(image)
    if not looks_like_mask(data):
        return scan_layer(image, info)
    aff = np.asarray(info.affine, dtype=np.float64)
    path = Path(info.path)
    return data.astype(np.int32), {
        "name": scan_stem(path),
        "affine": napari_affine(aff),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "opacity": 0.5,
        "blending": "translucent_no_depth",
        "metadata": {METADATA_KEY: {"kind": "mask", "source_path": str(path),
                                    "affine_ras": aff.tolist(),
                                    "world": "LPS mm, napari axes (z, y, x)"}},
    }, "labels"


def _map_kwargs(name: str, affine_ras: np.ndarray, meta: Mapping[str, Any], *,
                visible: bool = True, colormap: Any = None, opacity: float = 0.6,
                threshold: float = DEFAULT_THRESHOLD,
                contrast_limits: tuple[float, float] = (0.0, 1.0),
                blending: str = "translucent_no_depth") -> dict[str, Any]:
    return {
        "name": name,
        "affine": napari_affine(affine_ras),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "colormap": colormap if colormap is not None else map_colormap(threshold),
        "contrast_limits": contrast_limits,
        "opacity": opacity,
        "blending": blending,
        "visible": visible,
        "interpolation3d": "linear",
        "rendering": "attenuated_mip",
        "metadata": {METADATA_KEY: {**meta, "affine_ras": np.asarray(affine_ras).tolist(),
                                    "threshold": float(threshold) if colormap is None else None,
                                    "world": "LPS mm, napari axes (z, y, x)"}},
    }


def _class_name(labels: Sequence[str], index: int | None) -> str:
    if index is None:
        return "custom target"
    return labels[index] if 0 <= index < len(labels) else f"class {index}"


def explanation_layers(explanation: Any, *, scan_name: str = "scan",
                       contrast: Any = None, threshold: float = DEFAULT_THRESHOLD,
                       opacity: float = 0.6) -> list[tuple]:
    """Layer data tuples for an :class:`icam_med.explain.Explanation`.

    Returns, in order: the fused map (visible overlay), each layer's map (hidden), and, when
    ``contrast`` (a second Explanation, for another class) is given, its fused map (hidden)
    and the signed difference ``fused - contrast`` (hidden; red where the first class is
    favoured, blue where the second is, transparent at zero, symmetric limits); last, for a
    segmentation target, the explained region as a Labels layer (:func:`region_layer`,
    ``kind = "region"``).

    Maps keep contrast limits ``(0, 1)``; ``threshold`` is a hard cut in their colormap
    (:func:`map_colormap`), kept in the metadata as ``threshold``.

    Every map layer's metadata holds ``kind``, the JSON summary (``summary``: method,
    options, classes, scores, per-layer weights, map statistics; no identifiers), the
    audit ``record`` (``None`` until saved) and the in-memory ``explanation``.
    """
    info = explanation.scan_info
    aff = np.asarray(info.affine, dtype=np.float64)
    summary = explanation.to_dict()
    result = explanation.result
    labels = tuple(explanation.labels)
    method = result.method
    target = _class_name(labels, result.target_class)
    base_meta = {"summary": summary, "record": None, "record_path": None,
                 "explanation": explanation, "method": method,
                 "target_class": result.target_class, "target_label": target,
                 "score": result.score}
    fused = to_napari_array(explanation.fused).astype(np.float32, copy=False)
    layers: list[tuple] = [(
        fused,
        _map_kwargs(f"{scan_name} {method} [{target}]", aff, {**base_meta, "kind": "fused"},
                    opacity=opacity, threshold=threshold),
        "image",
    )]
    weights = result.layer_weights
    for lname, lmap in explanation.layer_maps.items():
        w = weights.get(lname)
        wtxt = f" w={w:.2f}" if isinstance(w, (int, float)) and math.isfinite(w) else ""
        layers.append((
            to_napari_array(lmap).astype(np.float32, copy=False),
            _map_kwargs(f"{scan_name} layer {lname}{wtxt}", aff,
                        {**base_meta, "kind": "layer", "layer": lname, "layer_weight": w},
                        visible=False, opacity=opacity, threshold=threshold),
            "image",
        ))
    if contrast is not None:
        c_res = contrast.result
        c_target = _class_name(labels, c_res.target_class)
        c_meta = {**base_meta, "summary": contrast.to_dict(), "explanation": contrast,
                  "target_class": c_res.target_class, "target_label": c_target,
                  "score": c_res.score}
        c_fused = to_napari_array(contrast.fused).astype(np.float32, copy=False)
        layers.append((
            c_fused,
            _map_kwargs(f"{scan_name} {method} [{c_target}]", aff,
                        {**c_meta, "kind": "contrast", "versus": target},
                        visible=False, opacity=opacity, threshold=threshold),
            "image",
        ))
        diff = fused - c_fused
        layers.append((
            diff,
            _map_kwargs(f"{scan_name} {target} minus {c_target}", aff,
                        {**base_meta, "kind": "difference", "minus": c_target,
                         "summary": {"first": summary, "second": c_meta["summary"]}},
                        visible=False, colormap=difference_colormap(),
                        contrast_limits=symmetric_limits(diff), opacity=opacity),
            "image",
        ))
    region = getattr(explanation, "target_region", None)
    if region is not None:
        layers.append(region_layer(
            to_napari_array(region).transpose(2, 1, 0), _region_affine(region, aff),
            name=f"{scan_name} region [{target}]",
            metadata={"region": dict(explanation.region_info or {}), "method": method,
                      "target_class": result.target_class, "target_label": target,
                      "record_path": None, "record_mismatch": False,
                      "voxels": int(np.count_nonzero(to_napari_array(region)))}))
    return layers


def _region_affine(region: Any, default: np.ndarray) -> np.ndarray:
    """The region's own voxel-to-RAS affine (a MetaTensor's), else ``default`` (the scan's:
    the region lies on the scan's grid)."""
    aff = getattr(region, "affine", None)
    if aff is None:
        return default
    aff = np.asarray(aff.detach().cpu().numpy() if hasattr(aff, "detach") else aff,
                     dtype=np.float64)
    return aff if aff.shape == (4, 4) else default


def contour_layer(map_data: np.ndarray, level: float, *, name: str, affine: Any,
                  metadata: Mapping[str, Any] | None = None) -> tuple:
    """A Labels layer drawing the iso-contour ``map >= level`` of a (napari-ordered) map.

    Args:
        map_data: the map as shown (``(Z, Y, X)``).
        level: the iso level in the map's units (in [0, 1]).
        name: layer name.
        affine: the map layer's napari affine (so the contour sits exactly on the map).
    """
    if not 0.0 <= float(level) <= 1.0:
        raise ValueError(f"iso-contour level {level} must lie in [0, 1].")
    from napari.utils.colormaps import DirectLabelColormap

    mask = (np.asarray(map_data) >= float(level)).astype(np.uint8)
    kwargs = {
        "name": name,
        "colormap": DirectLabelColormap(color_dict={1: "cyan", None: "transparent"}),
        "affine": np.asarray(affine, dtype=np.float64),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "opacity": 1.0,
        "blending": "translucent_no_depth",
        "metadata": {METADATA_KEY: {"kind": "contour", "level": float(level),
                                    **dict(metadata or {})}},
    }
    return mask, kwargs, "labels"


def new_audit_folder_for(scan_path: str | Path) -> Path:
    """A folder for a new audit beside the scan that does not exist yet: ``<scan>_icam``,
    else ``<scan>_icam-2``, ``<scan>_icam-3``... (earlier audits are never touched;
    :func:`find_audit_scan` finds the scan of each)."""
    base = audit_folder_for(scan_path)
    if not base.exists():
        return base
    for n in range(2, 10_000):
        candidate = base.with_name(f"{base.name}-{n}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"{base.parent} holds {base.name}-2 to -9999 already; choose an "
                          "'audit folder' for this run.")


def audit_name_for(scan_path: str | Path) -> Path:
    """Where the widget's "Save audit" writes for a scan: ``<scan>_icam`` beside the scan.

    ``/data/ct_series/`` -> ``/data/ct_series_icam/``; ``/data/t1.nii.gz`` ->
    ``/data/t1_icam/``.
    """
    return audit_folder_for(scan_path)


def find_audit_scan(folder: str | Path) -> Path | None:
    """The scan an audit folder belongs to, by the naming rule of :func:`audit_name_for`.

    Looks for the sibling ``<name>`` (a DICOM folder), ``<name>.nii.gz`` or ``<name>.nii``
    of a folder ``<name>_icam`` (or a versioned ``<name>_icam-N``); then for a ``scan.nii.gz``/``scan.nii`` inside the folder.
    Returns ``None`` when there is none (the maps still open at their physical position).
    """
    f = Path(folder)
    candidates = []
    name = re.sub(r"-\d+$", "", f.name)  # a versioned folder <name>_icam-2 belongs to <name>
    if name.endswith(AUDIT_FOLDER_SUFFIX):
        stem = name[: -len(AUDIT_FOLDER_SUFFIX)]
        candidates += [f.with_name(stem), f.with_name(stem + ".nii.gz"), f.with_name(stem + ".nii"),
                       f.with_name(stem + ".dcm")]
    candidates += [f / "scan.nii.gz", f / "scan.nii"]
    for c in candidates:
        if c.exists():
            return c
    return None


def is_audit_folder(path: str | Path) -> bool:
    """A folder holding at least one audit record (``*.icam.json``) beside its map."""
    p = Path(path)
    return p.is_dir() and any(p.glob(f"*{RECORD_SUFFIX}"))


def _load_nifti_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"map {path} is not a 3D volume (shape {data.shape}).")
    return data, np.asarray(img.affine, dtype=np.float64)


def audit_folder_layers(folder: str | Path, *,
                        threshold: float = DEFAULT_THRESHOLD) -> list[tuple]:
    """Layer data tuples for an audit output folder (from ``write_explanation``).

    Each record ``*.icam.json`` is read through :meth:`icam_med.audit.AuditRecord.load`
    (schema-checked); its fused map (role ``cam_nifti``, visible) and its layer maps (roles
    ``layer_map:<layer>``, hidden) are the files the record names, each placed by the affine
    in its own NIfTI header, with the sealed record in the layer's metadata; a segmentation
    target's region (role ``target_region``) opens as a Labels layer
    (:func:`region_layer`), named after the target label. The scan found
    by :func:`find_audit_scan` comes first; its voxel hash is compared with the records', and
    a mismatch is reported in the scan layer's metadata (``record_mismatch``) and logged.

    Raises:
        ValueError: the folder holds no audit record, a record is not a valid record
            (:class:`icam_med.audit.RecordError`, naming the file and field), or the map a
            record names is missing or outside the audit folder.
    """
    import logging

    from icam_med.audit import AuditRecord

    log = logging.getLogger(__name__)
    f = Path(folder)
    paths = sorted(f.glob(f"*{RECORD_SUFFIX}"))
    if not paths:
        raise ValueError(
            f"{f} holds no audit record (*{RECORD_SUFFIX}); open an output folder written by "
            "'icam-med explain' or the plugin's Save audit, or open the scan itself."
        )
    records = [AuditRecord.load(p) for p in paths]  # RecordError names file and field
    layers: list[tuple] = []
    scan_path = find_audit_scan(f)
    if scan_path is not None:
        from icam_med.audit import voxel_sha256
        from icam_med.io import load_volume

        image, info = load_volume(scan_path)
        data, kwargs, kind = scan_layer(image, info)
        meta = kwargs["metadata"][METADATA_KEY]
        digest = voxel_sha256(image)
        meta["record_mismatch"] = digest not in {r.input.voxel_sha256 for r in records}
        if meta["record_mismatch"]:
            log.warning("scan %s does not match the voxel hash in the audit records of %s",
                        scan_path, f)
        layers.append((data, kwargs, kind))
    for record in records:
        layers += _record_layers(record, f.name, threshold=threshold)
    return layers


def _record_layers(record: Any, prefix: str, *, threshold: float,
                   with_layer_maps: bool = True) -> list[tuple]:
    """The fused map a record names (visible) and its layer maps (hidden), named
    ``<prefix> <method> [<class>]`` and ``<prefix> layer <name>``."""
    import logging

    map_file = record.map_path
    if map_file is None or not map_file.is_file():
        ref = record.map_ref
        raise ValueError(
            f"record {record.path} names no readable map "
            f"({'no cam_nifti output' if ref is None else repr(ref.path)}) inside the "
            "audit folder; run `icam-med verify` on the folder.")
    method = record.method
    label = method.target.label or (
        f"class {method.target.class_index}" if method.target.class_index is not None
        else "custom target")
    meta = {"kind": "fused", "record": dict(record.data), "record_path": str(record.path),
            "summary": None, "explanation": None, "method": method.name,
            "target_class": method.target.class_index, "target_label": label,
            "score": method.score, "source_path": str(map_file),
            "layer_weights": method.ordered_layer_weights()}
    data, aff = _load_nifti_map(map_file)
    layers = [(data.transpose(2, 1, 0),
               _map_kwargs(f"{prefix} {method.name} [{label}]", aff, meta, threshold=threshold),
               "image")]
    layers += _second_class_layers(record, prefix, meta, threshold=threshold)
    layers += _region_layers(record, prefix, label)
    if not with_layer_maps:
        return layers
    for lname, ref in record.layer_refs.items():
        lpath = record.file(ref)
        if lpath is None or not lpath.is_file():
            logging.getLogger(__name__).warning("record %s: layer map %s is missing",
                                                record.path, ref.path)
            continue
        ldata, laff = _load_nifti_map(lpath)
        layers.append((ldata.transpose(2, 1, 0),
                       _map_kwargs(f"{prefix} layer {lname}", laff,
                                   {**meta, "kind": "layer", "layer": lname,
                                    "layer_weight": method.layer_weights.get(lname),
                                    "source_path": str(lpath)},
                                   visible=False, threshold=threshold),
                       "image"))
    return layers


def region_layer(region: np.ndarray, affine_ras: Any, *, name: str,
                 metadata: Mapping[str, Any] | None = None) -> tuple:
    """A segmentation target's explained region as a Labels layer data tuple: 1 inside
    (drawn in :data:`icam_med.display.REGION_COLOUR`, the report's outline colour), 0
    transparent, placed by its own voxel-to-RAS affine exactly as the map layers are.

    Args:
        region: the region on the scan's grid in the file's ``(X, Y, Z)`` order (non-zero =
            inside).
        affine_ras: its 4x4 voxel-to-RAS affine.
        name: layer name.
        metadata: kept under ``metadata["icam_med"]`` with ``kind = "region"``.
    """
    from napari.utils.colormaps import DirectLabelColormap

    aff = np.asarray(affine_ras, dtype=np.float64)
    data = (np.asarray(region) != 0).astype(np.uint8).transpose(2, 1, 0)
    return data, {
        "name": name,
        "affine": napari_affine(aff),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "colormap": DirectLabelColormap(color_dict={1: REGION_COLOUR, None: "transparent"}),
        "opacity": 0.5,
        "blending": "translucent_no_depth",
        "metadata": {METADATA_KEY: {**dict(metadata or {}), "kind": "region",
                                    "affine_ras": aff.tolist(),
                                    "world": "LPS mm, napari axes (z, y, x)"}},
    }, "labels"


def _region_layers(record: Any, prefix: str, label: str) -> list[tuple]:
    """The region a segmentation target explained (role ``target_region``), as a Labels
    layer named ``<prefix> region [<label>]``, with the record's region summary (source,
    labels, SHA-256, voxels) in its metadata; none for a record without one. A file whose
    voxel count is not the record's is still shown, flagged ``record_mismatch`` and logged
    (``icam-med verify`` says what changed)."""
    import logging

    from icam_med.report.collect import REGION_ROLE

    ref = record.output(REGION_ROLE)
    if ref is None:
        return []
    path = record.file(ref)
    log = logging.getLogger(__name__)
    try:
        if path is None or not path.is_file():
            raise FileNotFoundError(ref.path)
        data, aff = _load_nifti_map(path)
    except (OSError, ValueError) as exc:
        log.warning("record %s: the target region %s is missing or unreadable (%s)",
                    record.path, ref.path, exc)
        return []
    info = dict(record.method.region or {})
    voxels = int(np.count_nonzero(data))
    mismatch = info.get("voxels") is not None and int(info["voxels"]) != voxels
    if mismatch:
        log.warning("record %s: the target region %s has %d voxels, the record says %s",
                    record.path, ref.path, voxels, info.get("voxels"))
    return [region_layer(data, aff, name=f"{prefix} region [{label}]", metadata={
        "region": info, "target_label": label, "target_class": record.method.target.class_index,
        "record_path": str(record.path), "source_path": str(path), "voxels": voxels,
        "record_mismatch": mismatch})]


def _second_class_layers(record: Any, prefix: str, meta: Mapping[str, Any], *,
                         threshold: float) -> list[tuple]:
    """The map of the class a wrong or unsure prediction competes with, when the audit
    sealed one in the record (roles ``second_class:*``, see docs/report.md): a hidden
    ``contrast`` layer named with its class and why (expected class / runner-up), its layer
    weights from its pinned summary in the metadata, ready to compare with the fused map."""
    import json
    import logging

    from icam_med.report.collect import SECOND_CLASS_ROLE

    ref = record.output(f"{SECOND_CLASS_ROLE}:cam_nifti")
    summary_ref = record.output(f"{SECOND_CLASS_ROLE}:summary")
    if ref is None:
        return []
    path, summary_path = record.file(ref), record.file(summary_ref)
    try:
        result = json.loads(summary_path.read_text(encoding="utf-8"))["result"]
        data, aff = _load_nifti_map(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logging.getLogger(__name__).warning("record %s: the second class's map or summary is "
                                            "unreadable (%s)", record.path, exc)
        return []
    index = result.get("target_class")
    label = result.get("target_label") or f"class {index}"
    analysis = record.analysis
    why = "expected class" if analysis is not None and analysis.disagrees else "runner-up"
    weights = result.get("layer_weights") or {}
    order = [n for n in record.method.layers if n in weights]
    second = {**meta, "kind": "contrast", "target_class": index, "target_label": label,
              "score": result.get("score"), "versus": meta["target_label"], "why": why,
              "source_path": str(path),
              "layer_weights": {n: float(weights[n]) for n in order}}
    return [(data.transpose(2, 1, 0),
             _map_kwargs(f"{prefix} {record.method.name} [{label}] ({why})", aff, second,
                         visible=False, threshold=threshold),
             "image")]


def is_saved_map(path: str | Path) -> bool:
    """A NIfTI map with its record beside it: ``<name>.icam.json`` (an audit's map) or
    ``<name>.record.json`` (a map layer saved by the plugin's writer)."""
    p = Path(path)
    return is_nifti(p) and p.is_file() and (
        record_path_for(p).is_file() or sidecar_path_for(p).is_file())


def map_file_layers(path: str | Path, *, threshold: float = DEFAULT_THRESHOLD) -> list[tuple]:
    """A saved map (see :func:`is_saved_map`) as a map overlay, not as a grey scan.

    An audit map (``cam.nii.gz`` + ``cam.icam.json``) opens as its record's fused map, named
    after its folder (which carries the scan: ``t1_icam``), with the map colormap (and its
    explained region as a Labels layer, for a segmentation target); a map the
    writer saved opens with the kind its sidecar names (a difference map with the diverging
    colormap), its record or summary in the metadata.

    Raises:
        ValueError: the record is invalid (naming file and field) or names another map.
    """
    import json

    p = Path(path)
    rec_path = record_path_for(p)
    if rec_path.is_file():
        from icam_med.audit import AuditRecord

        record = AuditRecord.load(rec_path)
        if record.map_path is None or record.map_path.resolve() != p.resolve():
            raise ValueError(
                f"{rec_path} is the record of {record.map_path}, not of {p}; open the audit "
                "folder instead.")
        return _record_layers(record, p.parent.name, threshold=threshold, with_layer_maps=False)
    side = sidecar_path_for(p)
    try:
        payload = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{side}: not a readable map record ({exc}); open {p.name} as a scan "
                         "by removing or renaming the record.") from exc
    if not isinstance(payload, dict):
        raise ValueError(f"{side}: expected a JSON object written by the icam-med writer.")
    data, aff = _load_nifti_map(p)
    kind = payload.get("kind") or "fused"
    record = payload.get("record") if isinstance(payload.get("record"), dict) else None
    meta = {"kind": kind, "record": record, "record_path": None,
            "summary": payload.get("summary"), "explanation": None,
            "source_path": str(p)}
    name = str(payload.get("layer") or scan_stem(p))
    napari_data = data.transpose(2, 1, 0)
    if kind == "difference":
        kwargs = _map_kwargs(name, aff, meta, colormap=difference_colormap(),
                             contrast_limits=symmetric_limits(napari_data))
    else:
        kwargs = _map_kwargs(name, aff, meta, threshold=threshold)
    return [(napari_data, kwargs, "image")]
