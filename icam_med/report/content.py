"""Text shared by the HTML and PDF reports: value formatting, the rows of the method and
scan tables, the signature status, the review rules and the methods appendix. Kept in one
place so both outputs show exactly the same figures, rounded the same way."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icam_med.report.collect import (
    BODY_THRESHOLD_FRACTION,
    CONFIDENT_PROBABILITY,
    LOW_CONFIDENCE_PROBABILITY,
    OUTSIDE_BODY_LIMIT,
    SALIENT_LEVEL,
    CohortData,
)
from icam_med.report.figures import DISPLAY_THRESHOLD, OVERLAY_OPACITY

__all__ = [
    "ModelCard",
    "cohort_rows",
    "fmt",
    "method_rows",
    "methods_appendix",
    "model_rows",
    "overlap_text",
    "region_text",
    "review_rules",
    "scan_rows",
    "second_class_rows",
    "second_class_text",
    "signature_status",
]

#: Options shown only when the method's settings use them: option -> (setting, values).
_USED_WHEN: dict[str, tuple[str, tuple[Any, ...]]] = {
    "tau": ("layer_weighting", ("softmax",)),
    "alpha_beta": ("alpha_fn", ("exp",)),
    "counterfactual_keep": ("layer_weighting", ("counterfactual",)),
}
#: Options already shown in their own row (the method's name, its layers).
_SHOWN_ELSEWHERE = ("method", "target_layers")


def fmt(value: Any) -> str:
    """One value as both reports print it: floats to 4 significant digits (0.9998, never
    rounded up to 1.000), booleans as yes/no, lists and mappings as compact JSON."""
    import json

    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def method_rows(method: dict[str, Any]) -> list[tuple[str, Any]]:
    """The method table: its name, layers and the options it actually used, once each;
    options that its settings leave unused are named in one last row, not listed."""
    opts = dict(method.get("options") or {})
    rows: list[tuple[str, Any]] = [("method", method.get("name")),
                                   ("layers", ", ".join(method.get("layers") or []))]
    unused = []
    for key, value in sorted(opts.items()):
        if key in _SHOWN_ELSEWHERE:
            continue
        rule = _USED_WHEN.get(key)
        if rule is not None and opts.get(rule[0]) not in rule[1]:
            unused.append(key)
            continue
        rows.append((key, value))
    if unused:
        rows.append(("not used by these settings", ", ".join(unused)))
    return rows


@dataclass(frozen=True)
class ModelCard:
    """A model card (intended use, training data, limits) embedded in the report.

    Attributes:
        name: the file's name.
        text: its text.
        sha256: the SHA-256 of its bytes.
        anchor: the HTML id of its appendix section.
    """

    name: str
    text: str
    sha256: str
    anchor: str = "model-card"

    @classmethod
    def read(cls, path: str | Path, anchor: str = "model-card") -> ModelCard:
        """Read a model card (UTF-8 text: Markdown, plain text).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not UTF-8 text.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"model card {p} does not exist; give the model card "
                                    "(e.g. MODEL_CARD.md) of the audited model.")
        raw = p.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"model card {p} is not UTF-8 text; give a Markdown or text "
                             "file.") from None
        return cls(p.name, text, hashlib.sha256(raw).hexdigest(), anchor)


def model_rows(m: dict[str, Any]) -> list[tuple[str, Any]]:
    """The model table (both reports)."""
    contract = m.get("input_contract") or {}
    return [
        ("name", m.get("name")), ("architecture", m.get("architecture")),
        ("architecture arguments", m.get("args")),
        ("weights file", m.get("weights_file")),
        ("weights SHA-256", m.get("weights_sha256")),
        ("weights format", m.get("weights_format")),
        ("parameters", m.get("n_parameters")),
        ("class labels", ", ".join(m.get("labels") or []) or None),
        ("input", f"{contract.get('channels')} channel(s), spatial size "
                  f"{contract.get('spatial_size')}, {contract.get('dtype')}"),
    ]


