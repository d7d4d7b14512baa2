"""Compare CAM methods on scans whose truth is known: an evaluation that can fail (issue 11).

:func:`evaluate` runs every method (a :class:`MethodSpec` row) on every volume, in the
model's input space (where the ground-truth masks live), and scores each map with
:mod:`icam_med.evaluation.metrics`. The volumes come from the harder benchmark
(:class:`icam_med.evaluation.synthetic.EvalSynthesizer`): dark and bright lesions, one or
two per volume, bright distractors outside the brain, and each volume's healthy twin; or,
in 2-D, from held-out synthetic radiographs with one known bright finding and their healthy
twins (:mod:`icam_med.evaluation.radiograph_suite`, ``icam-med evaluate --suite
radiographs``).

============================  ==================================================  ==========
column                        what                                                better
============================  ==================================================  ==========
``pointing_game``             every peak voxel within ``tolerance_mm`` of a lesion higher
``energy_in_mask``            share of the map's mass inside the lesions           higher
``deletion_auc``              counterfactual deletion: mean target probability     lower
                              while the map's top 0-5 % voxels are copied from
                              the healthy twin
``distractor_hit``            a peak voxel within ``tolerance_mm`` of a           lower
                              distractor
``runtime_ms``                CPU time of the method's call (all threads of the    lower
                              process), per volume; ``wall_ms`` is the wall time
``rho_<block>``               cascading randomisation: Spearman rank              lower
                              correlation with the trained model's map once the
                              blocks from the top down to ``<block>`` are
                              re-initialised (on the first ``n_randomisation``
                              volumes)
============================  ==================================================  ==========

Every column is summarised for all volumes and separately for dark (``hypo``) and bright
(``hyper``) lesions: mean and 95 % percentile-bootstrap CI. The same voxel order
tie-breaking, twin and model are used for every method, so differences between rows come
from the maps alone.

:func:`method_rows` builds the rows for one model: Integrative CAM variants (per-layer
term x layer weighting x fusion x bias term, from the names the engine exposes), the
single-layer classics on every stage, the engine's LayerCAM on ``stages`` with uniform
weights, TorchCAM's fused LayerCAM on the same layers, FullGrad-style all-bias maps, the
coarse-to-fine multiplicative fusion of the engine's LayerCAM maps (Poly-CAM-style
prototype), the rest of the toolbox (:func:`toolbox_rows`, group ``toolbox``: gradient,
guided backprop, SmoothGrad, Guided Grad-CAM, Score-CAM, LRP), and the input intensity and
edge controls. :func:`rank_variants` applies the rule that picks the default
(docs/evaluation.md).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from icam_med.evaluation import metrics
from icam_med.evaluation.baselines import edge_map, intensity_map, polycam_fusion, torchcam_layercam

__all__ = [
    "COLUMNS",
    "GROUPS",
    "EvalVolume",
    "EvaluationResult",
    "MethodSpec",
    "SummaryTable",
    "edge_map",
    "evaluate",
    "method_rows",
    "rank_variants",
    "ranking_markdown",
    "select_rows",
    "toolbox_rows",
]

log = logging.getLogger(__name__)

#: Per-volume metric columns, with whether higher is better.
COLUMNS: dict[str, bool] = {
    "pointing_game": True,
    "energy_in_mask": True,
    "deletion_auc": False,
    "distractor_hit": False,
    "runtime_ms": False,
    "wall_ms": False,
}
_PERCENT = {"pointing_game", "distractor_hit"}
#: Volume groups every column is summarised over.
GROUPS = ("all", "hypo", "hyper")

Explainer = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class EvalVolume:
    """One scan in the model's input space.

    Attributes:
        x: ``(C, *spatial)`` float tensor, preprocessed exactly as the model expects.
        mask: ``(*spatial)`` bool ground-truth mask of the lesions (non-empty).
        target: class index to explain (the true class).
        spacing: voxel size per spatial axis in mm.
        twin: ``(C, *spatial)`` the healthy twin, preprocessed like ``x`` (needed for the
            deletion metric; without it ``deletion_auc`` is left empty).
        distractor_mask: ``(*spatial)`` bool mask of structures the model must ignore.
        polarity: ``"hypo"`` or ``"hyper"`` (the lesions' polarity), or ``None``.
        name: identifier shown in the per-volume table.
    """

    x: torch.Tensor
    mask: torch.Tensor
    target: int
    spacing: tuple[float, ...]
    twin: torch.Tensor | None = None
    distractor_mask: torch.Tensor | None = None
    polarity: str | None = None
    name: str = ""


@dataclass(frozen=True)
class MethodSpec:
    """A row of the comparison.

    Attributes:
        label: the row's name (unique).
        method: a name of :data:`icam_med.cam.METHODS` with ``options`` for
            :func:`icam_med.cam.make_cam`, or ``None`` when ``factory`` is given.
        options: options of the CAM method.
        factory: ``factory(model) -> explain(x, target) -> (N, 1, *spatial) map`` for rows
            that are not one engine call (baselines, controls).
        kind: ``"variant"`` (an Integrative CAM candidate for the default), ``"default"``,
            ``"baseline"``, ``"toolbox"`` (the other methods of the engine, issue 16) or
            ``"control"``.
        description: one line for the table's legend.
    """

    label: str
    method: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    factory: Callable[[nn.Module], Explainer] | None = None
    kind: str = "baseline"
    description: str = ""


def _explainer(spec: MethodSpec, model: nn.Module) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """``explain(x_batch, target) -> (*spatial)`` map of the first sample, for one model."""
    if spec.factory is not None:
        fn = spec.factory(model)
        return lambda x, target: fn(x, target)[0, 0]
    if spec.method is None:
        raise ValueError(f"method row '{spec.label}' gives neither a CAM method nor a factory.")
    from icam_med.cam import make_cam

    cam = make_cam(spec.method, model, **spec.options)
    return lambda x, target: cam(x, targets=target).fused[0, 0]


# ----------------------------------------------------------------------------- the rows


def _engine_names() -> dict[str, list[str]]:
    """The option names the engine exposes now (so new ones join the grid unasked)."""
    from icam_med.cam import base

    terms = ["gradcam++"]
    try:
        from icam_med.cam.methods import ACTIVATION_TERMS

        terms = list(ACTIVATION_TERMS)
    except ImportError:  # pragma: no cover - an engine without the option
        pass
    return {"weighting": list(base.LAYER_WEIGHTINGS), "fusion": list(getattr(base, "FUSIONS",
                                                                           {"weighted": ""})),
            "bias_mode": list(base.BIAS_MODES), "term": terms}


def _polycam_factory(model: nn.Module) -> Explainer:
    from icam_med.cam import make_cam

    cam = make_cam("layercam", model, target_layers="stages", layer_weighting="uniform")

    def run(x: torch.Tensor, target: int) -> torch.Tensor:
        return polycam_fusion(cam(x, targets=target).layer_maps, x.shape[2:])

    return run


def _torchcam_factory(layers: Sequence[str]) -> Callable[[nn.Module], Explainer]:
    def factory(model: nn.Module) -> Explainer:
        return lambda x, target: torchcam_layercam(model, x, target, layers)

    return factory


def _control(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor]
             ) -> Callable[[nn.Module], Explainer]:
    def factory(model: nn.Module) -> Explainer:
        return lambda x, target: fn(model, x)

    return factory


def variant_label(options: Mapping[str, Any]) -> str:
    """A short row label for Integrative CAM options, e.g. ``icam[layercam|net|mult|bias0]``."""
    term = options.get("activation_term", "gradcam++")
    weighting = options.get("layer_weighting", "score")
    fusion = {"weighted": "sum", "multiplicative": "mult"}.get(options.get("fusion", "weighted"),
                                                               options.get("fusion", "weighted"))
    bw = float(options.get("bias_weight", 1.0))
    bias = "bias0" if bw == 0 else f"bias-{options.get('bias_mode', 'signed')}"
    layers = options.get("target_layers", "stages")
    tail = "" if layers == "stages" else f"|{layers}"
    return f"icam[{term}|{weighting}|{fusion}|{bias}{tail}]"


def variant_grid(*, terms: Sequence[str] = ("gradcam++", "layercam"),
                 bias_screen: Sequence[str] = ("signed", "complete")) -> list[dict[str, Any]]:
    """The Integrative CAM candidates compared on the validation split.

    A full factorial of per-layer term (``terms``) x layer weighting (``score``, ``net``,
    ``per_position``, ``counterfactual``, ``uniform``) x fusion (every name of the
    engine's ``FUSIONS``) without the bias term, plus a screen of the bias term: each
    ``bias_mode`` of ``bias_screen`` (those the engine has) at ``score`` weighting for
    every term and fusion. Options the engine does not have are left out.
    """
    names = _engine_names()
    weightings = [w for w in ("score", "net", "per_position", "counterfactual", "uniform")
                  if w in names["weighting"]]
    terms = [t for t in terms if t in names["term"]]
    out: list[dict[str, Any]] = []

    def opts(term: str, weighting: str, fusion: str, bias: str | None) -> dict[str, Any]:
        o: dict[str, Any] = {"target_layers": "stages", "layer_weighting": weighting,
                             "fusion": fusion}
        if len(names["term"]) > 1:
            o["activation_term"] = term
        o.update({"bias_weight": 0.0} if bias is None else {"bias_weight": 1.0, "bias_mode": bias})
        return o

    for term in terms:
        for weighting in weightings:
            for fusion in names["fusion"]:
                out.append(opts(term, weighting, fusion, None))
    for bias in bias_screen:
        if bias not in names["bias_mode"]:
            continue
        for term in terms:
            for fusion in names["fusion"]:
                out.append(opts(term, "score", fusion, bias))
    return out


def engine_default_options() -> dict[str, Any]:
    """The engine's current Integrative CAM defaults, written out option by option.

    The ``integrative (default)`` row takes these when no options are given, so the table
    always has the default row and names every option it used.
    """
    from icam_med.cam.methods import IntegrativeCAM

    return {"target_layers": "stages",
            "activation_term": IntegrativeCAM.default_activation_term,
            "layer_weighting": IntegrativeCAM.default_layer_weighting,
            "fusion": IntegrativeCAM.default_fusion,
            "bias_weight": IntegrativeCAM.default_bias_weight}


def method_rows(model: nn.Module, spatial_shape: Sequence[int], *,
                default_options: Mapping[str, Any] | None = None,
                variants: Iterable[Mapping[str, Any]] | None = None) -> list[MethodSpec]:
    """Every row for one model: variants, the chosen default, baselines and controls.

    Args:
        model: the classifier (its ``stages`` layers name the single-layer rows).
        spatial_shape: the input's spatial shape (the ``stages`` preset depends on it).
        default_options: options of the ``integrative (default)`` row, passed explicitly so
            a table does not depend on the engine's current default; ``None`` leaves the
            row out.
        variants: Integrative CAM option sets to compare (default :func:`variant_grid`).
    """
    from icam_med.cam import make_cam
    from icam_med.cam.base import BIAS_MODES

    layers = make_cam("layercam", model, target_layers="stages").layer_names(spatial_shape)
    rows: list[MethodSpec] = []
    if default_options is not None:
        rows.append(MethodSpec("integrative (default)", "integrative", dict(default_options),
                               kind="default",
                               description="the chosen default, options passed explicitly: "
                                           f"{dict(default_options)}"))
    rows.append(MethodSpec("integrative (previous default)", "integrative",
                           {"target_layers": "stages", "layer_weighting": "score",
                            "fusion": "weighted", "bias_weight": 1.0, "bias_mode": "signed",
                            "alpha_fn": "exp"}, kind="baseline",
                           description="the default before issue 11 (score weights, weighted sum, "
                                       "signed bias, Grad-CAM++ alpha)"))
    for opts in (variants if variants is not None else variant_grid()):
        rows.append(MethodSpec(variant_label(opts), "integrative", dict(opts), kind="variant",
                               description=f"Integrative CAM {dict(opts)}"))
    rows.append(MethodSpec("layercam[stages|uniform|sum]", "layercam",
                           {"target_layers": "stages", "layer_weighting": "uniform"},
                           description="the engine's LayerCAM on `stages`, uniform weights, "
                                       "weighted sum"))
    rows.append(MethodSpec("polycam-prototype[layercam|stages]", None,
                           factory=_polycam_factory,
                           description="coarse-to-fine multiplicative fusion of the engine's "
                                       "LayerCAM per-layer maps (Poly-CAM style), computed in "
                                       "evaluation code"))
    rows.append(MethodSpec("torchcam-layercam[stages]", None, factory=_torchcam_factory(layers),
                           description=f"TorchCAM's LayerCAM on {layers}, fused by fuse_cams"))
    if "complete" in BIAS_MODES:
        rows.append(MethodSpec("fullgrad-style[all|bias-complete]", "integrative",
                               {"target_layers": "all", "bias_mode": "complete",
                                "layer_weighting": "uniform", "bias_weight": 1.0},
                               description="FullGrad-style: every block, complete bias term "
                                           "(all bias-carrying layers), uniform weights"))
    for method in ("gradcam", "gradcam++", "layercam", "hirescam"):
        for layer in layers:
            # A list: a module may share its name with a preset ("stages" in LesionNet).
            rows.append(MethodSpec(f"{method} @ {layer}", method, {"target_layers": [layer]},
                                   description=f"{method} on the single layer {layer}"))
    rows.extend(toolbox_rows())
    rows.append(MethodSpec("input intensity (control)", None, factory=_control(intensity_map),
                           kind="control",
                           description="control: the input's intensity; ignores the model"))
    rows.append(MethodSpec("input edges (control)", None, factory=_control(edge_map),
                           kind="control",
                           description="control: the input's gradient magnitude; ignores the "
                                       "model"))
    return rows


def toolbox_rows() -> list[MethodSpec]:
    """The rest of the toolbox (issue 16), one row per method (group ``toolbox``).

    SmoothGrad appears twice: around the vanilla gradient (the published method) and around
    the chosen Integrative CAM default; Guided Grad-CAM on the last layer's Grad-CAM (as
    published) and on the default's fused map. Rows of methods the engine does not have
    (LRP before it is registered) are left out.
    """
    from icam_med.cam import METHODS

    default = engine_default_options()
    specs = [
        ("gradient[abs]", "gradient", {"rectify": "abs"},
         "vanilla gradient |dS/dx| (Simonyan et al.)"),
        ("guided-backprop[abs]", "guided-backprop", {"rectify": "abs"},
         "guided backpropagation (Springenberg et al.), |.|"),
        ("smoothgrad[gradient|n25|s0.15]", "smoothgrad",
         {"base": "gradient", "n_samples": 25, "sigma": 0.15, "chunk": 8, "seed": 0},
         "SmoothGrad of the vanilla gradient: 25 noisy copies, sigma 0.15 of the range, "
         "8 copies per pass"),
        ("smoothgrad[integrative-default|n8|s0.15]", "smoothgrad",
         {**default, "base": "integrative", "n_samples": 8, "sigma": 0.15, "chunk": 8, "seed": 0},
         "SmoothGrad around the Integrative CAM default: 8 noisy copies in one pass"),
        ("guided-gradcam[gradcam|last]", "guided-gradcam",
         {"cam": "gradcam", "target_layers": "last"},
         "Guided Grad-CAM as published: guided backprop x Grad-CAM of the last block"),
        ("guided-gradcam[integrative-default]", "guided-gradcam", {**default, "cam": "integrative"},
         "guided backprop x the Integrative CAM default's fused map"),
        ("scorecam[last]", "scorecam", {"target_layers": "last", "chunk": 32},
         "Score-CAM (Wang et al.) on the last block: one gradient-free forward per channel"),
        ("lrp[default]", "lrp", {}, "layer-wise relevance propagation, the method's defaults"),
    ]
    return [MethodSpec(label, method, dict(options), kind="toolbox", description=desc)
            for label, method, options, desc in specs if method in METHODS]


#: Row groups accepted by ``--methods`` besides single labels.
ROW_GROUPS = ("default", "variants", "baselines", "single-layer", "controls", "toolbox")


def select_rows(rows: Sequence[MethodSpec], wanted: Sequence[str]) -> list[MethodSpec]:
    """The rows named in ``wanted`` (labels or :data:`ROW_GROUPS`), in table order.

    Labels hold no commas, so a comma-separated list on the command line splits cleanly.

    Raises:
        ValueError: a name is neither a row label nor a group.
    """
    by_label = {r.label: r for r in rows}
    chosen: set[str] = set()
    unknown = []
    for w in wanted:
        if w in by_label:
            chosen.add(w)
        elif w == "default":
            chosen |= {r.label for r in rows if r.kind == "default"}
        elif w == "variants":
            chosen |= {r.label for r in rows if r.kind == "variant"}
        elif w == "controls":
            chosen |= {r.label for r in rows if r.kind == "control"}
        elif w == "single-layer":
            chosen |= {r.label for r in rows if " @ " in r.label}
        elif w == "baselines":
            chosen |= {r.label for r in rows if r.kind == "baseline"}
        elif w == "toolbox":
            chosen |= {r.label for r in rows if r.kind == "toolbox"}
        else:
            unknown.append(w)
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; give row labels or groups {list(ROW_GROUPS)} "
                         f"(labels: {sorted(by_label)}).")
    return [r for r in rows if r.label in chosen]


# ----------------------------------------------------------------------------- results


def _fmt(col: str, m: float, lo: float, hi: float) -> str:
    if not math.isfinite(m):
        return "n/a"
    if col in ("runtime_ms", "wall_ms"):
        return f"{m:.0f}"
    if col in _PERCENT:
        return f"{m:.0f} [{lo:.0f}, {hi:.0f}]"
    if col.startswith("rho_"):
        return f"{m:.2f} [{lo:.2f}, {hi:.2f}]"
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


@dataclass
class EvaluationResult:
    """Per-volume rows, the per-method summary and the settings that produced them."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    settings: dict[str, Any]
    methods: list[MethodSpec]
    rho_columns: list[str] = field(default_factory=list)

    def _columns(self) -> list[str]:
        return [*COLUMNS, *self.rho_columns]

    def summary_csv(self) -> str:
        """The summary as CSV: per method and group, each column's mean, CI low and CI high."""
        buf = io.StringIO()
        fields = ["method", "kind", "group", "n"] + [
            f"{c}_{s}" for c in self._columns() for s in ("mean", "ci_low", "ci_high")]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.summary:
            writer.writerow({k: row.get(k) for k in fields})
        return buf.getvalue()

    def rows_csv(self) -> str:
        """Every (volume, method) row as CSV."""
        buf = io.StringIO()
        fields = ["volume", "polarity", "n_lesions", "method", "target", "predicted",
                  "p_target", "p_twin", "mask_voxels", *self._columns()]
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: row.get(k) for k in fields})
        return buf.getvalue()

    def cell(self, method: str, group: str, col: str) -> tuple[float, float, float]:
        """``(mean, ci_low, ci_high)`` of one summary cell."""
        for row in self.summary:
            if row["method"] == method and row["group"] == group:
                return (row[f"{col}_mean"], row[f"{col}_ci_low"], row[f"{col}_ci_high"])
        raise KeyError(f"no summary row for method {method!r}, group {group!r}.")

    def summary_markdown(self, title: str | None = None, *, by_polarity: bool = True) -> str:
        """Tables in Markdown: the metrics, then the randomisation check.

        Args:
            title: the section's heading.
            by_polarity: one column per metric for dark and one for bright lesions (the
                brain benchmark); ``False`` gives one column per metric over every case (a
                suite with one polarity, such as the radiographs' bright findings), and
                leaves out the distractor column when no case has a distractor.
        """
        labels = [m.label for m in self.methods]
        lines = [f"### {title}", ""] if title else []
        if by_polarity:
            cols = [("pointing_game", "hypo", "Pointing % dark ↑"),
                    ("pointing_game", "hyper", "Pointing % bright ↑"),
                    ("deletion_auc", "hypo", "Deletion AUC dark ↓"),
                    ("deletion_auc", "hyper", "Deletion AUC bright ↓"),
                    ("energy_in_mask", "hypo", "Energy dark ↑"),
                    ("energy_in_mask", "hyper", "Energy bright ↑"),
                    ("distractor_hit", "all", "Distractor hit % ↓"),
                    ("runtime_ms", "all", "CPU ms ↓")]
        else:
            cols = [("pointing_game", "all", "Pointing % ↑"),
                    ("deletion_auc", "all", "Deletion AUC ↓"),
                    ("energy_in_mask", "all", "Energy in finding ↑")]
            if any(r.get("distractor_hit") is not None for r in self.rows):
                cols.append(("distractor_hit", "all", "Distractor hit % ↓"))
            cols.append(("runtime_ms", "all", "CPU ms ↓"))
        lines += ["| Method | " + " | ".join(c[2] for c in cols) + " |",
                  "|---|" + "---|" * len(cols)]
        for label in labels:
            cells = [_fmt(col, *self.cell(label, group, col)) for col, group, _ in cols]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        n = self.settings.get("n_volumes")
        counts = self.settings.get("n_by_polarity", {})
        lines += ["", f"Mean [95 % bootstrap CI] over {n} volumes ({counts.get('hypo', '?')} "
                  f"dark, {counts.get('hyper', '?')} bright). ↑ higher is better, ↓ lower is "
                  "better." if by_polarity else
                  f"Mean [95 % bootstrap CI] over {n} cases. ↑ higher is better, ↓ lower is "
                  "better."]
        if self.rho_columns:
            nr = self.settings.get("n_randomisation_volumes")
            lines += ["", f"Cascading randomisation (Spearman ρ with the trained model's map; "
                      f"blocks re-initialised from the top down to the named one; {nr} volumes):",
                      "", "| Method | " + " | ".join(f"→ {c[4:]}" for c in self.rho_columns)
                      + " |", "|---|" + "---|" * len(self.rho_columns)]
            for label in labels:
                cells = [_fmt(c, *self.cell(label, "all", c)) for c in self.rho_columns]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        legend = [""] + [f"- `{m.label}`: {m.description}" for m in self.methods if m.description]
        return "\n".join(lines + legend) + "\n"


