"""Model and method comparison (issue 14 item 9): two audit folders, the scans they share.

Scans are matched by the input voxel SHA-256 each record pins (not by scan id), so two audits
that named the same scans differently still line up. For each shared scan: map agreement
(Spearman rank correlation over the scan's voxels, Dice and IoU of the top 1/5/10 % voxels,
the distance in mm between the two maps' peaks through the scan affine), prediction
agreement (same predicted class, both probabilities), and a side-by-side montage through
the peak of map A. Everything is read without torch or MONAI: records through
:class:`~icam_med.audit.AuditRecord` (via :func:`~icam_med.report.collect.collect`), maps
with nibabel.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icam_med.report.collect import CohortData, ScanItem, _read_map, collect

__all__ = [
    "COMPARISON_CSV",
    "COMPARISON_HTML",
    "COMPARISON_JSON",
    "TOP_PERCENTS",
    "CompareResult",
    "ScanComparison",
    "compare_audits",
    "map_agreement",
    "peak_distance_mm",
    "spearman",
    "top_overlap",
]

log = logging.getLogger(__name__)

COMPARISON_HTML = "comparison.html"
COMPARISON_CSV = "comparison.csv"
COMPARISON_JSON = "comparison.json"
#: The top fractions of voxels whose overlap is reported (per cent of the scan's voxels).
TOP_PERCENTS = (1, 5, 10)


# -- metrics ---------------------------------------------------------------------------------
def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation over all voxels (ties get average ranks); ``None`` when
    either map is constant (the correlation is undefined)."""
    from scipy.stats import rankdata

    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _top_masks(values: np.ndarray, percents: Sequence[float]) -> list[np.ndarray]:
    """Boolean masks of the ``percents`` % highest voxels (each at least one; ties broken
    by voxel order, stably), from one sort of the map."""
    flat = values.ravel()
    order = np.argsort(-flat, kind="stable")
    masks = []
    for percent in percents:
        mask = np.zeros(flat.size, dtype=bool)
        mask[order[:max(1, math.ceil(flat.size * percent / 100.0))]] = True
        masks.append(mask)
    return masks


def _dice_iou(ma: np.ndarray, mb: np.ndarray) -> tuple[float, float]:
    inter = int(np.count_nonzero(ma & mb))
    union = int(np.count_nonzero(ma | mb))
    total = int(ma.sum() + mb.sum())
    return 2.0 * inter / total, inter / union


def top_overlap(a: np.ndarray, b: np.ndarray, percent: float) -> tuple[float, float]:
    """``(Dice, IoU)`` of the two maps' top ``percent`` % voxels."""
    (ma,), (mb,) = _top_masks(a, (percent,)), _top_masks(b, (percent,))
    return _dice_iou(ma, mb)


def peak_distance_mm(a: np.ndarray, affine_a: np.ndarray, b: np.ndarray,
                     affine_b: np.ndarray) -> float:
    """Distance in mm between the two maps' peak voxels (first maximum), each placed in
    world (RAS) coordinates by its own affine."""
    pa = np.unravel_index(int(np.argmax(a)), a.shape)
    pb = np.unravel_index(int(np.argmax(b)), b.shape)
    wa = np.asarray(affine_a, np.float64) @ np.array([*pa, 1.0])
    wb = np.asarray(affine_b, np.float64) @ np.array([*pb, 1.0])
    return float(np.linalg.norm(wa[:3] - wb[:3]))


def map_agreement(a: np.ndarray, affine_a: np.ndarray, b: np.ndarray,
                  affine_b: np.ndarray) -> dict[str, Any]:
    """Every map-agreement figure for one pair of maps on the same grid.

    Raises:
        ValueError: the maps do not lie on the same grid (shape or affine differ).
    """
    if a.shape != b.shape or not np.allclose(affine_a, affine_b, atol=1e-3):
        raise ValueError(f"the maps lie on different grids (shapes {a.shape} and {b.shape}); "
                         "voxel-wise agreement needs the same grid")
    out: dict[str, Any] = {"spearman": spearman(a, b),
                           "peak_distance_mm": peak_distance_mm(a, affine_a, b, affine_b)}
    masks = zip(_top_masks(a, TOP_PERCENTS), _top_masks(b, TOP_PERCENTS), strict=True)
    for p, (ma, mb) in zip(TOP_PERCENTS, masks, strict=True):
        dice, iou = _dice_iou(ma, mb)
        out[f"dice_top{p}"] = dice
        out[f"iou_top{p}"] = iou
    return out


