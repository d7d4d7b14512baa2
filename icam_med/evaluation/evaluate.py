"""Compare CAM methods on scans whose truth is known: localisation, faithfulness, sanity, time.

:func:`evaluate` runs every method on every volume, in the model's input space (where the
ground-truth masks live), and scores each map with :mod:`icam_med.evaluation.metrics`:

============================  ==================================================  ==========
column                        what                                                better
============================  ==================================================  ==========
``pointing_game``             peak within ``tolerance_mm`` of the lesion           higher
``energy_in_mask``            share of the map's energy inside the lesion          higher
``deletion_auc``              target probability as top voxels are removed         lower
``insertion_auc``             target probability as top voxels are revealed        higher
``average_drop``              % confidence lost seeing only what the map shows     lower
``increase_in_confidence``    % of volumes whose confidence rises on that view     higher
``randomisation_rho``         rank correlation of the map before/after the         lower
                              model's weights are re-initialised
``runtime_ms``                wall time of the method's call, per volume          lower
============================  ==================================================  ==========

The summary gives each column's mean and a 95 % percentile-bootstrap confidence interval.
The same perturbation order, baseline and random tie-breaking are used for every method,
so differences between rows come from the maps alone.

:func:`default_methods` lists the comparison of the project's README: Integrative CAM,
its three ablations (no bias term, uniform layer weights, last layer only) and the
single-layer classics on the last layer, plus a model-free control that returns the
input's edges (the randomisation check must flag it).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from icam_med.evaluation import metrics

__all__ = [
    "COLUMNS",
    "EvalVolume",
    "EvaluationResult",
    "MethodSpec",
    "default_methods",
    "edge_map",
    "evaluate",
]

log = logging.getLogger(__name__)

#: Per-volume metric columns, with whether higher is better.
COLUMNS: dict[str, bool] = {
    "pointing_game": True,
    "energy_in_mask": True,
    "deletion_auc": False,
    "insertion_auc": True,
    "average_drop": False,
    "increase_in_confidence": True,
    "randomisation_rho": False,
    "runtime_ms": False,
}
_PERCENT = {"pointing_game", "average_drop", "increase_in_confidence"}


@dataclass(frozen=True)
class EvalVolume:
    """One scan in the model's input space.

    Attributes:
        x: ``(C, *spatial)`` float tensor, preprocessed exactly as the model expects.
        mask: ``(*spatial)`` bool ground-truth mask of the target (non-empty).
        target: class index to explain (the true class).
        spacing: voxel size per spatial axis in mm.
        domain: optional ``(*spatial)`` bool set of voxels the perturbation metrics may
            change (e.g. the brain); default every voxel.
        name: identifier shown in the per-volume table.
    """

    x: torch.Tensor
    mask: torch.Tensor
    target: int
    spacing: tuple[float, ...]
    domain: torch.Tensor | None = None
    name: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A row of the comparison: a CAM method with its options, or a model-free map function.

    Attributes:
        label: the row's name.
        method: a name of :data:`icam_med.cam.METHODS`, or ``None`` when ``fn`` is given.
        options: options for :func:`icam_med.cam.make_cam`.
        fn: ``fn(model, x) -> (N, 1, *spatial)`` map for a ``(N, C, *spatial)`` batch
            (used for controls that are not CAM methods).
        description: one line for the table's legend.
    """

    label: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    description: str = ""


def edge_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A model-free "explanation": the gradient magnitude of the input (its edges).

    A control for the randomisation check: it ignores ``model`` entirely, so its maps
    cannot change when the weights are randomised.
    """
    del model
    xs = x.float()
    grads = torch.gradient(xs, dim=tuple(range(2, xs.ndim)))
    mag = torch.sqrt(sum(g * g for g in grads)).sum(1, keepdim=True)
    return mag


def default_methods(*, include_control: bool = True) -> list[MethodSpec]:
    """Integrative CAM, its ablations, the single-layer classics, and the edge control."""
    specs = [
        MethodSpec("integrative", "integrative", {},
                   description="Integrative CAM (stages, bias term, score-weighted fusion)"),
        MethodSpec("integrative-no-bias", "integrative", {"bias_weight": 0.0},
                   description="ablation: bias term removed (bias_weight=0)"),
        MethodSpec("integrative-uniform", "integrative", {"layer_weighting": "uniform"},
                   description="ablation: uniform layer weights"),
        MethodSpec("integrative-last-layer", "integrative", {"target_layers": "last"},
                   description="ablation: last layer only (no fusion)"),
        MethodSpec("gradcam", "gradcam", {"target_layers": "last"}, description="Grad-CAM, last layer"),
        MethodSpec("gradcam++", "gradcam++", {"target_layers": "last"}, description="Grad-CAM++, last layer"),
        MethodSpec("layercam", "layercam", {"target_layers": "last"}, description="LayerCAM, last layer"),
        MethodSpec("hirescam", "hirescam", {"target_layers": "last"}, description="HiResCAM, last layer"),
    ]
    if include_control:
        specs.append(MethodSpec("input-edges (control)", None, {}, edge_map,
                                description="control: input gradient magnitude, ignores the model"))
    return specs


def _explainer(spec: MethodSpec, model: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``explain(x_batch, target) -> (*spatial)`` map of the first sample, for one model."""
    if spec.fn is not None:
        fn = spec.fn

        def run_fn(x: torch.Tensor, target: int) -> torch.Tensor:
            del target
            return fn(model, x)[0, 0]

        return run_fn
    if spec.method is None:
        raise ValueError(f"method row '{spec.label}' gives neither a CAM method nor a function.")
    from icam_med.cam import make_cam

    cam = make_cam(spec.method, model, **spec.options)

    def run_cam(x: torch.Tensor, target: int) -> torch.Tensor:
        return cam(x, targets=target).fused[0, 0]

    return run_cam


