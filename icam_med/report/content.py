"""Plain-language text shared by the HTML and PDF reports: review rules and the methods
appendix. Kept in one place so both outputs say exactly the same thing."""

from __future__ import annotations

from typing import Any

from icam_med.report.collect import (
    BODY_THRESHOLD_FRACTION,
    CONFIDENT_PROBABILITY,
    OUTSIDE_BODY_LIMIT,
    SALIENT_LEVEL,
    CohortData,
)

__all__ = ["methods_appendix", "review_rules"]


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
        "Order: scans whose evidence does not verify, then confident wrong predictions "
        "(most confident first), then suspicious maps (most salient mass outside first), then other "
        "disagreements and other flags (e.g. a scan given to the report that is not the "
        "audited one), then failed scans.",
    ]


def _opt(options: dict[str, Any], key: str, default: str) -> str:
    value = options.get(key)
    return default if value is None else str(value)


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
        "2. Channel weights follow Grad-CAM++: positive gradients weighted by a factor alpha "
        "derived from an output function of the score "
        f"(alpha_fn = {_opt(opts, 'alpha_fn', 'exp')}); the activation map is the ReLU of the "
        "channel-weighted sum of activations.",
        "3. A bias map adds what the layer's biases contribute (gradient times bias, "
        f"bias_mode = {_opt(opts, 'bias_mode', 'signed')}, bias_weight = "
        f"{_opt(opts, 'bias_weight', '1.0')}); both maps are min-max normalised over the "
        "whole volume, never slice by slice.",
        "4. Each layer gets a weight from its positive first-order contribution to the score "
        f"(sum of ReLU(gradient x activation); layer_weighting = "
        f"{_opt(opts, 'layer_weighting', 'score')}); weights sum to 1 and are shown per scan.",
        "5. Layer maps are resized (trilinear) to the model's input grid, summed with these "
        "weights and normalised to [0, 1]; the preprocessing is then inverted, putting the map "
        "on the scan's own voxel grid with the scan's affine.",
        "Every option as run: " + (", ".join(f"{k} = {v}" for k, v in sorted(opts.items()))
                                   or "none recorded") + ".",
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
        "plane. Map values below 0.05 are transparent.",
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
