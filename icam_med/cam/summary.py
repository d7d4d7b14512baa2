"""What one sample of a :class:`~icam_med.cam.CAMResult` says, as a typed, JSON-ready value.

:class:`CAMSummary` is what leaves the engine for the rest of the package: the
:class:`icam_med.explain.Explanation` carries it, the audit record's ``method`` section and
the JSON summary are built from it, and :class:`~icam_med.cam.monai.ComputeCAMd` stores its
:meth:`~CAMSummary.to_dict` in a map's ``meta["icam"]``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["COORDINATE_DIGITS", "CAMSummary", "MapStatistics", "map_statistics"]

#: Peak and centroid coordinates are rounded to this many decimals (0.1 micrometre in mm).
COORDINATE_DIGITS = 4


@dataclass(frozen=True)
class CAMSummary:
    """Sample ``index`` of a CAM result: method, options, classes, scores, per-layer weights.

    Attributes:
        method: the CAM method's name.
        options: every option as the engine resolved it (JSON-safe).
        score: the explained target's score.
        target_class: the explained class, ``None`` for a callable target.
        predicted_class: the model's arg-max class, ``None`` when the output is not a
            class vector.
        logits: the model's output for this sample (class vector outputs only).
        probabilities: softmax of ``logits`` (class vector outputs only).
        layer_weights: layer name -> its weight in the fusion.
        layer_scores: layer name -> its relevance ``s_l``.
    """

    method: str
    options: Mapping[str, Any]
    score: float
    target_class: int | None
    predicted_class: int | None
    logits: tuple[float, ...] | None
    probabilities: tuple[float, ...] | None
    layer_weights: Mapping[str, float] = field(default_factory=dict)
    layer_scores: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: Any, index: int = 0) -> CAMSummary:
        """The summary of sample ``index`` of a :class:`~icam_med.cam.CAMResult`."""
        logits = result.logits[index].detach().float().cpu()
        vector = logits.ndim == 1
        return cls(
            method=str(result.method),
            options=copy.deepcopy(result.options),
            score=float(result.scores[index]),
            target_class=(None if result.target_classes is None
                          else int(result.target_classes[index])),
            predicted_class=int(logits.argmax()) if vector else None,
            logits=tuple(float(v) for v in logits) if vector else None,
            probabilities=(tuple(float(v) for v in torch.softmax(logits, 0)) if vector
                           else None),
            layer_weights={k: float(v[index]) for k, v in result.layer_weights.items()},
            layer_scores={k: float(v[index])
                          for k, v in (getattr(result, "layer_scores", None) or {}).items()},
        )

    def label(self, labels: tuple[str, ...] | list[str], index: int | None) -> str | None:
        """The label of class ``index`` among ``labels``, or ``None``."""
        return labels[index] if index is not None and 0 <= index < len(labels) else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (the ``result`` of the JSON summary, ``meta["icam"]`` of a map)."""
        d: dict[str, Any] = {
            "method": self.method,
            "options": copy.deepcopy(dict(self.options)),
            "score": self.score,
            "target_class": self.target_class,
            "layer_weights": dict(self.layer_weights),
            "layer_scores": dict(self.layer_scores),
            "logits": None if self.logits is None else list(self.logits),
        }
        if self.probabilities is not None:
            d["probabilities"] = list(self.probabilities)
        d["predicted_class"] = self.predicted_class
        return d


@dataclass(frozen=True)
class MapStatistics:
    """Figures of a fused map on the scan's grid (computed in float64).

    Attributes:
        shape: the map's spatial shape.
        min, max, mean, std: of the map's values.
        frac_above_half: fraction of voxels above 0.5.
        peak_voxel: voxel index of the maximum (the first one, in C order).
        peak_world_ras_mm: that voxel's centre in RAS world millimetres.
        centroid_voxel: the map-weighted centre of mass in voxel indices, ``None`` for an
            all-zero map.
    """

    shape: tuple[int, ...]
    min: float
    max: float
    mean: float
    std: float
    frac_above_half: float
    peak_voxel: tuple[int, ...]
    peak_world_ras_mm: tuple[float, ...]
    centroid_voxel: tuple[float, ...] | None

    def to_dict(self) -> dict[str, Any]:
        """The record's ``analysis.map_stats`` (and, less ``shape``, summary.csv's columns)."""
        return {
            "min": self.min, "max": self.max, "mean": self.mean, "std": self.std,
            "frac_above_0.5": self.frac_above_half,
            "peak_voxel": list(self.peak_voxel),
            "peak_world_ras_mm": list(self.peak_world_ras_mm),
            "centroid_voxel": None if self.centroid_voxel is None else list(self.centroid_voxel),
        }

    def summary_dict(self) -> dict[str, Any]:
        """The JSON summary's ``map`` section."""
        return {"shape": list(self.shape), "max": self.max, "mean": self.mean,
                "peak_voxel": list(self.peak_voxel),
                "peak_world_ras_mm": list(self.peak_world_ras_mm)}


