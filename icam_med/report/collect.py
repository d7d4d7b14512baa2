"""What the report shows, gathered from an audit folder: ledger, records, verification,
maps and (optionally) the scans' voxels.

Only PHI-free sources are read: the ledger, the audit records, the map files and the
scans' voxel arrays (never DICOM header text). A scan given to draw the map over is
accepted only when its voxel SHA-256 equals the one its record pins, so the picture shows
exactly the audited input.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.audit import (
    LEDGER_NAME,
    AuditRecord,
    Ledger,
    LedgerEntry,
    RecordError,
    VerifyReport,
    sha256_file,
    verify_folder,
    voxel_sha256,
)

__all__ = [
    "BODY_THRESHOLD_FRACTION",
    "CONFIDENT_PROBABILITY",
    "LOW_CONFIDENCE_PROBABILITY",
    "OUTSIDE_BODY_LIMIT",
    "REGION_ROLE",
    "SALIENT_LEVEL",
    "SECOND_CLASS_ROLE",
    "CohortData",
    "ScanItem",
    "SecondClass",
    "body_mask",
    "collect",
    "montage_title",
    "outside_fraction",
    "probabilities",
    "region_label",
]

log = logging.getLogger(__name__)

#: A wrong prediction whose predicted-class probability is at least this is "confident".
CONFIDENT_PROBABILITY = 0.9
#: A labelled prediction below this probability is "low confidence": the audit also maps the
#: runner-up class (a wrong prediction gets its expected class's map), for the review list.
LOW_CONFIDENCE_PROBABILITY = 0.6
#: The record's roles of that second map's files: ``second_class:cam_nifti``,
#: ``second_class:summary`` (its class and layer weights); NIfTI only, no Parametric Map.
SECOND_CLASS_ROLE = "second_class"
#: The record's role of a segmentation target's explained region (``cam_region.nii.gz``).
REGION_ROLE = "target_region"
#: A map with more than this fraction of its salient mass outside the body mask is suspicious.
OUTSIDE_BODY_LIMIT = 0.5
#: The salient part of a map: values at or above this (maps are normalised to [0, 1]).
#: Low, diffuse values spread over a large empty background would otherwise dominate.
SALIENT_LEVEL = 0.5
#: Body mask: voxels above p1 + this * (p99 - p1) of the scan's intensities.
BODY_THRESHOLD_FRACTION = 0.1


def probabilities(logits: Any) -> list[float] | None:
    """Class probabilities from logits: softmax for K > 1 outputs, sigmoid for one."""
    if not logits:
        return None
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(z)):
        return None
    if z.size == 1:
        return [float(1.0 / (1.0 + math.exp(-z[0])))]
    e = np.exp(z - z.max())
    return [float(v) for v in e / e.sum()]


def body_mask(scan: np.ndarray) -> np.ndarray:
    """Voxels above ``p1 + BODY_THRESHOLD_FRACTION * (p99 - p1)`` (a simple, documented
    intensity threshold: air and empty background fall below it for CT and most MR)."""
    lo, hi = np.percentile(scan, [1, 99])
    return scan > lo + BODY_THRESHOLD_FRACTION * (hi - lo)


def outside_fraction(cam: np.ndarray, scan: np.ndarray) -> float | None:
    """Fraction of the map's salient mass (the sum of its values >= :data:`SALIENT_LEVEL`)
    outside :func:`body_mask`; ``None`` when the map has no salient part."""
    salient = np.where(cam >= SALIENT_LEVEL, cam, 0.0)
    total = float(salient.sum())
    if total <= 0:
        return None
    return float(salient[~body_mask(scan)].sum() / total)


@dataclass
class SecondClass:
    """The map of the class a wrong or low-confidence prediction competes with (the expected
    class, or the runner-up of a right but unsure one), as the audit recorded it.

    Attributes:
        class_index, label: the class it explains.
        why: ``"expected class"`` or ``"runner-up class"``.
        score: its target score (logit).
        probability: the class's probability from the recorded logits.
        layer_weights: its per-layer weights, in network order.
        map_path: its map inside the audit folder (``None`` when missing).
        montage: predicted-class map beside this one (PNG), when drawn.
    """

    class_index: int | None
    label: str | None
    why: str
    score: float | None = None
    probability: float | None = None
    layer_weights: dict[str, float] = field(default_factory=dict)
    map_path: Path | None = None
    montage: bytes | None = None


@dataclass
class ScanItem:
    """One scan as the report shows it."""

    scan_id: str
    seq: int
    status: str                          # "ok" or "failed"
    time_utc: str | None = None
    run_id: str | None = None
    reason: str | None = None            # failure reason (already path-scrubbed by the ledger)
    record: AuditRecord | None = None
    record_path: str | None = None
    verified: bool = False
    problems: list[str] = field(default_factory=list)
    predicted_label: str | None = None
    target_label: str | None = None
    score: float | None = None
    probability: float | None = None     # of the predicted class
    expected_label: str | None = None
    disagrees: bool | None = None
    layer_weights: dict[str, float] = field(default_factory=dict)
    mask_fraction: float | None = None   # batch mask (lesion) fraction, when one was given
    mask_volume_fraction: float | None = None  # the mask's share of the scan's voxels
    peak_in_mask: bool | None = None     # whether the map's peak lies inside the mask
    use_violations: list[str] = field(default_factory=list)  # outside the intended use
    mask_shown: str = "not given"        # "outlined", "not given", "hash differs", "grid differs"
    region: dict[str, Any] | None = None  # a segmentation target's region (record summary)
    region_shown: str = "none"           # "outlined", "none", "missing", "unreadable",
    #                                      "grid differs", "voxels differ", "not drawn"
    outside_body: float | None = None
    scan_shown: str = "not given"        # "matched", "not given", "hash differs", "unreadable"
    map_state: str = "not read"          # "ok", "missing", "unreadable", "empty"
    flags: list[str] = field(default_factory=list)
    montage: bytes | None = None
    weights_png: bytes | None = None
    second: SecondClass | None = None    # the competing class's map (misclassification)
    priority: tuple[int, float] = (9, 0.0)
    page: int = 1

    @property
    def confident_wrong(self) -> bool:
        return bool(self.disagrees) and (self.probability or 0.0) >= CONFIDENT_PROBABILITY

    @property
    def low_confidence(self) -> bool:
        return self.probability is not None and self.probability < LOW_CONFIDENCE_PROBABILITY

    @property
    def anchor(self) -> str:
        return f"scan-{self.scan_id}"


@dataclass
class CohortData:
    """Everything the report is built from."""

    folder_name: str
    verify: VerifyReport
    entries: list[LedgerEntry]
    unreadable_lines: int
    scans: list[ScanItem]
    runs: list[dict[str, Any]]
    models: list[dict[str, Any]]
    methods: list[dict[str, Any]]
    preprocessing: list[list[dict[str, Any]]]
    versions: list[dict[str, Any]]
    labels: list[str]
    head_sha256: str | None
    anchor: str | None = None
    ledger_sha256: str | None = None

    @property
    def ok_scans(self) -> list[ScanItem]:
        return [s for s in self.scans if s.status == "ok"]

    @property
    def failed_scans(self) -> list[ScanItem]:
        return [s for s in self.scans if s.status != "ok"]


def _read_ledger(folder: Path) -> tuple[list[LedgerEntry], int]:
    """Ledger entries in order, through the one ledger parser; lines that are not entries
    are counted, not read (the verification report names them, by line)."""
    entries, errors = Ledger(folder).read()
    return entries, len(errors)


def _distinct(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    seen: set[str] = set()
    for item in items:
        key = json.dumps(item, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _scan_sources(scans: Any) -> tuple[dict[str, Path], dict[str, Path]]:
    """``(scan id -> scan path, scan id -> mask path)`` from the inputs given."""
    if scans is None:
        return {}, {}
    if isinstance(scans, Mapping):
        return {str(k): Path(v) for k, v in scans.items()}, {}
    from icam_med.discovery import collect_scans

    if isinstance(scans, (str, Path)):
        scans = [scans]
    specs = collect_scans(scans)
    return ({s.scan_id: s.path for s in specs},
            {s.scan_id: s.mask for s in specs if s.mask is not None})


def _read_mask(item: ScanItem, path: Path, cam_np: np.ndarray,
               cam_affine: np.ndarray) -> np.ndarray | None:
    """The scan's mask, if it is the one the record pins (voxel SHA-256) and lies on the
    map's grid; else ``None`` with :attr:`ScanItem.mask_shown` saying why."""
    import nibabel as nib

    img = nib.load(str(path))
    raw = np.asanyarray(img.dataobj)
    raw = raw.reshape(raw.shape[:3]) if raw.ndim > 3 and raw.shape[3:] == (1,) else raw
    want = (item.record.analysis.mask_sha256
            if item.record is not None and item.record.analysis is not None else None)
    # The audit hashed the mask's voxels as io loaded them (float32 today): accept the
    # stored and the float32 values, with or without the channel axis.
    as_f32 = raw.astype(np.float32)
    got = {voxel_sha256(a) for a in (raw, raw[None], as_f32, as_f32[None])}
    if want is None or want not in got:
        item.mask_shown = "hash differs"
        return None
    if raw.shape != cam_np.shape or not np.allclose(np.asarray(img.affine), cam_affine,
                                                    atol=1e-3):
        item.mask_shown = "grid differs"
        return None
    item.mask_shown = "outlined"
    inside = raw != 0
    if item.mask_volume_fraction is None:  # records written before these were recorded
        item.mask_volume_fraction = float(inside.mean())
    if item.peak_in_mask is None and float(cam_np.max()) > 0:
        item.peak_in_mask = bool(inside.reshape(-1)[int(np.argmax(cam_np))])
    return inside.astype(np.float32)