def cohort_rows(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    """The cohort table (both reports)."""
    acc = metrics["accuracy"]
    return [
        ("scans in the ledger", metrics["n_scans"]), ("explained", metrics["n_ok"]),
        ("failed", metrics["n_failed"]),
        ("verified (files and records intact)", metrics["n_verified"]),
        ("with an expected label", metrics["n_labelled"]),
        ("accuracy against expected labels",
         f"{acc:.1%} ({metrics['n_correct']}/{metrics['n_labelled']})" if acc is not None
         else None),
        ("confident wrong predictions", metrics["n_confident_wrong"]),
        ("scans with a flag", metrics["n_flagged"]),
    ]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def overlap_text(mask_fraction: float | None, mask_volume_fraction: float | None,
                 peak_in_mask: bool | None) -> str | None:
    """The map's mass inside the given mask, with its context: the mask's share of the
    volume (what an evenly spread map would give) and whether the peak lies inside."""
    if mask_fraction is None:
        return None
    text = f"{_pct(mask_fraction)} of the map's mass"
    if mask_volume_fraction is not None:
        text += f"; the mask is {_pct(mask_volume_fraction)} of the volume"
        if mask_volume_fraction > 0:
            text += f" ({mask_fraction / mask_volume_fraction:.3g}x an evenly spread map)"
    if peak_in_mask is not None:
        text += "; the map's peak is " + ("inside" if peak_in_mask else "outside") + " the mask"
    return text


_REGION_SHOWN = {
    "outlined": "outline drawn in green on the slices that cross it",
    "missing": "not drawn: its file (cam_region.nii.gz) is missing",
    "unreadable": "not drawn: its file is unreadable",
    "grid differs": "not drawn: its file is not on the map's grid",
    "voxels differ": "not drawn: its file's voxel count is not the record's",
    "not drawn": "not drawn (figures not built)",
}


def region_text(s: Any) -> str | None:
    """A segmentation target's explained region in words (both reports): its label, where
    it comes from (the mask file given, or the model's predicted voxels of a label), its
    voxel count on the scan's grid, its SHA-256 and whether its outline is drawn; ``None``
    for a scan without a region."""
    r = getattr(s, "region", None)
    if r is None:
        return None
    label = r.get("label") or f"class {r.get('class_index')}"
    if r.get("source") == "predicted":
        src = f"predicted (the voxels the model labels '{r.get('region_label') or label}')"
    elif r.get("source") == "mask":
        src = "mask file"
    else:
        src = fmt(r.get("source"))
    voxels = r.get("voxels")
    text = (f"'{label}' summed over the region: {src}, "
            f"{'-' if voxels is None else int(voxels)} voxels on the scan's grid")
    if r.get("model_grid_voxels") is not None:
        text += f" ({fmt(float(r['model_grid_voxels']))} on the model's grid)"
    if r.get("sha256"):
        text += f", voxel SHA-256 {str(r['sha256'])[:12]}..."
    shown = getattr(s, "region_shown", "not drawn")
    return f"{text}; {_REGION_SHOWN.get(shown, f'not drawn ({shown})')}"


def scan_rows(s: Any) -> list[tuple[str, str]]:
    """The facts of one scan, formatted, for both reports."""
    inp = s.record.input if s.record is not None else None
    region = region_text(s)
    return [
        ("status", fmt(s.status)), ("predicted", fmt(s.predicted_label)),
        ("probability of the predicted class", fmt(s.probability)),
        ("explained class (target)", fmt(s.target_label)),
        ("target score (logit)", fmt(s.score)),
        *([("explained region (segmentation target)", region)] if region else []),
        ("expected label", fmt(s.expected_label)),
        ("agrees with expected label", fmt(None if s.disagrees is None else not s.disagrees)),
        ("salient map mass (values >= 0.5) outside the body", _pct(s.outside_body)),
        ("map mass inside the given mask", fmt(overlap_text(
            s.mask_fraction, s.mask_volume_fraction, s.peak_in_mask))),
        ("mask outline drawn", {"outlined": "yes (voxel SHA-256 matches the record)",
                                "not given": "no (mask not given to the report)"}
         .get(s.mask_shown, f"no ({s.mask_shown})")),
        ("scan drawn under the map", {"matched": "yes (voxel SHA-256 matches the record)",
                                      "not given": "no (scan not given to the report)"}
         .get(s.scan_shown, f"no ({s.scan_shown})")),
        ("input", f"{inp.format} {inp.modality or ''}, shape {list(inp.shape)}, spacing "
                  f"{None if inp.spacing is None else list(inp.spacing)} mm, orientation "
                  f"{inp.orientation}" if inp else "-"),
        ("input voxel SHA-256", fmt(inp.voxel_sha256 if inp else None)),
        ("map of the competing class", fmt(second_class_text(s))),
        ("record", fmt(s.record_path)), ("ledger entry", fmt(s.seq)), ("run", fmt(s.run_id)),
        ("time (UTC)", fmt(s.time_utc)),
        ("verified", "yes" if s.verified else "NO: " + "; ".join(s.problems)),
    ]


def second_class_text(s: Any) -> str | None:
    """One line naming the second class the audit mapped for this scan, or ``None``."""
    c = getattr(s, "second", None)
    if c is None:
        return None
    p = "" if c.probability is None else f", p = {fmt(c.probability)}"
    return (f"{c.why} '{c.label}' (class {c.class_index}{p}): drawn beside the predicted "
            "class's map in the review list")


def second_class_rows(s: Any) -> list[tuple[str, str]]:
    """The facts beside a misclassification pair (both reports): both classes, their
    probabilities and target scores, and the layers each map leans on most."""
    c = s.second

    def top(weights: dict[str, float]) -> str:
        if not weights:
            return "-"
        name = max(weights, key=lambda n: weights[n])
        return f"{name} ({fmt(weights[name])})"

    return [
        ("predicted class", f"'{fmt(s.predicted_label)}', p = {fmt(s.probability)}, "
                            f"score {fmt(s.score)}"),
        (c.why, f"'{fmt(c.label)}' (class {fmt(c.class_index)}), p = {fmt(c.probability)}, "
                f"score {fmt(c.score)}"),
        ("expected label", fmt(s.expected_label)),
        ("heaviest layer (predicted)", top(s.layer_weights)),
        (f"heaviest layer ({c.why})", top(c.layer_weights)),
    ]


def signature_status(verify: Any) -> tuple[str, str]:
    """``(SIGNED | UNSIGNED | BROKEN, explanation)`` of the runs' signed ledger heads."""
    bad = [p for p in verify.problems if p.kind == "signature"]
    n_signed, n_unsigned = len(verify.signed_runs), len(verify.unsigned_runs)
    if bad:
        return "BROKEN", f"{len(bad)} signature problem(s): {bad[0]}"
    checked = ("checked with the site's public key" if verify.signatures_checked else
               "not checked against a public key: run `icam-med verify DIR --public-key KEY`")
    if n_unsigned == 0 and n_signed:
        return "SIGNED", f"all {n_signed} run(s) carry a signed ledger head ({checked})"
    return "UNSIGNED", (f"{n_unsigned} of {n_signed + n_unsigned} run(s) carry no signed ledger "
                        "head: the chain is plain SHA-256, which whoever can rewrite the "
                        "folder can recompute")


def review_rules() -> list[str]:
    """How scans are flagged and ordered in the "review first" list."""
    return [
        "Probability: softmax of the model's recorded logits (sigmoid for a single output); "
        "the probability shown is that of the predicted class.",
        f"Confident wrong: the prediction differs from the expected label and its probability "
        f"is at least {CONFIDENT_PROBABILITY:g}.",
        f"Suspicious map: more than {OUTSIDE_BODY_LIMIT:.0%} of the map's salient mass (the "
        f"sum of its values >= {SALIENT_LEVEL:g}) lies outside the body mask, or the map is "
        "all zero, missing or unreadable. "
        f"Body mask: scan voxels brighter than p1 + {BODY_THRESHOLD_FRACTION:g} x (p99 - p1) "
        "of the scan's own intensities (p = percentile). It needs the scan itself, accepted "
        "only if its voxel SHA-256 equals the one in the audit record.",
        "Outside intended use: the scan violates the intended use its model card states "
        "(modality, body part, voxel spacing, field of view, mean intensity against the "
        "training scans'); it counts as a suspicious map. What could not be checked (e.g. a "
        "NIfTI file has no modality) is recorded as such in the audit record, not as passed.",
        f"Low confidence: the predicted class's probability is below "
        f"{LOW_CONFIDENCE_PROBABILITY:g}.",
        "Misclassification analysis: for a scan with an expected label whose prediction is "
        "wrong, the audit also maps the expected class; for a right prediction with low "
        "confidence, the runner-up class. Both maps are shown side by side, each through "
        "its own peak and with its per-layer weights: where the model found evidence for what "
        "it said, and where for what it should have said (or nearly said).",
        "Order: scans whose evidence does not verify, then confident wrong predictions "
        "(most confident first), then suspicious maps (most salient mass outside first), then other "
        "disagreements and other flags (e.g. a scan given to the report that is not the "
        "audited one), then failed scans.",
    ]


def _opt(options: dict[str, Any], key: str, default: str) -> str:
    value = options.get(key)
    return default if value is None else str(value)


# What each recorded option value computes, in words (the engine's registries say the same; the
# report keeps its own wording because it never imports the engine).
_TERM_TEXT = {
    "layercam": "the activation map is LayerCAM's: each position's activations weighted by "
                "their positive gradients, summed over channels, then ReLU",
    "gradcam++": "channel weights follow Grad-CAM++ (positive gradients weighted by a factor "
                 "alpha derived from an output function of the score, alpha_fn = {alpha_fn}); "
                 "the activation map is the ReLU of the channel-weighted sum of activations",
    "gradcam": "channel weights are the mean gradients (Grad-CAM); the activation map is the "
               "ReLU of the channel-weighted sum of activations",
    "hirescam": "the activation map is HiResCAM's: gradient times activation, summed over "
                "channels, then ReLU",
}
_WEIGHTING_TEXT = {
    "counterfactual": "how much of the score survives when the input is kept only inside the "
                      "layer's top region (one extra batched forward pass without gradients)",
    "score": "the sum of ReLU(gradient x activation)",
    "net": "its net first-order contribution to the score, sum(gradient x activation)",
    "per_position": "its positive net contribution per position",
    "softmax": "a softmax over the log of the sum of ReLU(gradient x activation)",
    "uniform": "equal weights",
}
_FUSION_TEXT = {
    "multiplicative": "fused coarse to fine by multiplication: each finer layer's map is gated "
                      "by the upsampled product of the coarser ones (Poly-CAM style), each map "
                      "raised to a power set by its weight",
    "weighted": "resized (trilinear) to the model's input grid and summed with these weights",
}


def _method_steps(opts: dict[str, Any]) -> list[str]:
    """Steps 2-5 of the methods appendix, in words, for the recorded options."""
    term = _opt(opts, "activation_term", "gradcam++")
    weighting = _opt(opts, "layer_weighting", "score")
    fusion = _opt(opts, "fusion", "weighted")
    bias_weight = _opt(opts, "bias_weight", "0")
    steps = ["2. For each layer, " + _TERM_TEXT.get(term, f"activation_term = {term}").format(
        alpha_fn=_opt(opts, "alpha_fn", "exp")) + f" (activation_term = {term})."]
    try:
        bias_on = float(bias_weight) > 0
    except ValueError:
        bias_on = True
    if bias_on:
        steps.append("3. A bias map adds what the layer's biases contribute (gradient times "
                     f"bias, bias_mode = {_opt(opts, 'bias_mode', 'signed')}, bias_weight = "
                     f"{bias_weight}); both maps are min-max normalised over the whole volume, "
                     "never slice by slice.")
    else:
        steps.append("3. No bias term (bias_weight = 0); each layer's map is min-max "
                     "normalised over the whole volume, never slice by slice.")
    steps.append("4. Each layer gets a weight from "
                 + _WEIGHTING_TEXT.get(weighting, "its relevance")
                 + f" (layer_weighting = {weighting}); weights sum to 1 and are shown per scan.")
    steps.append("5. Layer maps are " + _FUSION_TEXT.get(fusion, f"fused ({fusion})")
                 + f" (fusion = {fusion}), and normalised to [0, 1]; the preprocessing is then "
                 "inverted, putting the map on the scan's own voxel grid with the scan's "
                 "affine.")
    return steps


def methods_appendix(data: CohortData) -> list[tuple[str, list[str]]]:
    """``(heading, paragraphs)`` of the methods appendix."""
    method = data.methods[0] if data.methods else {}
    opts = dict(method.get("options") or {})
    layers = list(method.get("layers") or [])
    sections: list[tuple[str, list[str]]] = []
    sections.append(("Method", [
        f"Method: {method.get('name', 'unknown')}. Integrative CAM (after Singh et al., "
        "arXiv 2412.01354) fuses class-activation maps from several layers of the network "
        "instead of only the last convolutional layer.",
        "1. For each chosen layer, the gradient of the target class score with respect to the "
        "layer's activations is computed in one backward pass.",
        *_method_steps(opts),
        "Options in effect: " + (", ".join(f"{k} = {fmt(v)}" for k, v in
                                           method_rows(method)[2:]) or "none recorded") + ".",
    ]))
    sections.append(("Layers", [
        f"{len(layers)} layer(s), in network order: " + (", ".join(layers) or "none recorded")
        + ".",
    ]))
    sections.append(("Reading the figures", [
        "Each montage shows axial, coronal and sagittal slices through the map's peak (top "
        "row, peak marked +) and through the scan's centre (bottom row), in millimetres: "
        "anisotropic voxels keep their physical proportions. Slices follow the radiological "
        "convention (patient's right on the image's left; anterior on the left in sagittal "
        "views); the side letters are printed on each view. The volume is shown along its "
        "nearest anatomical axes without resampling, so an oblique scan appears in its own "
        "plane. Each view's title gives its plane's position in mm in DICOM patient "
        "coordinates (LPS: x increases to the patient's left, y to posterior, z to "
        "superior), as the napari viewer's status bar and a PACS viewer show them (for an "
        "oblique scan, of the voxel row shown). The map is drawn in the viewer's inferno "
        f"colours on a fixed 0-1 scale; values below {DISPLAY_THRESHOLD:g} (the viewer's "
        "default threshold) are fully transparent, values from it up are drawn at "
        f"{OVERLAY_OPACITY:.0%} opacity. When the report is given the audited mask (its voxel "
        "SHA-256 must match the record's), its outline is drawn in cyan.",
        *(["For a segmentation target, the score explained is the target label's output "
           "summed over a region (a mask file, or the voxels the model predicts as a label). "
           "That region, as the audit wrote it on the scan's grid (cam_region.nii.gz, pinned "
           "in the record), is outlined in green on every slice that crosses it, a third row "
           "of slices runs through the region's voxel nearest its centroid, and the legend "
           "under the slices names it."]
          if any(getattr(s, "region", None) is not None for s in data.scans) else []),
    ]))
    sections.append(("Limitations", [
        "A class-activation map shows where the model's evidence for the target class lies, "
        "not why, and not whether the prediction is right. A plausible map on a wrong "
        "prediction, or a right prediction from the wrong place, are both possible.",
        "Maps are as faithful as the gradients of the model; saturated or poorly calibrated "
        "models can give flat or misleading maps. Faithfulness metrics (deletion/insertion, "
        "randomisation checks) are a separate analysis (icam-med evaluate).",
        "The body mask is an intensity threshold, not a segmentation; it can miss dark tissue "
        "or include bright artefacts. The flags are prompts for review, not findings.",
        "Probabilities are computed from logits; they are only as calibrated as the model.",
        "This report is a view of the audit folder at the time it was built; the ledger and "
        "the records remain the evidence, and `icam-med verify` re-checks them at any time.",
    ]))
    return sections