_STATS_BLOCK = 1 << 20  # voxels converted to float64 at a time (8 MB)


def _slabs(a: np.ndarray) -> Any:
    """``(first index, slab)`` of consecutive slabs of ``a`` along its first axis, each
    about :data:`_STATS_BLOCK` voxels."""
    per = max(1, a.size // max(1, a.shape[0]))
    step = max(1, _STATS_BLOCK // per)
    for i in range(0, a.shape[0], step):
        yield i, a[i: i + step]


def _first_in_reversed_order(hits: np.ndarray, offset: int) -> tuple[int, ...]:
    """The index in ``hits`` (a slab of a reversed-axes view, ``offset`` along its first
    axis) of the True element that comes first in the map's own C order: the smallest
    index along the view's last axis, then the one before it, and so on."""
    idx: list[int] = []
    sub = hits
    while sub.ndim > 1:
        k = int(np.argmax(sub.any(axis=tuple(range(sub.ndim - 1)))))
        idx.append(k)
        sub = sub[..., k]
    idx.append(int(np.argmax(sub)))
    view_index = idx[::-1]
    view_index[0] += offset
    return tuple(view_index)


def map_statistics(fused: Any, affine: Any) -> MapStatistics:
    """The one place map figures are computed (JSON summary, record analysis, CLI).

    Sums are taken in float64 a slab at a time (the centre of mass from the map's sums
    along each axis), so a full-size map never gets a full-size float64 copy.

    Args:
        fused: the map on the scan's grid, ``(1, *spatial)`` or ``(*spatial)`` (array or
            tensor).
        affine: the scan's voxel-to-RAS affine, ``(ndim + 1, ndim + 1)``.
    """
    a = fused.detach().cpu().numpy() if hasattr(fused, "detach") else np.asarray(fused)
    aff = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine,
                     dtype=np.float64)
    if a.ndim == aff.shape[0]:  # a leading channel axis
        a = a[0]
    if a.ndim == 0:
        a = a.reshape(1)
    # Slabs along the axis that is slowest in memory: the first for a C-ordered map, the
    # last for an x-fastest one (as the one-pass inverse returns it), else every slab would
    # be a strided copy. ``t`` is that view; its axis j is the map's axis perm[j].
    reverse = a.ndim > 1 and not a.flags.c_contiguous and a.T.flags.c_contiguous
    t = a.T if reverse else a
    n, per = t.size, t.size // max(1, t.shape[0])
    lo, hi, above, peak_flat = np.inf, -np.inf, 0, 0
    peak_t: tuple[int, ...] | None = None
    first = np.zeros(t.shape[0], dtype=np.float64)  # sums over every axis but t's first
    plane = np.zeros(t.shape[1:], dtype=np.float64)  # sums over t's first axis
    for i, b in _slabs(t):
        b64 = np.asarray(b, dtype=np.float64)
        first[i: i + b.shape[0]] = b64.reshape(b.shape[0], -1).sum(axis=1)
        plane += b64.sum(axis=0)
        if reverse:  # the first maximum in the map's own C order, ties included
            m = float(b.max())
            if m >= hi:
                cand = _first_in_reversed_order(b == m, i)
                if m > hi or peak_t is None or cand[::-1] < peak_t[::-1]:
                    hi, peak_t = m, cand
        else:
            j = int(np.argmax(b))
            if float(b.flat[j]) > hi:  # strictly greater: the first maximum in C order
                hi, peak_flat = float(b.flat[j]), i * per + j
        lo = min(lo, float(b.min()))
        above += int(np.count_nonzero(b > 0.5))
        del b64  # before the next slab is made
    total = float(first.sum())
    mean = total / n
    sq = 0.0
    for _, b in _slabs(t):
        d = np.subtract(b, mean, dtype=np.float64)
        sq += float(np.multiply(d, d, out=d).sum())
        del d
    if reverse:
        peak = tuple(int(v) for v in (peak_t or (0,) * t.ndim)[::-1])
    else:
        peak = tuple(int(v) for v in np.unravel_index(peak_flat, a.shape))
    world = aff @ np.r_[np.asarray(peak, float), 1.0]
    centroid = None
    if total > 0:
        profiles = [first] + [plane.sum(axis=tuple(k for k in range(plane.ndim) if k != d))
                              for d in range(plane.ndim)]
        if reverse:  # t's axes are the map's in reverse
            profiles = profiles[::-1]
        centroid = tuple(round(float(np.arange(len(p), dtype=np.float64) @ p / total),
                               COORDINATE_DIGITS) for p in profiles)
    return MapStatistics(
        shape=tuple(int(s) for s in a.shape), min=lo, max=hi, mean=mean,
        std=float(np.sqrt(sq / n)), frac_above_half=above / n,
        peak_voxel=peak,
        peak_world_ras_mm=tuple(round(float(v), COORDINATE_DIGITS) for v in world[:-1]),
        centroid_voxel=centroid,
    )