def _match_leftovers(folder: Path, latest: Mapping[str, LedgerEntry],
                     sources: dict[str, Path], geometry: Any) -> dict[str, Path]:
    """Scans given under other names than the folder's scan ids (e.g. an ``explain`` folder
    whose scan id is the folder's name) are matched to records by voxel SHA-256."""
    leftovers = [p for sid, p in sources.items() if sid not in latest]
    wanted: dict[str, str] = {}
    for sid, e in latest.items():
        if sid in sources or e.kind != "scan" or e.record is None:
            continue
        try:
            wanted[AuditRecord.load_inside(folder, e.record.path).input.voxel_sha256] = sid
        except RecordError:
            continue
    if not leftovers or not wanted:
        return sources
    from icam_med.io import load_volume

    matched = dict(sources)
    for p in leftovers:
        try:
            image, _ = load_volume(p, geometry=geometry)
        except Exception:  # unreadable: nothing to match
            continue
        sid = wanted.get(voxel_sha256(image))
        if sid is not None:
            matched[sid] = p
    return matched


def _fill_from_record(item: ScanItem, rec: AuditRecord) -> None:
    method = rec.method
    analysis = rec.analysis
    item.predicted_label = method.predicted.name
    item.target_label = method.target.name
    item.score = method.score
    probs = probabilities(list(method.logits) if method.logits else None)
    idx = method.predicted.class_index
    if probs is not None and idx is not None:
        item.probability = probs[0] if len(probs) == 1 else probs[idx]
    # Records store canonical (sorted) JSON: restore the network's layer order.
    item.layer_weights = method.ordered_layer_weights()
    if method.region is not None:
        item.region = dict(method.region)
        item.region_shown = "not drawn"  # until the figures are drawn with it
    if analysis is not None:
        exp = analysis.expected_label
        item.expected_label = None if exp is None else str(exp)
        item.disagrees = analysis.disagrees
        item.mask_fraction = analysis.mask_fraction
        item.mask_volume_fraction = analysis.mask_volume_fraction
        item.peak_in_mask = analysis.peak_in_mask
        item.use_violations = list((analysis.intended_use or {}).get("violations") or [])
    item.second = _second_class(item, rec)


