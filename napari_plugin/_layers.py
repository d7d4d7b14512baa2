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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.paths import AUDIT_FOLDER_SUFFIX, RECORD_SUFFIX, audit_folder_for, scan_stem

__all__ = [
    "AXIS_LABELS",
    "METADATA_KEY",
    "UNITS",
    "audit_folder_layers",
    "audit_name_for",
    "contour_layer",
    "explanation_layers",
    "find_audit_scan",
    "from_napari_array",
    "is_audit_folder",
    "map_colormap",
    "napari_affine",
    "ras_affine",
    "scan_layer",
    "to_napari_array",
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


def _map_colormap() -> Any:
    """Inferno whose low end fades to transparent, so a threshold hides weak voxels."""
    from napari.utils.colormaps import Colormap
    from napari.utils.colormaps.colormap_utils import ensure_colormap

    base = ensure_colormap("inferno")
    controls = np.linspace(0.0, 1.0, 16)
    colors = np.asarray(base.map(controls), dtype=float)
    colors[:, 3] = np.clip(controls * 4.0, 0.0, 1.0)  # transparent at 0, opaque from 0.25
    colors[0, 3] = 0.0
    return Colormap(colors=colors, controls=controls, name="icam inferno (transparent low)")


def map_colormap() -> Any:
    """The colormap of map overlays (a napari ``Colormap``)."""
    return _map_colormap()


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


def scan_layer(image: Any, info: Any, *, name: str | None = None) -> tuple:
    """Layer data tuple of a scan loaded by :func:`icam_med.io.load_volume`.

    The layer's metadata keeps the scan's :class:`~icam_med.io.ScanInfo` (in memory only)
    and the RAS affine, so the widget can explain it through the library.
    """
    data = to_napari_array(image)
    aff = np.asarray(info.affine, dtype=np.float64)
    path = Path(info.path)
    label = name or scan_stem(path)
    kwargs = {
        "name": label,
        "affine": napari_affine(aff),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "colormap": "gray",
        "contrast_limits": _percentile_limits(data),
        "metadata": {METADATA_KEY: {
            "kind": "scan",
            "source_path": str(path),
            "scan_info": info,
            "affine_ras": aff.tolist(),
            "world": "LPS mm, napari axes (z, y, x)",
        }},
    }
    return data, kwargs, "image"


def _map_kwargs(name: str, affine_ras: np.ndarray, meta: Mapping[str, Any], *,
                visible: bool = True, colormap: Any = None, opacity: float = 0.6,
                contrast_limits: tuple[float, float] = (0.0, 1.0),
                blending: str = "translucent_no_depth") -> dict[str, Any]:
    return {
        "name": name,
        "affine": napari_affine(affine_ras),
        "axis_labels": AXIS_LABELS,
        "units": UNITS,
        "colormap": colormap if colormap is not None else map_colormap(),
        "contrast_limits": contrast_limits,
        "opacity": opacity,
        "blending": blending,
        "visible": visible,
        "interpolation3d": "linear",
        "rendering": "attenuated_mip",
        "metadata": {METADATA_KEY: {**meta, "affine_ras": np.asarray(affine_ras).tolist(),
                                    "world": "LPS mm, napari axes (z, y, x)"}},
    }


def _class_name(labels: Sequence[str], index: int | None) -> str:
    if index is None:
        return "custom target"
    return labels[index] if 0 <= index < len(labels) else f"class {index}"


def explanation_layers(explanation: Any, *, scan_name: str = "scan",
                       contrast: Any = None, threshold: float = 0.0,
                       opacity: float = 0.6) -> list[tuple]:
    """Layer data tuples for an :class:`icam_med.explain.Explanation`.

    Returns, in order: the fused map (visible overlay), each layer's map (hidden), and, when
    ``contrast`` (a second Explanation, for another class) is given, its fused map (hidden)
    and the signed difference ``fused - contrast`` (hidden; red where the first class is
    favoured, blue where the second is).

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
                    opacity=opacity, contrast_limits=(float(threshold), 1.0)),
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
                        visible=False, opacity=opacity),
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
                        visible=False, opacity=opacity, contrast_limits=(float(threshold), 1.0)),
            "image",
        ))
        diff = fused - c_fused
        layers.append((
            diff,
            _map_kwargs(f"{scan_name} {target} minus {c_target}", aff,
                        {**base_meta, "kind": "difference", "minus": c_target,
                         "summary": {"first": summary, "second": c_meta["summary"]}},
                        visible=False, colormap="bwr", contrast_limits=(-1.0, 1.0),
                        opacity=opacity),
            "image",
        ))
    return layers


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


def audit_name_for(scan_path: str | Path) -> Path:
    """Where the widget's "Save audit" writes for a scan: ``<scan>_icam`` beside the scan.

    ``/data/ct_series/`` -> ``/data/ct_series_icam/``; ``/data/t1.nii.gz`` ->
    ``/data/t1_icam/``.
    """
    return audit_folder_for(scan_path)


def find_audit_scan(folder: str | Path) -> Path | None:
    """The scan an audit folder belongs to, by the naming rule of :func:`audit_name_for`.

    Looks for the sibling ``<name>`` (a DICOM folder), ``<name>.nii.gz`` or ``<name>.nii``
    of a folder ``<name>_icam``; then for a ``scan.nii.gz``/``scan.nii`` inside the folder.
    Returns ``None`` when there is none (the maps still open at their physical position).
    """
    f = Path(folder)
    candidates = []
    if f.name.endswith(AUDIT_FOLDER_SUFFIX):
        stem = f.name[: -len(AUDIT_FOLDER_SUFFIX)]
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


def audit_folder_layers(folder: str | Path, *, threshold: float = 0.0) -> list[tuple]:
    """Layer data tuples for an audit output folder (from ``write_explanation``).

    Each record ``*.icam.json`` is read through :meth:`icam_med.audit.AuditRecord.load`
    (schema-checked); its fused map (role ``cam_nifti``, visible) and its layer maps (roles
    ``layer_map:<layer>``, hidden) are the files the record names, each placed by the affine
    in its own NIfTI header, with the sealed record in the layer's metadata. The scan found
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
        map_path = record.map_path
        if map_path is None or not map_path.is_file():
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
                "score": method.score, "source_path": str(map_path)}
        data, aff = _load_nifti_map(map_path)
        layers.append((data.transpose(2, 1, 0),
                       _map_kwargs(f"{f.name} {method.name} [{label}]", aff, meta,
                                   contrast_limits=(float(threshold), 1.0)),
                       "image"))
        for lname, ref in record.layer_refs.items():
            lpath = record.file(ref)
            if lpath is None or not lpath.is_file():
                log.warning("record %s: layer map %s is missing", record.path, ref.path)
                continue
            ldata, laff = _load_nifti_map(lpath)
            layers.append((ldata.transpose(2, 1, 0),
                           _map_kwargs(f"{f.name} layer {lname}", laff,
                                       {**meta, "kind": "layer", "layer": lname,
                                        "layer_weight": method.layer_weights.get(lname),
                                        "source_path": str(lpath)},
                                       visible=False),
                           "image"))
    return layers