@dataclass
class EvaluationResult:
    """Per-volume rows, the per-method summary and the settings that produced them."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    settings: dict[str, Any]
    methods: list[MethodSpec]

    def summary_csv(self) -> str:
        """The summary as CSV: for each column its mean, CI low and CI high."""
        buf = io.StringIO()
        fields = ["method", "n"] + [f"{c}_{s}" for c in COLUMNS for s in ("mean", "ci_low", "ci_high")]
        fields += ["randomisation_flagged"]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.summary:
            writer.writerow({k: row.get(k) for k in fields})
        return buf.getvalue()

    def rows_csv(self) -> str:
        """Every (volume, method) row as CSV."""
        buf = io.StringIO()
        fields = ["volume", "method", "target", "predicted", "mask_voxels", *COLUMNS]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k) for k in fields})
        return buf.getvalue()

    def summary_markdown(self) -> str:
        """The summary as a Markdown table (mean [95 % CI]) with a legend."""
        heads = {
            "pointing_game": "Pointing game % ↑",
            "energy_in_mask": "Energy in mask ↑",
            "deletion_auc": "Deletion AUC ↓",
            "insertion_auc": "Insertion AUC ↑",
            "average_drop": "Avg drop % ↓",
            "increase_in_confidence": "Increase in conf. % ↑",
            "randomisation_rho": "Randomisation ρ ↓",
            "runtime_ms": "Runtime ms ↓",
        }
        cols = [c for c in COLUMNS if any(math.isfinite(r.get(f"{c}_mean", math.nan))
                                          for r in self.summary)]
        lines = ["| Method | " + " | ".join(heads[c] for c in cols) + " |",
                 "|---|" + "---|" * len(cols)]
        for row in self.summary:
            cells = []
            for c in cols:
                m, lo, hi = row[f"{c}_mean"], row[f"{c}_ci_low"], row[f"{c}_ci_high"]
                if not math.isfinite(m):
                    cells.append("n/a")
                    continue
                if c == "runtime_ms":
                    cells.append(f"{m:.0f} [{lo:.0f}, {hi:.0f}]")
                elif c in _PERCENT:
                    cells.append(f"{m:.1f} [{lo:.1f}, {hi:.1f}]")
                else:
                    cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
            if row.get("randomisation_flagged"):
                cells[cols.index("randomisation_rho")] += " **flagged**" if \
                    "randomisation_rho" in cols else ""
            lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
        legend = ["", f"Mean [95 % bootstrap CI] over {self.settings['n_volumes']} volumes. "
                  "↑ higher is better, ↓ lower is better."]
        for spec in self.methods:
            if spec.description:
                legend.append(f"- `{spec.label}`: {spec.description}")
        return "\n".join(lines + legend) + "\n"


def _summarise(rows: list[dict[str, Any]], labels: Sequence[str], *, threshold: float,
               n_boot: int, seed: int) -> list[dict[str, Any]]:
    summary = []
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        out: dict[str, Any] = {"method": label, "n": len(mine)}
        for col in COLUMNS:
            vals = [r[col] for r in mine if r.get(col) is not None]
            vals_arr = np.asarray(vals, dtype=np.float64)
            if col in _PERCENT:
                vals_arr = vals_arr * 100.0
            mean, lo, hi = metrics.bootstrap_ci(vals_arr, n_boot=n_boot, seed=seed)
            out[f"{col}_mean"], out[f"{col}_ci_low"], out[f"{col}_ci_high"] = mean, lo, hi
        rho = out["randomisation_rho_mean"]
        out["randomisation_flagged"] = bool(math.isfinite(rho) and rho > threshold)
        summary.append(out)
    return summary


def evaluate(model: nn.Module, volumes: Iterable[EvalVolume],
             methods: Sequence[MethodSpec] | None = None, *,
             fractions: Sequence[float] = metrics.DEFAULT_FRACTIONS,
             baseline: str = "blur", blur_sigma_mm: float = 16.0, baseline_value: float = 0.0,
             tolerance_mm: float = 4.0, randomisation: bool = True,
             randomisation_threshold: float = 0.5, n_boot: int = 2000, seed: int = 0,
             progress: Callable[[int, str], None] | None = None) -> EvaluationResult:
    """Score every method on every volume.

    Args:
        model: the classifier, on its device (it is not modified; eval mode is used).
        volumes: the scans with their masks (see :class:`EvalVolume`).
        methods: rows to compare (default :func:`default_methods`).
        fractions: perturbation fractions for deletion/insertion.
        baseline: ``"blur"`` (Gaussian-blurred copy of the input, sigma ``blur_sigma_mm``)
            or ``"constant"`` (every removed voxel set to ``baseline_value``).
        blur_sigma_mm: sigma of the blurred baseline.
        baseline_value: value of the constant baseline.
        tolerance_mm: pointing-game tolerance.
        randomisation: run the model-parameter randomisation check.
        randomisation_threshold: mean rank correlation above which a method is flagged.
        n_boot: bootstrap resamples for the confidence intervals.
        seed: seed of tie-breaking, randomisation and bootstrap.
        progress: optional ``progress(volume_index, volume_name)`` callback.

    Returns:
        An :class:`EvaluationResult`.
    """
    if baseline not in ("blur", "constant"):
        raise ValueError(f"baseline must be 'blur' or 'constant', got {baseline!r}.")
    methods = list(methods) if methods is not None else default_methods()
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}.")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    explain = {m.label: _explainer(m, model) for m in methods}
    random_model = metrics.randomize_parameters(model, seed=seed).eval() if randomisation else None
    explain_random = ({m.label: _explainer(m, random_model) for m in methods}
                      if random_model is not None else {})
    rows: list[dict[str, Any]] = []
    n_volumes = 0
    try:
        for vi, vol in enumerate(volumes):
            name = vol.name or f"volume-{vi:04d}"
            if progress is not None:
                progress(vi, name)
            x = torch.as_tensor(vol.x).float().to(device)
            mask = torch.as_tensor(vol.mask).bool()
            if tuple(mask.shape) != tuple(x.shape[1:]):
                raise ValueError(
                    f"{name}: mask shape {tuple(mask.shape)} differs from the image's spatial "
                    f"shape {tuple(x.shape[1:])}."
                )
            if not mask.any():
                raise ValueError(f"{name}: the ground-truth mask is empty; every volume needs a target.")
            xb = x.unsqueeze(0)
            with torch.no_grad():
                predicted = int(model(xb).argmax(1))
            if baseline == "blur":
                sigma = [blur_sigma_mm / float(s) for s in vol.spacing]
                base = metrics.blurred_baseline(x, sigma)
            else:
                base = metrics.constant_baseline(x, baseline_value)
            for spec in methods:
                fn = explain[spec.label]
                if n_volumes == 0:  # warm-up: the first call probes the layers
                    fn(xb, vol.target)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                sal = fn(xb, vol.target)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                runtime_ms = 1000.0 * (time.perf_counter() - t0)
                sal = sal.detach().float()
                common = {"domain": vol.domain, "seed": seed}
                fr, dels = metrics.perturbation_curve(model, x, sal, vol.target, mode="deletion",
                                                      baseline=base, fractions=fractions, **common)
                _, ins = metrics.perturbation_curve(model, x, sal, vol.target, mode="insertion",
                                                    baseline=base, fractions=fractions, **common)
                drop, inc = metrics.confidence_change(model, x, sal, vol.target, baseline=base)
                row = {
                    "volume": name,
                    "method": spec.label,
                    "target": vol.target,
                    "predicted": predicted,
                    "mask_voxels": int(mask.sum()),
                    "pointing_game": metrics.pointing_game(sal.cpu(), mask, vol.spacing,
                                                           tolerance_mm),
                    "energy_in_mask": metrics.energy_inside_mask(sal.cpu(), mask),
                    "deletion_auc": metrics.area_under_curve(fr, dels),
                    "insertion_auc": metrics.area_under_curve(fr, ins),
                    "average_drop": drop,
                    "increase_in_confidence": inc,
                    "randomisation_rho": None,
                    "runtime_ms": runtime_ms,
                }
                if random_model is not None:
                    sal_rand = explain_random[spec.label](xb, vol.target).detach()
                    row["randomisation_rho"] = metrics.rank_correlation(sal, sal_rand)
                rows.append(row)
            n_volumes += 1
    finally:
        model.train(was_training)
    if n_volumes == 0:
        raise ValueError("no volumes to evaluate.")
    settings = {
        "n_volumes": n_volumes,
        "methods": [{"label": m.label, "method": m.method, "options": m.options,
                     "description": m.description} for m in methods],
        "fractions": [float(f) for f in fractions],
        "baseline": baseline,
        "blur_sigma_mm": blur_sigma_mm if baseline == "blur" else None,
        "baseline_value": baseline_value if baseline == "constant" else None,
        "score": "softmax probability of the target class",
        "tolerance_mm": tolerance_mm,
        "randomisation": "full re-initialisation (reset_parameters, running stats reset)"
        if randomisation else None,
        "randomisation_threshold": randomisation_threshold,
        "confidence": 0.95,
        "n_boot": n_boot,
        "seed": seed,
        "device": str(device),
        "torch": torch.__version__,
    }
    summary = _summarise(rows, labels, threshold=randomisation_threshold, n_boot=n_boot, seed=seed)
    return EvaluationResult(rows=rows, summary=summary, settings=settings, methods=methods)