def _second_class(item: ScanItem, rec: AuditRecord) -> SecondClass | None:
    """The second class's map the audit sealed in this record (roles ``second_class:*``):
    its class, score and layer weights from its pinned JSON summary."""
    ref = rec.output(f"{SECOND_CLASS_ROLE}:summary")
    if ref is None:
        return None
    path = rec.file(ref)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))["result"] if path else None
    except (OSError, ValueError, KeyError, TypeError):
        result = None
    if not isinstance(result, dict):
        item.problems.append("the second class's summary is missing or unreadable")
        return None
    index = result.get("target_class")
    probs = probabilities(list(rec.method.logits) if rec.method.logits else None)
    weights = result.get("layer_weights") or {}
    order = [n for n in rec.method.layers if n in weights] + [
        n for n in weights if n not in rec.method.layers]
    map_ref = rec.output(f"{SECOND_CLASS_ROLE}:cam_nifti")
    return SecondClass(
        class_index=index if isinstance(index, int) else None,
        label=result.get("target_label") or (None if index is None else f"class {index}"),
        why="expected class" if item.disagrees else "runner-up class",
        score=result.get("score"),
        probability=(probs[index] if probs and isinstance(index, int)
                     and 0 <= index < len(probs) else None),
        layer_weights={n: float(weights[n]) for n in order},
        map_path=rec.file(map_ref) if map_ref is not None else None)