# -- comparison ------------------------------------------------------------------------------
@dataclass
class ScanComparison:
    """One scan both audits explained (or, with ``unmatched_in`` set, only one)."""

    voxel_sha256: str
    scan_id_a: str | None
    scan_id_b: str | None
    predicted_a: str | None = None
    predicted_b: str | None = None
    probability_a: float | None = None
    probability_b: float | None = None
    same_prediction: bool | None = None
    spearman: float | None = None
    dice_top1: float | None = None
    iou_top1: float | None = None
    dice_top5: float | None = None
    iou_top5: float | None = None
    dice_top10: float | None = None
    iou_top10: float | None = None
    peak_distance_mm: float | None = None
    problem: str | None = None
    montage: bytes | None = field(default=None, repr=False)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("montage")
        return d


@dataclass
class CompareResult:
    """What :func:`compare_audits` wrote and found."""

    out_dir: Path
    html: Path
    csv: Path
    json: Path
    matched: list[ScanComparison]
    only_a: list[str]
    only_b: list[str]
    broken: list[str]
    summary: dict[str, Any]

    def line(self) -> str:
        s = self.summary
        rho = s.get("mean_spearman")
        text = (f"compared {len(self.matched)} shared scan(s) "
                f"({len(self.only_a)} only in A, {len(self.only_b)} only in B); "
                f"same prediction {s['n_same_prediction']}/{len(self.matched)}")
        if rho is not None:
            text += f"; mean Spearman {rho:.3f}"
        return text + f" -> {self.html}"


def _header(data: CohortData) -> dict[str, Any]:
    return {
        "folder": data.folder_name,
        "models": sorted({f"{m.get('name')} ({m.get('architecture')}, weights "
                          f"{(m.get('weights_sha256') or 'not pinned')[:12]})"
                          for m in data.models}),
        "methods": sorted({str(m.get("name")) for m in data.methods}),
        "verified": data.verify.ok,
        # The first problem only (the summary line would name the folder's absolute path).
        "verify_problem": None if data.verify.ok else str(data.verify.first_problem),
    }


def _by_hash(data: CohortData) -> dict[str, ScanItem]:
    out: dict[str, ScanItem] = {}
    for item in data.ok_scans:
        if item.record is not None:
            out.setdefault(item.record.input.voxel_sha256, item)
    return out


def _compare_one(h: str, a: ScanItem, b: ScanItem, figures: bool) -> ScanComparison:
    c = ScanComparison(voxel_sha256=h, scan_id_a=a.scan_id, scan_id_b=b.scan_id,
                       predicted_a=a.predicted_label, predicted_b=b.predicted_label,
                       probability_a=a.probability, probability_b=b.probability)
    if a.predicted_label is not None and b.predicted_label is not None:
        c.same_prediction = a.predicted_label == b.predicted_label
    pa = a.record.map_path if a.record is not None else None
    pb = b.record.map_path if b.record is not None else None
    if pa is None or pb is None or not pa.is_file() or not pb.is_file():
        c.problem = "map file missing"
        return c
    try:
        ma, aff_a = _read_map(pa)
        mb, aff_b = _read_map(pb)
    except Exception as exc:  # a damaged map is reported, not fatal for the comparison
        c.problem = f"map unreadable ({type(exc).__name__})"
        return c
    try:
        figures_ = map_agreement(ma, aff_a, mb, aff_b)
    except ValueError as exc:
        c.problem = str(exc)
        c.peak_distance_mm = peak_distance_mm(ma, aff_a, mb, aff_b)
    else:
        for k, v in figures_.items():
            setattr(c, k, v)
    if figures:
        c.montage = side_by_side_png(ma, aff_a, mb, aff_b, title=(
            f"A: {a.scan_id} ({a.predicted_label})  |  B: {b.scan_id} ({b.predicted_label})"))
    return c