def _summarise(rows: list[dict[str, Any]], methods: Sequence[MethodSpec], columns: Sequence[str],
               *, n_boot: int, seed: int) -> list[dict[str, Any]]:
    summary = []
    for spec in methods:
        mine = [r for r in rows if r["method"] == spec.label]
        for group in GROUPS:
            sel = mine if group == "all" else [r for r in mine if r["polarity"] == group]
            out: dict[str, Any] = {"method": spec.label, "kind": spec.kind, "group": group,
                                   "n": len(sel)}
            for col in columns:
                vals = np.asarray([r[col] for r in sel if r.get(col) is not None], dtype=np.float64)
                if col in _PERCENT:
                    vals = vals * 100.0
                mean, lo, hi = metrics.bootstrap_ci(vals, n_boot=n_boot, seed=seed)
                out[f"{col}_mean"], out[f"{col}_ci_low"], out[f"{col}_ci_high"] = mean, lo, hi
            summary.append(out)
    return summary


# ----------------------------------------------------------------------------- the run


def evaluate(model: nn.Module, volumes: Iterable[EvalVolume], methods: Sequence[MethodSpec], *,
             fractions: Sequence[float] | None = None, tolerance_mm: float = 4.0,
             n_randomisation: int = 10, n_boot: int = 2000, seed: int = 0,
             progress: Callable[[int, str], None] | None = None) -> EvaluationResult:
    """Score every method on every volume.

    Args:
        model: the classifier, on its device (it is not modified; eval mode is used).
        volumes: the scans with their masks and twins (see :class:`EvalVolume`).
        methods: rows to compare (see :func:`method_rows`).
        fractions: counterfactual deletion fractions (default
            :func:`metrics.deletion_fractions`: 0-5 % of the volume in 0.1 % steps).
        tolerance_mm: pointing-game and distractor-hit tolerance.
        n_randomisation: how many of the first volumes get the cascading randomisation
            check (0 skips it).
        n_boot: bootstrap resamples for the confidence intervals.
        seed: seed of tie-breaking, randomisation and bootstrap.
        progress: optional ``progress(volume_index, volume_name)`` callback.

    Returns:
        An :class:`EvaluationResult`.
    """
    methods = list(methods)
    if not methods:
        raise ValueError("no method rows to evaluate.")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"method labels must be unique, got {labels}.")
    if n_randomisation < 0:
        raise ValueError(f"n_randomisation must be >= 0, got {n_randomisation}.")
    fractions = tuple(metrics.deletion_fractions() if fractions is None else fractions)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    explain = {m.label: _explainer(m, model) for m in methods}
    cascade = ([(label, copy.eval()) for label, copy in metrics.cascading_randomisation(model,
                                                                                      seed=seed)]
               if n_randomisation else [])
    rho_columns = [f"rho_{label}" for label, _ in cascade]
    explain_random: dict[tuple[str, int], Explainer] = {}
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
                raise ValueError(f"{name}: mask shape {tuple(mask.shape)} differs from the image's "
                                 f"spatial shape {tuple(x.shape[1:])}.")
            if not mask.any():
                raise ValueError(f"{name}: the ground-truth mask is empty; every volume needs a "
                                 "target.")
            xb = x.unsqueeze(0)
            twin = None if vol.twin is None else torch.as_tensor(vol.twin).float().to(device)
            with torch.no_grad():
                probs = torch.softmax(model(xb if twin is None else torch.stack([x, twin])).float(), 1)
            predicted = int(probs[0].argmax())
            p_twin = None if twin is None else float(probs[1, vol.target])
            n_lesions, mask_voxels = int(_count_components(mask)), int(mask.sum())  # per volume
            for spec in methods:
                fn = explain[spec.label]
                if n_volumes == 0:  # warm-up: the first call probes the layers
                    fn(xb, vol.target)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0, c0 = time.perf_counter(), time.process_time()
                sal = fn(xb, vol.target)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                wall_ms = 1000.0 * (time.perf_counter() - t0)
                # CPU time of the process: on a machine shared with other jobs it measures
                # the method's cost, where wall time also measures the neighbours.
                runtime_ms = 1000.0 * (time.process_time() - c0)
                sal = sal.detach().float()
                sal_cpu = sal.cpu()
                row: dict[str, Any] = {
                    "volume": name, "polarity": vol.polarity,
                    "n_lesions": n_lesions, "method": spec.label,
                    "target": vol.target, "predicted": predicted,
                    "p_target": float(probs[0, vol.target]), "p_twin": p_twin,
                    "mask_voxels": mask_voxels,
                    "pointing_game": metrics.pointing_game(sal_cpu, mask, vol.spacing,
                                                           tolerance_mm),
                    "energy_in_mask": metrics.energy_inside_mask(sal_cpu, mask),
                    "deletion_auc": None, "distractor_hit": None, "runtime_ms": runtime_ms,
                    "wall_ms": wall_ms,
                }
                if twin is not None:
                    row["deletion_auc"] = metrics.counterfactual_deletion(
                        model, x, twin, sal, vol.target, fractions=fractions, seed=seed)[2]
                if vol.distractor_mask is not None and torch.as_tensor(vol.distractor_mask).any():
                    row["distractor_hit"] = metrics.distractor_hit(
                        sal_cpu, vol.distractor_mask, vol.spacing, tolerance_mm)
                for d, (label, rand_model) in enumerate(cascade):
                    col = f"rho_{label}"
                    row[col] = None
                    if vi >= n_randomisation:
                        continue
                    key = (spec.label, d)
                    if key not in explain_random:
                        explain_random[key] = _explainer(spec, rand_model)
                    row[col] = metrics.rank_correlation(sal_cpu,
                                                        explain_random[key](xb, vol.target).detach())
                rows.append(row)
            n_volumes += 1
    finally:
        model.train(was_training)
    if n_volumes == 0:
        raise ValueError("no volumes to evaluate.")
    by_pol = {p: len({r["volume"] for r in rows if r["polarity"] == p}) for p in ("hypo", "hyper")}
    settings = {
        "n_volumes": n_volumes,
        "n_by_polarity": by_pol,
        "methods": [{"label": m.label, "kind": m.kind, "method": m.method, "options": m.options,
                     "description": m.description} for m in methods],
        "deletion": "counterfactual: the map's top voxels (whole volume, ties in a seeded random "
                    "order) copied from the healthy twin; AUC = mean softmax probability of the "
                    "target over the fractions (trapezoid rule / last fraction)",
        "deletion_fractions": [float(f) for f in fractions],
        "score": "softmax probability of the target class",
        "tolerance_mm": tolerance_mm,
        "randomisation": ("cascading (Adebayo et al. 2018): blocks re-initialised cumulatively "
                          "from the top (reset_parameters, running statistics reset), "
                          f"blocks {[c[4:] for c in rho_columns]}") if cascade else None,
        "n_randomisation_volumes": min(n_randomisation, n_volumes) if cascade else 0,
        "confidence": 0.95,
        "n_boot": n_boot,
        "seed": seed,
        "device": str(device),
        "torch": torch.__version__,
    }
    summary = _summarise(rows, methods, [*COLUMNS, *rho_columns], n_boot=n_boot, seed=seed)
    return EvaluationResult(rows=rows, summary=summary, settings=settings, methods=methods,
                            rho_columns=rho_columns)


