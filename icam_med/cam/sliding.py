"""Explaining a segmentation network that runs by sliding window (MONAI
``sliding_window_inference``) on a full-size volume, at the volume's own resolution.

The inference cuts the (padded) volume into windows of ``roi_size`` at MONAI's positions
(``dense_patch_slices`` with the scan interval ``int(roi * (1 - overlap))``), runs the model
on batches of ``sw_batch_size`` windows, and blends the window outputs with an importance
map ``w`` (``compute_importance_map``: constant or Gaussian): ``out(v) = sum_i w_i(v)
out_i(v) / Z(v)`` with ``Z = sum_i w_i`` over every window covering ``v``.

The explained score is the blended output of the target label summed over the region ``R``
(a mask on the volume's grid, or the voxels the blended prediction assigns to a label):
``S = sum_{v in R} out_k(v) = sum_i sum_{v in R_i} (w_i(v) / Z(v)) out_{i,k}(v)``. It splits
exactly into one term per window, each a :class:`~icam_med.cam.targets.SegmentationTarget`
of the window with the mask ``R_i * w_i / Z_i``. Only the windows that intersect ``R`` have
a non-zero term, so only those are explained, ``sw_batch_size`` windows per engine call.

The window maps are stitched with the inference's own blending: ``M(v) = sum_i w_i(v)
a_i m_i(v) / Z(v)`` over the explained windows (a skipped window contributes a zero map, as
a zero output would), then min-max normalised over the whole volume. The engine returns each
window's map ``m_i`` normalised to [0, 1]; ``a_i`` puts the windows on one scale: the
window's relevance ``sum_l omega_l max(s_l, 0)`` (the per-layer relevance the engine's own
``layer_weighting`` computes, weighted as in its fusion), so a window holding little of the
evidence is dim, as it would be in one map of the whole volume.

Memory: the volume, ``Z``, the map accumulator and the region (all on the CPU, at the
volume's size), plus one window batch in the engine; never activations of the whole volume.
A predicted region needs the blended prediction first: one gradient-free
``sliding_window_inference`` (the inference's own cost), reduced to the region at once.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from icam_med.cam.targets import SegmentationTarget

__all__ = ["SlidingExplanation", "SlidingWindow", "explain_sliding", "predict_sliding"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlidingWindow:
    """The arguments of MONAI's ``sliding_window_inference`` (same names, same meaning).

    Raises:
        ValueError: a size that is not a positive integer, an overlap outside [0, 1), a
            blending or padding mode MONAI does not have.
    """

    roi_size: tuple[int, ...]
    sw_batch_size: int = 1
    overlap: float = 0.25
    mode: str = "constant"
    sigma_scale: float = 0.125
    padding_mode: str = "constant"
    cval: float = 0.0

    def __post_init__(self) -> None:
        roi = tuple(self.roi_size)
        if len(roi) not in (2, 3) or not all(isinstance(r, int) and not isinstance(r, bool)
                                             and r > 0 for r in roi):
            raise ValueError(f"sliding window roi_size={self.roi_size!r}: expected 2 or 3 "
                             "positive integers (the model's input size).")
        object.__setattr__(self, "roi_size", roi)
        if not isinstance(self.sw_batch_size, int) or self.sw_batch_size < 1:
            raise ValueError(f"sliding window sw_batch_size={self.sw_batch_size!r}: expected a "
                             "positive integer.")
        if not 0.0 <= float(self.overlap) < 1.0:
            raise ValueError(f"sliding window overlap={self.overlap!r}: expected 0 <= overlap < 1.")
        if self.mode not in ("constant", "gaussian"):
            raise ValueError(f"sliding window mode={self.mode!r}: expected 'constant' or "
                             "'gaussian' (MONAI's blending modes).")
        if self.padding_mode not in ("constant", "reflect", "replicate", "circular"):
            raise ValueError(f"sliding window padding_mode={self.padding_mode!r}: expected "
                             "constant, reflect, replicate or circular.")

    @classmethod
    def from_mapping(cls, settings: Any) -> SlidingWindow:
        """From a mapping or an object with the same attributes (a config's settings)."""
        get = settings.get if isinstance(settings, dict) else (
            lambda k, d=None: getattr(settings, k, d))
        return cls(roi_size=tuple(get("roi_size")), sw_batch_size=int(get("sw_batch_size", 1)),
                   overlap=float(get("overlap", 0.25)), mode=str(get("mode", "constant")),
                   sigma_scale=float(get("sigma_scale", 0.125)),
                   padding_mode=str(get("padding_mode", "constant")),
                   cval=float(get("cval", 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {"roi_size": list(self.roi_size), "sw_batch_size": self.sw_batch_size,
                "overlap": self.overlap, "mode": self.mode, "sigma_scale": self.sigma_scale,
                "padding_mode": self.padding_mode, "cval": self.cval}

    def pad_size(self, spatial: Sequence[int]) -> list[int]:
        """``F.pad`` amounts (last axis first), as MONAI pads a volume smaller than a window."""
        pad: list[int] = []
        for k in range(len(spatial) - 1, -1, -1):
            diff = max(self.roi_size[k] - int(spatial[k]), 0)
            pad.extend([diff // 2, diff - diff // 2])
        return pad

    def slices(self, padded: Sequence[int]) -> list[tuple[slice, ...]]:
        """The windows on the padded grid, in MONAI's order (its own utilities)."""
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        n = len(self.roi_size)
        interval = _get_scan_interval(tuple(padded), self.roi_size, n, (self.overlap,) * n)
        return list(dense_patch_slices(tuple(padded), self.roi_size, interval))

    def importance(self, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The window's importance map ``(*roi_size)``, MONAI's ``compute_importance_map``."""
        from monai.data.utils import compute_importance_map

        return compute_importance_map(self.roi_size, mode=self.mode, sigma_scale=self.sigma_scale,
                                      device=device, dtype=dtype)


def predict_sliding(model: torch.nn.Module, x: torch.Tensor, window: SlidingWindow,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """``sliding_window_inference`` of ``model`` on ``x`` ``(N, C, *spatial)``, no gradient.

    Windows run on ``device`` (default: the model's); the blended output stays on ``x``'s
    device.
    """
    from monai.inferers import sliding_window_inference

    dev = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        return sliding_window_inference(
            x, window.roi_size, window.sw_batch_size, model, overlap=window.overlap,
            mode=window.mode, sigma_scale=window.sigma_scale, padding_mode=window.padding_mode,
            cval=window.cval, sw_device=dev, device=x.device)


@dataclass
class SlidingExplanation:
    """A sliding-window explanation of one volume.

    Attributes:
        fused: ``(1, *spatial)`` map on the input's grid, float32 in [0, 1].
        region: ``(1, *spatial)`` float32 region weights on the input's grid (1 inside).
        score: the explained score, the blended target output summed over the region.
        windows_total, windows_explained: windows of the inference, and those intersecting
            the region (the only ones explained).
        layer_weights: layer -> its fusion weight, averaged over the explained windows
            (weighted by each window's relevance).
        layer_scores: layer -> its relevance summed over the explained windows.
        method, options: the engine's method name and options.
        window: the sliding-window settings.
    """

    fused: torch.Tensor
    region: torch.Tensor
    score: float
    windows_total: int
    windows_explained: int
    layer_weights: dict[str, float] = field(default_factory=dict)
    layer_scores: dict[str, float] = field(default_factory=dict)
    method: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    window: SlidingWindow | None = None

    def describe(self) -> dict[str, Any]:
        """The sliding-window part of a record: settings and window counts."""
        return {**(self.window.to_dict() if self.window else {}),
                "windows_total": self.windows_total, "windows_explained": self.windows_explained}


def explain_sliding(
    cam: Any,
    x: torch.Tensor,
    window: SlidingWindow,
    *,
    class_index: int,
    region: torch.Tensor | None = None,
    region_class: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SlidingExplanation:
    """Explain label ``class_index`` of a sliding-window segmentation model over a region.

    Args:
        cam: the CAM engine (:func:`icam_med.cam.make_cam`) of the model.
        x: the volume ``(1, C, *spatial)`` (any size; stays where it is, windows go to the
            engine's device).
        window: the inference's sliding-window settings.
        class_index: the output channel explained.
        region: ``(1, *spatial)`` or ``(*spatial)`` weights on ``x``'s grid (non-zero =
            inside); ``None`` for the voxels the blended prediction assigns to
            ``region_class`` (default ``class_index``).
        region_class: the label whose predicted region is used when ``region`` is ``None``.
        progress: called with ``(windows done, windows to explain)`` after each batch.

    Returns:
        The :class:`SlidingExplanation` (map on ``x``'s grid).

    Raises:
        ValueError: ``x`` is not one volume of the window's dimensionality, the region's
            shape differs from the volume's, a label is out of range, the model is not a
            segmentation network, or the region is empty.
    """
    n_dims = len(window.roi_size)
    if not isinstance(x, torch.Tensor) or x.ndim != n_dims + 2 or x.shape[0] != 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"explain_sliding needs one volume (1, C, {', '.join(['*'] * n_dims)}) "
                         f"matching roi_size {list(window.roi_size)}, got {got}.")
    spatial = tuple(int(s) for s in x.shape[2:])
    x = x.float()
    _check_dense_output(cam, window)
    if region is not None:
        region = torch.as_tensor(region).float()
        if region.ndim == n_dims + 1:
            region = region[0]
        if tuple(region.shape) != spatial:
            raise ValueError(f"the target region has shape {tuple(region.shape)}, the volume "
                             f"{spatial}; give the region on the volume's grid.")
    else:
        k = class_index if region_class is None else region_class
        pred = predict_sliding(cam.model, x, window)
        _check_segmentation_output(pred, k, spatial)
        region = (pred[0].argmax(0) == k).float()
        del pred
    if not bool((region > 0).any()):
        raise ValueError("the target region is empty: no voxel of the volume lies inside it, "
                         "so there is nothing to explain. Give another label or a mask.")

    pad = window.pad_size(spatial)
    if any(pad):
        x = F.pad(x, pad=pad, mode=window.padding_mode,
                  value=window.cval if window.padding_mode == "constant" else None)
        region = F.pad(region[None, None], pad=pad)[0, 0]
    padded = tuple(int(s) for s in x.shape[2:])
    slices = window.slices(padded)
    importance = window.importance().float()
    norm = torch.zeros(padded, dtype=torch.float32)  # Z: the inference's count map
    for s in slices:
        norm[s] += importance
    todo = [s for s in slices if bool((region[s] > 0).any())]
    log.info("sliding-window explanation: %d of %d windows intersect the region",
             len(todo), len(slices))

    acc = torch.zeros(padded, dtype=torch.float32)
    weight_sum: dict[str, float] = {}
    score_sum: dict[str, float] = {}
    relevance_total = 0.0
    score = 0.0
    method, options = "", {}
    for start in range(0, len(todo), window.sw_batch_size):
        batch = todo[start: start + window.sw_batch_size]
        win = torch.cat([x[(slice(None), slice(None), *s)] for s in batch])
        masks = torch.stack([region[s] * importance / norm[s] for s in batch])
        try:
            res = cam(win, targets=SegmentationTarget(class_index, masks)).cpu()
        except ValueError as exc:
            raise ValueError(f"sliding-window explanation, window {batch[0]}: {exc}") from None
        method, options = res.method, res.options
        names = list(res.layer_weights)
        for i, s in enumerate(batch):
            omega = {n: float(res.layer_weights[n][i]) for n in names}
            rel = {n: float(res.layer_scores[n][i]) for n in (res.layer_scores or {})}
            a = sum(omega[n] * max(rel.get(n, 0.0), 0.0) for n in names)
            if not math.isfinite(a):
                a = 0.0
            acc[s] += importance * (a * res.fused[i, 0].float())
            relevance_total += a
            for n in names:
                weight_sum[n] = weight_sum.get(n, 0.0) + a * omega[n]
                score_sum[n] = score_sum.get(n, 0.0) + rel.get(n, 0.0)
            score += float(res.scores[i])
        del res, win, masks
        if progress is not None:
            progress(min(start + window.sw_batch_size, len(todo)), len(todo))
    acc /= norm
    del norm
    if any(pad):
        crop = []
        for d in range(n_dims):
            lo = pad[2 * (n_dims - 1 - d)]
            crop.append(slice(lo, lo + spatial[d]))
        acc, region = acc[tuple(crop)], region[tuple(crop)]
    lo_v, hi_v = float(acc.min()), float(acc.max())
    if hi_v - lo_v > 1e-12:
        acc.sub_(lo_v).div_(hi_v - lo_v)
    else:
        acc.zero_()
    n_layers = max(1, len(weight_sum))
    layer_weights = ({n: w / relevance_total for n, w in weight_sum.items()} if relevance_total > 0
                     else {n: 1.0 / n_layers for n in weight_sum})
    return SlidingExplanation(
        fused=acc[None].contiguous(), region=region[None].contiguous(), score=score,
        windows_total=len(slices), windows_explained=len(todo), layer_weights=layer_weights,
        layer_scores=score_sum, method=method, options=dict(options), window=window)


def _check_dense_output(cam: Any, window: SlidingWindow) -> None:
    """Refuse a classifier before any window runs, from the engine's (cached) probe of one
    window (:meth:`BaseCAM.output_shape`); an engine without one is left to the target's own
    check."""
    output_shape = getattr(cam, "output_shape", None)
    if not callable(output_shape):
        return
    out_shape = output_shape(window.roi_size)
    if len(out_shape) < 2:
        raise ValueError(
            f"the model returns {tuple(out_shape)} class scores for a window, not a "
            "segmentation map: sliding windows are for segmentation networks; remove "
            "'inference.sliding_window' for a classifier.")


def _check_segmentation_output(pred: Any, k: int, spatial: tuple[int, ...]) -> None:
    if not isinstance(pred, torch.Tensor) or pred.ndim != len(spatial) + 2:
        got = tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(
            f"sliding-window inference gave an output of shape {got}, not a segmentation map "
            f"(1, K, {', '.join(str(s) for s in spatial)}); sliding windows are for "
            "segmentation networks: remove 'inference.sliding_window' for a classifier.")
    if not 0 <= k < pred.shape[1]:
        raise ValueError(f"label index {k} is out of range for a segmentation output with "
                         f"{pred.shape[1]} channels (valid: 0..{pred.shape[1] - 1}).")