def side_by_side_png(a: np.ndarray, affine_a: np.ndarray, b: np.ndarray,
                     affine_b: np.ndarray, *, title: str = "", dpi: int = 70) -> bytes:
    """Maps A (top row) and B (bottom row): axial, coronal and sagittal planes through each
    map's own peak, in the report's radiological layout and colormap; a cross marks the
    peak."""
    import matplotlib
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from icam_med.report.figures import (
        _VIEWS,
        MAP_CMAP,
        _fig_png,
        _figure,
        _label_sides,
        _slice,
        _title,
        to_ras,
    )

    cmap = matplotlib.colormaps[MAP_CMAP]
    fig = _figure(9.6, 6.6)
    axes = fig.subplots(2, 3)
    for row, (name, data, aff) in enumerate((("A", a, affine_a), ("B", b, affine_b))):
        vol = to_ras(data, aff)
        m = vol.data
        size = np.array(m.shape) * np.array(vol.spacing)
        peak = np.unravel_index(int(np.argmax(m)), m.shape)
        for col, (view, axis, (h, v), sides) in enumerate(_VIEWS):
            ax = axes[row, col]
            ax.imshow(_slice(m, axis, peak[axis]), cmap=cmap, vmin=0.0, vmax=1.0,
                      origin="lower", extent=(0.0, size[h], 0.0, size[v]),
                      interpolation="nearest")
            ax.set_xlim(size[h], 0.0)  # radiological: patient's right on the left
            ax.set_ylim(0.0, size[v])
            ax.set_aspect("equal")
            ax.plot([(peak[h] + 0.5) * vol.spacing[h]], [(peak[v] + 0.5) * vol.spacing[v]],
                    marker="+", color="cyan", markersize=12, mew=1.5)
            _label_sides(ax, sides)
            ax.set_title(_title(view, axis, vol, peak), fontsize=9)
        axes[row, 0].set_ylabel(f"map {name}, through its peak", fontsize=9)
    cbar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap), ax=axes, shrink=0.8,
                        pad=0.01)
    cbar.set_label("map value (0-1)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _fig_png(fig, dpi)


def _mean(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(got)) if got else None


def _summary(matched: list[ScanComparison], only_a: list[str],
             only_b: list[str]) -> dict[str, Any]:
    s: dict[str, Any] = {
        "n_matched": len(matched), "n_only_a": len(only_a), "n_only_b": len(only_b),
        "n_same_prediction": sum(1 for c in matched if c.same_prediction),
        "prediction_agreement": (sum(1 for c in matched if c.same_prediction) / len(matched)
                                 if matched else None),
    }
    for key in ("spearman", *(f"{m}_top{p}" for p in TOP_PERCENTS for m in ("dice", "iou")),
                "peak_distance_mm"):
        s[f"mean_{key}"] = _mean([getattr(c, key) for c in matched])
    return s


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


_CSS = """body{font-family:sans-serif;margin:24px;color:#222}table{border-collapse:collapse;
margin:8px 0}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left}.broken{background:#b00020;color:#fff;
padding:12px;font-size:20px;font-weight:bold}.bad{background:#fde0e0}img{max-width:100%}"""


def _template() -> Any:
    from icam_med.report.html import template

    return template("comparison.html.j2")


def _html(header_a: dict[str, Any], header_b: dict[str, Any], matched: list[ScanComparison],
          only_a: list[tuple[str, str]], only_b: list[tuple[str, str]], summary: dict[str, Any],
          broken: list[str]) -> str:
    """The comparison page, rendered from ``templates/comparison.html.j2`` (autoescaped:
    a folder or scan name can never become markup)."""
    from markupsafe import Markup

    cols = ["scan_id_a", "scan_id_b", "predicted_a", "predicted_b", "probability_a",
            "probability_b", "same_prediction", "spearman",
            *(f"{m}_top{p}" for p in TOP_PERCENTS for m in ("dice", "iou")),
            "peak_distance_mm", "problem"]
    return _template().render(
        css=Markup(_CSS), broken=broken, header_a=header_a, header_b=header_b,
        summary=summary, matched=matched, cols=cols, only_a=only_a, only_b=only_b, fmt=_fmt,
        joined=lambda v: ", ".join(v) if isinstance(v, list) else str(v),
        b64=lambda png: base64.b64encode(png).decode("ascii"),
    )


def compare_audits(audit_a: str | Path, audit_b: str | Path, out_dir: str | Path, *,
                   allow_broken: bool = False, figures: bool = True) -> CompareResult:
    """Compare the maps and predictions of two audit folders on the scans they share.

    Args:
        audit_a, audit_b: folders written by ``icam-med audit`` or ``icam-med explain``.
        out_dir: where ``comparison.html``, ``comparison.csv`` and ``comparison.json`` go
            (created if missing; existing comparison files are never replaced).
        allow_broken: compare a folder that does not verify, under a BROKEN banner, instead
            of refusing it.
        figures: draw the side-by-side montages.

    Raises:
        FileNotFoundError: an audit folder or its ledger does not exist.
        FileExistsError: a comparison file already exists in ``out_dir``.
        ValueError: an audit does not verify (without ``allow_broken``), or the two audits
            share no scan.
    """
    from icam_med.audit import LEDGER_NAME
    from icam_med.io.atomic import atomic_write_bytes, atomic_write_text, check_writable

    folders = [Path(audit_a), Path(audit_b)]
    for name, f in zip("AB", folders, strict=True):
        if not (f / LEDGER_NAME).is_file():
            raise FileNotFoundError(
                f"audit {name} {f} holds no {LEDGER_NAME}; expected a folder written by "
                "`icam-med audit` or `icam-med explain`.")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; expected a folder.")
    targets = [out / n for n in (COMPARISON_HTML, COMPARISON_CSV, COMPARISON_JSON)]
    for t in targets:
        check_writable(t)  # refuses before any work
    data = [collect(f, figures=False) for f in folders]
    broken: list[str] = []
    for name, f, d in zip("AB", folders, data, strict=True):
        if not d.verify.ok:
            msg = f"audit {name} {f} does not verify: {d.verify.first_problem}"
            if not allow_broken:
                raise ValueError(msg + "; run `icam-med verify` on it, or pass --allow-broken "
                                 "to compare it under a BROKEN banner.")
            broken.append(msg)
    ha, hb = _by_hash(data[0]), _by_hash(data[1])
    shared = [h for h in ha if h in hb]
    if not shared:
        raise ValueError(f"audits {folders[0]} and {folders[1]} share no scan (no input voxel "
                         "SHA-256 in common); compare two audits of the same scans.")
    matched = [_compare_one(h, ha[h], hb[h], figures) for h in shared]
    only_a = [(ha[h].scan_id, h) for h in ha if h not in hb]
    only_b = [(hb[h].scan_id, h) for h in hb if h not in ha]
    summary = _summary(matched, [s for s, _ in only_a], [s for s, _ in only_b])
    header_a, header_b = _header(data[0]), _header(data[1])
    page = _html(header_a, header_b, matched, only_a, only_b, summary, broken)
    cols = list(matched[0].row())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for c in matched:
        writer.writerow({k: "" if v is None else v for k, v in c.row().items()})
    doc = {"audit_a": header_a, "audit_b": header_b, "broken": broken, "summary": summary,
           "scans": [c.row() for c in matched],
           "only_a": [{"scan_id": s, "voxel_sha256": h} for s, h in only_a],
           "only_b": [{"scan_id": s, "voxel_sha256": h} for s, h in only_b]}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(targets[2], json.dumps(doc, indent=2, allow_nan=False).encode())
    atomic_write_text(targets[1], buf.getvalue())
    atomic_write_text(targets[0], page)
    return CompareResult(out_dir=out, html=targets[0], csv=targets[1], json=targets[2],
                         matched=matched, only_a=[s for s, _ in only_a],
                         only_b=[s for s, _ in only_b], broken=broken, summary=summary)
