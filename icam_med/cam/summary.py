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


def map_statistics(fused: Any, affine: Any) -> MapStatistics:
    """The one place map figures are computed (JSON summary, record analysis, CLI).

    Args:
        fused: the map on the scan's grid, ``(1, *spatial)`` or ``(*spatial)`` (array or
            tensor).
        affine: the scan's voxel-to-RAS affine, ``(ndim + 1, ndim + 1)``.
    """
    a = fused.detach().cpu().numpy() if hasattr(fused, "detach") else np.asarray(fused)
    a = np.asarray(a, dtype=np.float64)
    aff = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine,
                     dtype=np.float64)
    if a.ndim == aff.shape[0]:  # a leading channel axis
        a = a[0]
    peak = tuple(int(i) for i in np.unravel_index(int(np.argmax(a)), a.shape))
    world = aff @ np.r_[np.asarray(peak, float), 1.0]
    total = float(a.sum())
    centroid = None
    if total > 0:
        grids = np.indices(a.shape, dtype=np.float64)
        centroid = tuple(round(float((g * a).sum() / total), COORDINATE_DIGITS) for g in grids)
    return MapStatistics(
        shape=tuple(int(s) for s in a.shape), min=float(a.min()), max=float(a.max()),
        mean=float(a.mean()), std=float(a.std()), frac_above_half=float((a > 0.5).mean()),
        peak_voxel=peak,
        peak_world_ras_mm=tuple(round(float(v), COORDINATE_DIGITS) for v in world[:-1]),
        centroid_voxel=centroid,
    )