def _count_components(mask: torch.Tensor) -> int:
    from scipy import ndimage

    return int(ndimage.label(mask.cpu().numpy())[1])


# ----------------------------------------------------------------------------- the choice


@dataclass
class SummaryTable:
    """A summary (per method and group, each column's mean and CI), from a run or its CSV."""

    rows: list[dict[str, Any]]

    @classmethod
    def from_result(cls, result: EvaluationResult) -> SummaryTable:
        return cls([dict(r) for r in result.summary])

    @classmethod
    def from_csv(cls, path: str | Any) -> SummaryTable:
        """Read a ``summary.csv`` written by :meth:`EvaluationResult.summary_csv`."""
        from pathlib import Path

        rows = []
        with Path(path).open(newline="", encoding="utf-8") as fh:
            for raw in csv.DictReader(fh):
                row: dict[str, Any] = {}
                for k, v in raw.items():
                    if k in ("method", "kind", "group"):
                        row[k] = v
                    elif k == "n":
                        row[k] = int(v)
                    else:
                        row[k] = float(v) if v not in ("", None) else math.nan
                rows.append(row)
        if not rows:
            raise ValueError(f"{path}: the summary is empty.")
        return cls(rows)

    def labels(self, kinds: Sequence[str] | None = None) -> list[str]:
        out: list[str] = []
        for r in self.rows:
            if r["method"] not in out and (kinds is None or r["kind"] in kinds):
                out.append(r["method"])
        return out

    def cell(self, method: str, group: str, col: str) -> tuple[float, float, float]:
        for row in self.rows:
            if row["method"] == method and row["group"] == group:
                return (row[f"{col}_mean"], row[f"{col}_ci_low"], row[f"{col}_ci_high"])
        raise KeyError(f"no summary row for method {method!r}, group {group!r}.")