def _read_map(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A map written by icam-med (a NIfTI on its scan's grid): ``(X, Y, Z)`` float32 values
    and its voxel-to-RAS affine, read with nibabel alone (no torch, no MONAI: the report
    starts fast). icam-med writes the same sform and qform, so nibabel's affine is the one
    :func:`icam_med.io.load_volume` gives."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asarray(img.dataobj, dtype=np.float32)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and data.shape[3:] == (1,) else data
    if data.ndim != 3:
        raise ValueError(f"map {path} has shape {data.shape}; expected a 3-D volume.")
    return data, np.asarray(img.affine, dtype=np.float64)


def _read_region(item: ScanItem, rec: AuditRecord, cam_shape: tuple[int, ...],
                 cam_affine: np.ndarray) -> np.ndarray | None:
    """The explained region (role :data:`REGION_ROLE`) as 0/1 on the map's grid, when the
    record has one and its file holds the voxel count the record states; else ``None``,
    with :attr:`ScanItem.region_shown` saying why."""
    ref = rec.output(REGION_ROLE)
    path = rec.file(ref) if ref is not None else None
    if path is None or not path.is_file():
        item.region_shown = "missing"
        item.problems.append("the explained region's file (cam_region.nii.gz) is missing")
        return None
    try:
        data, affine = _read_map(path)
    except Exception as exc:  # messages may name the path: keep only the type
        log.warning("scan %s: region unreadable (%s)", item.scan_id, type(exc).__name__)
        item.region_shown = "unreadable"
        return None
    if data.shape != tuple(cam_shape) or not np.allclose(affine, cam_affine, atol=1e-3):
        item.region_shown = "grid differs"
        return None
    inside = data != 0
    want = (item.region or {}).get("voxels")
    if want is not None and int(inside.sum()) != int(want):
        item.region_shown = "voxels differ"
        return None
    item.region_shown = "outlined"
    return inside.astype(np.float32)


def region_label(region: dict[str, Any] | None) -> str:
    """The legend's words for a region: ``explained region: 'lesion' (mask file)`` or
    ``explained region: predicted 'lesion'``."""
    r = region or {}
    label = r.get("label") or (f"class {r['class_index']}" if r.get("class_index") is not None
                               else "target")
    if r.get("source") == "predicted":
        of = r.get("region_label") or label
        return f"explained region: '{label}' over the voxels predicted as '{of}'"
    return f"explained region: '{label}' over the given mask"


def montage_title(item: ScanItem) -> str:
    """A scan's montage title: its id, the predicted (and expected) label; for a
    segmentation target (no single prediction), the label explained over its region."""
    if item.region is not None:
        return f"{item.scan_id}: '{item.target_label}' explained over its region"
    title = f"{item.scan_id}: predicted {item.predicted_label}"
    if item.expected_label is not None:
        title += f", expected {item.expected_label}"
    return title


def _load_pictures(item: ScanItem, source: Path | None, geometry: Any,
                   mask_path: Path | None = None) -> None:
    """Read the map (and the scan and mask, if given), compute the body check and draw
    figures."""
    from icam_med.report.figures import layer_weights_png, montage_png, to_ras

    rec = item.record
    if item.layer_weights:
        item.weights_png = layer_weights_png(item.layer_weights)
    map_path = rec.map_path if rec is not None else None
    if map_path is None or not map_path.is_file():
        item.map_state = "missing"
        return
    try:
        cam_np, cam_affine = _read_map(map_path)
    except Exception as exc:  # a damaged map is reported, not fatal for the whole report
        log.warning("scan %s: map unreadable (%s)", item.scan_id, type(exc).__name__)
        item.map_state = "unreadable"
        return
    item.map_state = "ok" if float(cam_np.max()) > 0 else "empty"
    scan_ras = None
    if source is not None:
        from icam_med.io import load_volume  # scans need io's checked loader (MONAI)

        want = rec.input.voxel_sha256 if rec is not None else None
        try:
            image, info = load_volume(source, geometry=geometry)
        except Exception as exc:  # messages may name the path: keep only the type
            log.warning("scan %s: the scan given could not be read (%s)", item.scan_id,
                        type(exc).__name__)
            item.scan_shown = "unreadable"
        else:
            if voxel_sha256(image) != want:
                item.scan_shown = "hash differs"
            elif tuple(info.shape) != tuple(cam_np.shape) or not np.allclose(
                    np.asarray(info.affine), cam_affine, atol=1e-3):
                item.scan_shown = "grid differs"
            else:
                item.scan_shown = "matched"
                scan_np = np.asarray(image[0].numpy(), dtype=np.float32)
                item.outside_body = outside_fraction(cam_np, scan_np)
                scan_ras = to_ras(scan_np, info.affine)
    mask_ras = None
    if mask_path is not None:
        try:
            mask = _read_mask(item, mask_path, cam_np, cam_affine)
        except Exception as exc:  # messages may name the path: keep only the type
            log.warning("scan %s: the mask given could not be read (%s)", item.scan_id,
                        type(exc).__name__)
            item.mask_shown = "unreadable"
            mask = None
        if mask is not None:
            mask_ras = to_ras(mask, cam_affine)
    region_ras = None
    if rec is not None and item.region is not None:
        region = _read_region(item, rec, cam_np.shape, cam_affine)
        if region is not None:
            region_ras = to_ras(region, cam_affine)
    map_ras = to_ras(cam_np, cam_affine)
    words = region_label(item.region)
    item.montage = montage_png(map_ras, scan_ras, title=montage_title(item), mask_ras=mask_ras,
                               region_ras=region_ras, region_label=words)
    if item.second is not None:
        _second_picture(item, item.second, map_ras, cam_np.shape, cam_affine, scan_ras,
                        mask_ras, region_ras, words)


def _second_picture(item: ScanItem, second: SecondClass, map_ras: Any, shape: tuple,
                    affine: np.ndarray, scan_ras: Any, mask_ras: Any,
                    region_ras: Any = None, region_words: str = "") -> None:
    """The predicted class's map beside the second class's (same planes, both weights)."""
    from icam_med.report.figures import class_pair_png, to_ras

    path = second.map_path
    try:
        if path is None or not path.is_file():
            raise FileNotFoundError("missing")
        other, other_affine = _read_map(path)
        if other.shape != shape or not np.allclose(other_affine, affine, atol=1e-3):
            raise ValueError("not on the map's grid")
    except (OSError, ValueError) as exc:
        log.warning("scan %s: second class's map unusable (%s)", item.scan_id,
                    type(exc).__name__)
        item.problems.append(f"the {second.why}'s map is missing or unreadable")
        return

    def name(what: str, label: Any, p: float | None) -> str:
        return f"{what} '{label}'" + ("" if p is None else f" (p = {p:.3f})")

    second.montage = class_pair_png(
        map_ras, to_ras(other, other_affine), scan_ras, mask_ras=mask_ras,
        region_ras=region_ras, region_label=region_words or "explained region",
        labels=(name("predicted", item.predicted_label, item.probability),
                name(second.why, second.label, second.probability)),
        weights=(item.layer_weights, second.layer_weights),
        title=f"{item.scan_id}: map of the predicted class (top) and of the {second.why} "
              "(bottom)")


def _flag(item: ScanItem) -> None:
    """Flags and review priority (lower first); the rules are printed in the report."""
    f = item.flags
    if item.status != "ok":
        f.append("failed: " + (item.reason or "no reason logged"))
        item.priority = (4, 0.0)
        return
    if not item.verified:
        f.append("not verified: " + ("; ".join(item.problems) or "see ledger verification"))
    if item.confident_wrong:
        f.append(f"confident wrong prediction (p = {item.probability:.3f} for "
                 f"'{item.predicted_label}', expected '{item.expected_label}')")
    elif item.disagrees:
        f.append(f"prediction '{item.predicted_label}' disagrees with expected label "
                 f"'{item.expected_label}'")
    if item.low_confidence:
        f.append(f"low confidence (p = {item.probability:.3f} for '{item.predicted_label}', "
                 f"below {LOW_CONFIDENCE_PROBABILITY:g})")
    suspicious = False
    if item.map_state == "empty":
        f.append("empty map (all zero): it explains nothing")
        suspicious = True
    elif item.map_state in ("missing", "unreadable"):
        f.append(f"map file {item.map_state}")
        suspicious = True
    if item.outside_body is not None and item.outside_body > OUTSIDE_BODY_LIMIT:
        f.append(f"suspicious map: {item.outside_body:.0%} of its salient mass lies outside "
                 "the body")
        suspicious = True
    if item.use_violations:
        f.append("outside the model's intended use: " + "; ".join(item.use_violations))
        suspicious = True
    if item.scan_shown == "hash differs":
        f.append("the scan given is not the audited one (voxel SHA-256 differs): not drawn")
    elif item.scan_shown in ("unreadable", "grid differs"):
        f.append(f"the scan given could not be drawn ({item.scan_shown})")
    if not item.verified:
        item.priority = (0, 0.0)
    elif item.confident_wrong:
        item.priority = (1, -(item.probability or 0.0))
    elif suspicious:
        item.priority = (2, -(item.outside_body or 1.0))
    elif item.disagrees or f:
        item.priority = (3, -(item.probability or 0.0))


def collect(out_dir: str | Path, *, scans: Any = None, geometry: Any = None,
            figures: bool = True, anchor: str | None = None) -> CohortData:
    """Gather the report's content from an audit folder.

    Args:
        out_dir: a folder written by ``icam-med audit`` or ``icam-med explain``.
        scans: where the audited scans are, to draw the maps over them: a mapping
            ``scan_id -> path`` or the same inputs given to ``icam-med audit`` (files,
            folders, CSV). Optional; without it maps are drawn alone.
        geometry: the config's ``geometry`` options used to load the scans.
        figures: draw the per-scan figures (``False``: tables only).
        anchor: a ledger head hash kept elsewhere, checked by the verification.
    """
    folder = Path(out_dir).resolve()
    report = verify_folder(folder, anchor=anchor)  # the library's verification, re-run now
    entries, bad = _read_ledger(folder)
    sources, masks = _scan_sources(scans)
    latest: dict[str, LedgerEntry] = {}
    runs: dict[str, dict[str, Any]] = {}
    for e in entries:
        rid = e.run_id
        if e.kind in ("run-start", "run-end"):
            run = runs.setdefault(rid, {"run_id": rid})
            run["started_utc" if e.kind == "run-start" else "ended_utc"] = e.time_utc
            run.update(e.details)
        elif e.kind in ("scan", "failure") and e.scan_id is not None:
            latest[e.scan_id] = e
            run = runs.setdefault(rid, {"run_id": rid})
            run.setdefault("first_entry_utc", e.time_utc)
            run["last_entry_utc"] = e.time_utc
    problems_by_scan: dict[str, list[str]] = {}
    for p in report.problems:
        if p.scan_id:
            problems_by_scan.setdefault(p.scan_id, []).append(p.message)
    sources = _match_leftovers(folder, latest, sources, geometry)
    items: list[ScanItem] = []
    for sid, e in latest.items():
        item = ScanItem(scan_id=sid, seq=e.seq, status="ok" if e.kind == "scan" else "failed",
                        time_utc=e.time_utc, run_id=e.run_id, reason=e.reason,
                        problems=problems_by_scan.get(sid, []))
        item.verified = report.verified_scans.get(sid) == item.seq
        if item.status == "ok" and e.record is not None:
            item.record_path = e.record.path
            try:
                item.record = AuditRecord.load_inside(folder, item.record_path)
            except RecordError as exc:
                item.record = None
                item.problems.append(f"record missing or unreadable ({exc.detail})")
                item.verified = False
            else:
                _fill_from_record(item, item.record)
                if figures:
                    try:
                        _load_pictures(item, sources.get(sid), geometry, masks.get(sid))
                    except Exception as exc:  # a damaged map must not stop the report
                        log.warning("scan %s: map could not be shown (%s)", sid,
                                    type(exc).__name__)
                        item.problems.append(f"map could not be shown ({type(exc).__name__})")
        _flag(item)
        items.append(item)
    records = [s.record for s in items if s.record is not None]
    models = _distinct(dict(r.data["model"]) for r in records)
    methods = _distinct({k: r.data["method"][k] for k in ("name", "options", "layers")}
                        for r in records)
    labels: list[str] = []
    for r in records:
        labels.extend(x for x in r.labels if x not in labels)
    return CohortData(
        folder_name=folder.name, verify=report, entries=entries, unreadable_lines=bad,
        scans=items, runs=list(runs.values()), models=models, methods=methods,
        preprocessing=_distinct(list(r.data["preprocessing"]) for r in records),
        versions=_distinct(dict(r.data["runtime"]["versions"]) for r in records),
        labels=labels,
        head_sha256=entries[-1].sha256 if entries else None, anchor=anchor,
        ledger_sha256=sha256_file(folder / LEDGER_NAME),
    )


def cohort_metrics(data: CohortData) -> dict[str, Any]:
    """Counts, accuracy and the confusion matrix over scans with an expected label."""
    ok = data.ok_scans
    labelled = [s for s in ok if s.expected_label is not None and s.disagrees is not None]
    correct = sum(1 for s in labelled if not s.disagrees)
    expected = list(dict.fromkeys([*data.labels, *(s.expected_label for s in labelled)]))
    predicted = list(dict.fromkeys([*data.labels, *(s.predicted_label or "?" for s in labelled)]))
    # An expected label given as a class index counts as that class's label.
    def as_label(value: str) -> str:
        if value.isdigit() and int(value) < len(data.labels):
            return data.labels[int(value)]
        return value

    expected = list(dict.fromkeys(as_label(x) for x in expected))
    matrix = np.zeros((len(expected), len(predicted)), dtype=int)
    for s in labelled:
        matrix[expected.index(as_label(s.expected_label or "")),
               predicted.index(s.predicted_label or "?")] += 1
    groups: dict[str, list[float]] = {"correct": [], "wrong": [], "no expected label": []}
    for s in ok:
        if s.probability is None:
            continue
        key = ("no expected label" if s.disagrees is None else
               "wrong" if s.disagrees else "correct")
        groups[key].append(s.probability)
    return {
        "n_scans": len(data.scans), "n_ok": len(ok), "n_failed": len(data.failed_scans),
        "n_verified": sum(1 for s in data.scans if s.verified),
        "n_labelled": len(labelled), "n_correct": correct,
        "accuracy": correct / len(labelled) if labelled else None,
        "n_confident_wrong": sum(1 for s in ok if s.confident_wrong),
        "n_flagged": sum(1 for s in data.scans if s.flags),
        "confusion": matrix if labelled else None,
        "expected_labels": expected, "predicted_labels": predicted,
        "score_groups": groups,
    }