def rank_variants(tables: Sequence[tuple[str, SummaryTable]], *,
                  kinds: Sequence[str] = ("variant",)) -> list[dict[str, Any]]:
    """The rule that picks the default: best mean rank, ties broken by speed.

    For every model and every polarity (dark, bright), the rows of ``kinds`` are ranked on
    the pointing game (higher is better) and on counterfactual deletion AUC (lower is
    better); ties share the average rank. A row's score is its mean rank over these
    ``2 x 2 x n_models`` rankings; the lowest wins, ties broken by the mean runtime.

    Args:
        tables: ``(model name, summary)`` per model; the rows must be the same.
        kinds: which rows compete.

    Returns:
        One dict per row, best first: ``label``, ``mean_rank``, ``runtime_ms`` and the
        per-ranking ranks.
    """
    from scipy import stats

    if not tables:
        raise ValueError("rank_variants needs at least one model's summary.")
    labels = tables[0][1].labels(kinds)
    if not labels:
        raise ValueError(f"no rows of kind {list(kinds)} to rank.")
    ranks: dict[str, dict[str, float]] = {label: {} for label in labels}
    runtime: dict[str, list[float]] = {label: [] for label in labels}
    for model_name, table in tables:
        for group in ("hypo", "hyper"):
            for col, higher in (("pointing_game", True), ("deletion_auc", False)):
                vals = np.asarray([table.cell(label, group, col)[0] for label in labels], float)
                vals = np.where(np.isfinite(vals), vals, -np.inf if higher else np.inf)
                r = stats.rankdata(-vals if higher else vals, method="average")
                for label, rank in zip(labels, r, strict=True):
                    ranks[label][f"{model_name}:{group}:{col}"] = float(rank)
        for label in labels:
            runtime[label].append(table.cell(label, "all", "runtime_ms")[0])
    out = [{"label": label, "mean_rank": float(np.mean(list(ranks[label].values()))),
            "runtime_ms": float(np.mean(runtime[label])), "ranks": ranks[label]}
           for label in labels]
    out.sort(key=lambda t: (t["mean_rank"], t["runtime_ms"]))
    return out


def ranking_markdown(ranking: Sequence[Mapping[str, Any]], top: int | None = None) -> str:
    """The ranking as a Markdown table (mean rank, then each ranking's rank)."""
    if not ranking:
        return ""
    keys = list(ranking[0]["ranks"])
    heads = [k.replace(":pointing_game", " PG").replace(":deletion_auc", " Del")
             .replace(":hypo", " dark").replace(":hyper", " bright") for k in keys]
    lines = ["| # | Row | Mean rank | " + " | ".join(heads) + " | ms |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for i, r in enumerate(ranking[:top] if top else ranking, 1):
        cells = " | ".join(f"{r['ranks'][k]:.1f}" for k in keys)
        lines.append(f"| {i} | {r['label']} | {r['mean_rank']:.2f} | {cells} | "
                     f"{r['runtime_ms']:.0f} |")
    return "\n".join(lines) + "\n"
