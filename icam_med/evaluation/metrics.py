"""Metrics that score a saliency map against the truth and against the model.

All functions take one sample at a time and work for any number of spatial dimensions
(2D images and 3D volumes alike): a saliency map and a mask have shape ``(*spatial)``, an
input ``x`` has shape ``(C, *spatial)``. Maps are non-negative (CAM maps are); only their
order matters to the perturbation metrics.

Localisation (needs a ground-truth mask)
    :func:`pointing_game`, :func:`energy_inside_mask`.
    :func:`distractor_hit` (the peak on a structure the model must ignore).
Faithfulness (needs the model)
    :func:`counterfactual_deletion` (the evaluation's deletion metric): the map's top
    voxels are replaced by the same voxels of the volume's healthy twin, in fine steps
    over the first few percent of the volume. :func:`perturbation_curve` with
    :func:`area_under_curve` gives the classic deletion and insertion AUCs (Petsiuk et
    al., RISE, 2018) against a blurred or constant baseline; :func:`confidence_change`
    gives the average drop and the increase in confidence (Chattopadhay et al.,
    Grad-CAM++, 2018).
Sanity (needs the model)
    :func:`cascade_groups` and :func:`cascading_randomisation` implement the cascading
    model-parameter randomisation test of Adebayo et al. (2018), from the top layer down;
    :func:`randomize_parameters` re-initialises a whole model; :func:`rank_correlation`
    compares maps. A map that stays the same when the weights are re-initialised does not
    explain the model.
Aggregation
    :func:`bootstrap_ci` (percentile bootstrap of the mean).

The perturbation metrics need a *baseline*, the value a voxel takes when it is "removed".
The default (:func:`blurred_baseline`) is a Gaussian-blurred copy of the input: it keeps
the image's coarse intensities (so removing voxels does not paint artificial dark holes,
which a lesion detector would read as lesions) while erasing structure finer than the
blur. A constant baseline is available too (``constant_baseline``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "DEFAULT_FRACTIONS",
    "area_under_curve",
    "blurred_baseline",
    "bootstrap_ci",
    "cascade_groups",
    "cascading_randomisation",
    "confidence_change",
    "constant_baseline",
    "counterfactual_deletion",
    "deletion_fractions",
    "distractor_hit",
    "energy_inside_mask",
    "perturbation_curve",
    "pointing_game",
    "randomisation_check",
    "randomize_parameters",
    "rank_correlation",
    "saliency_order",
]

#: Fractions of the perturbed domain at which the deletion/insertion score is read. Denser
#: at the start, where small targets (a lesion is often < 1 % of a brain) are decided;
#: the AUC uses the trapezoid rule on this axis, so uneven steps are weighted correctly.
DEFAULT_FRACTIONS: tuple[float, ...] = (
    0.0, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0,
)


def _spatial(saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None,
             name: str = "saliency") -> tuple[torch.Tensor, torch.Tensor | None]:
    s = torch.as_tensor(saliency).detach().float()
    m = None if mask is None else torch.as_tensor(mask).detach().bool().to(s.device)
    if m is not None and s.shape != m.shape:
        raise ValueError(
            f"{name} has shape {tuple(s.shape)} but the mask has {tuple(m.shape)}; give both on "
            "the same grid, without batch or channel axes (shape (*spatial))."
        )
    if s.ndim < 1 or s.numel() == 0:
        raise ValueError(f"{name} must be a non-empty (*spatial) array, got shape {tuple(s.shape)}.")
    if not torch.isfinite(s).all():
        raise ValueError(f"{name} holds NaN or Inf values.")
    return s, m


# ----------------------------------------------------------------------------- localisation


def pointing_game(saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray,
                  spacing: Sequence[float] | None = None, tolerance_mm: float = 0.0) -> float:
    """Pointing game: is the map's peak on the target?

    The peak is the set of voxels holding the map's maximum. The result is 1.0 when every
    peak voxel lies within ``tolerance_mm`` of the mask (distance between voxel centres,
    in mm using ``spacing``), else 0.0. A map with a plateau as its maximum must have the
    whole plateau on target, so a constant map scores a hit only if the mask (grown by the
    tolerance) covers the whole image. An empty mask is an error (nothing to point at).

    Args:
        saliency: ``(*spatial)`` map.
        mask: ``(*spatial)`` bool ground truth.
        spacing: voxel size per axis in mm (default 1 per axis).
        tolerance_mm: how far outside the mask a peak may fall and still count.
    """
    from scipy import ndimage

    s, m = _spatial(saliency, mask)
    if not m.any():
        raise ValueError("pointing_game: the mask is empty; there is no target to point at.")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}.")
    sp = tuple(float(v) for v in spacing) if spacing is not None else (1.0,) * s.ndim
    if len(sp) != s.ndim:
        raise ValueError(f"spacing {sp} must have one value per spatial axis ({s.ndim}).")
    peak = (s == s.max()).cpu().numpy()
    m_np = m.cpu().numpy()
    if tolerance_mm > 0:
        dist = ndimage.distance_transform_edt(~m_np, sampling=sp)
        target = dist <= tolerance_mm + 1e-6
    else:
        target = m_np
    return float(bool(target[peak].all()))


def energy_inside_mask(saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray
                       ) -> float:
    """Share of the map's total (non-negative) energy that falls inside the mask.

    ``sum(relu(s) * mask) / sum(relu(s))``: 1 for a map confined to the target, the mask's
    volume fraction for a constant map, 0 for a map that avoids the target. An all-zero
    map explains nothing and scores 0.
    """
    s, m = _spatial(saliency, mask)
    s = s.clamp_min(0)
    total = float(s.sum())
    if total <= 0:
        return 0.0
    return float((s * m).sum()) / total


def distractor_hit(saliency: torch.Tensor | np.ndarray, distractor_mask: torch.Tensor | np.ndarray,
                   spacing: Sequence[float] | None = None, tolerance_mm: float = 0.0) -> float:
    """Is the map's peak on a distractor (a structure the model must ignore)?

    1.0 when any voxel holding the map's maximum lies within ``tolerance_mm`` of the
    distractor mask, else 0.0; NaN when the volume has no distractor (nothing to hit).
    A constant map (its plateau covers everything) hits every distractor.
    """
    from scipy import ndimage

    s, m = _spatial(saliency, distractor_mask, name="saliency")
    if not m.any():
        return math.nan
    sp = tuple(float(v) for v in spacing) if spacing is not None else (1.0,) * s.ndim
    peak = (s == s.max()).cpu().numpy()
    m_np = m.cpu().numpy()
    near = (ndimage.distance_transform_edt(~m_np, sampling=sp) <= tolerance_mm + 1e-6
            if tolerance_mm > 0 else m_np)
    return float(bool(near[peak].any()))


# ----------------------------------------------------------------------------- faithfulness


def _gaussian_kernel1d(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def blurred_baseline(x: torch.Tensor, sigma_vox: float | Sequence[float]) -> torch.Tensor:
    """A Gaussian-blurred copy of ``x`` ``(C, *spatial)`` (separable, zero padding, any dims).

    Args:
        x: the input image.
        sigma_vox: blur sigma in voxels, one value or one per spatial axis (use
            ``sigma_mm / spacing``); 0 leaves that axis unblurred.
    """
    x = torch.as_tensor(x).float()
    nd = x.ndim - 1
    sig = [float(sigma_vox)] * nd if np.isscalar(sigma_vox) else [float(v) for v in sigma_vox]
    if len(sig) != nd:
        raise ValueError(f"sigma_vox {sig} must have one value per spatial axis ({nd}).")
    out = x.unsqueeze(0)  # (1, C, *S)
    c = x.shape[0]
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[nd] if nd in (1, 2, 3) else None
    if conv is None:
        raise ValueError(f"blurred_baseline supports 1 to 3 spatial dims, got {nd}.")
    for axis, s in enumerate(sig):
        if s <= 0:
            continue
        k = _gaussian_kernel1d(s, x.device)
        shape = [1] * nd
        shape[axis] = k.numel()
        weight = k.view(1, 1, *shape).repeat(c, 1, *([1] * nd))
        pad = [0] * nd
        pad[axis] = k.numel() // 2
        out = conv(out, weight, padding=tuple(pad), groups=c)
    return out[0]


def constant_baseline(x: torch.Tensor, value: float = 0.0) -> torch.Tensor:
    """A baseline of one constant value, shaped like ``x``."""
    return torch.full_like(torch.as_tensor(x).float(), float(value))


def saliency_order(saliency: torch.Tensor, *, seed: int = 0,
                   domain: torch.Tensor | None = None) -> torch.Tensor:
    """Flat voxel indices from most to least salient; ties in a seeded random order.

    Random tie-breaking makes a constant map behave like a random ordering (the chance
    level) rather than like a raster scan. With ``domain`` (bool ``(*spatial)``), only the
    voxels inside it are returned.
    """
    s = saliency.reshape(-1)
    idx = torch.arange(s.numel(), device=s.device)
    if domain is not None:
        idx = idx[domain.reshape(-1).to(s.device)]
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    perm = torch.randperm(idx.numel(), generator=gen).to(s.device)
    idx = idx[perm]
    order = torch.argsort(s[idx], descending=True, stable=True)
    return idx[order]


def _scores(model: nn.Module, batch: torch.Tensor, target: int, score: str) -> torch.Tensor:
    logits = model(batch)
    if score == "probability":
        return torch.softmax(logits.float(), dim=1)[:, target]
    if score == "logit":
        return logits.float()[:, target]
    raise ValueError(f"score must be 'probability' or 'logit', got {score!r}.")


def _prefix_scores(model: nn.Module, start: torch.Tensor, end: torch.Tensor, order: torch.Tensor,
                   ks: Sequence[int], target: int, score: str, batch_size: int) -> torch.Tensor:
    """The target's score (float64, CPU) of each input ``start`` with its first ``k`` voxels
    of ``order`` taken from ``end`` (all channels), for every ``k`` of ``ks``; the model is
    run in eval mode, batch by batch, and its training flag restored."""
    shape = start.shape[1:]
    rank = torch.full((math.prod(shape),), order.numel() + 1, dtype=torch.long, device=start.device)
    rank[order] = torch.arange(order.numel(), device=start.device)
    rank = rank.view(1, *shape)  # broadcast over channels
    scores = []
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(ks), batch_size):
            batch = torch.stack([torch.where(rank < int(k), end, start) for k in ks[i:i + batch_size]])
            scores.append(_scores(model, batch, target, score).double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


@torch.no_grad()
def perturbation_curve(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, target: int, *,
                       mode: str = "deletion", baseline: torch.Tensor | None = None,
                       fractions: Sequence[float] = DEFAULT_FRACTIONS,
                       domain: torch.Tensor | None = None, score: str = "probability",
                       batch_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deletion or insertion curve of one sample.

    Deletion: starting from ``x``, voxels are replaced by ``baseline`` in order of
    decreasing saliency; insertion: starting from ``baseline``, voxels of ``x`` are
    revealed in the same order. At each fraction ``f`` of the domain's voxels the target
    class's score is read. A faithful map makes deletion fall fast (low AUC) and insertion
    rise fast (high AUC). All channels of a voxel are perturbed together.

    Args:
        model: the classifier, in eval mode (it is not modified).
        x: ``(C, *spatial)`` input, as the model sees it.
        saliency: ``(*spatial)`` map on the same grid.
        target: class index whose score is followed.
        mode: ``"deletion"`` or ``"insertion"``.
        baseline: the "removed" image (default: :func:`blurred_baseline` with sigma 4 voxels).
        fractions: increasing fractions in ``[0, 1]``; must start at 0 and end at 1.
        domain: bool ``(*spatial)`` voxels that may be perturbed (default: all). Fractions
            are of the domain's voxel count.
        score: ``"probability"`` (softmax of the target, default) or ``"logit"``.
        batch_size: perturbed copies per forward pass.
        seed: tie-breaking seed (see :func:`saliency_order`).

    Returns:
        ``(fractions, scores)`` as float64 arrays.
    """
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}.")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size < 2 or fr[0] != 0 or fr[-1] != 1 or np.any(np.diff(fr) <= 0):
        raise ValueError("fractions must increase strictly from 0 to 1, e.g. (0, 0.1, ..., 1).")
    device = next(iter(model.parameters())).device if any(True for _ in model.parameters()) \
        else torch.device("cpu")
    x = torch.as_tensor(x).float().to(device)
    s, _ = _spatial(saliency)
    s = s.to(device)
    if tuple(s.shape) != tuple(x.shape[1:]):
        raise ValueError(
            f"saliency shape {tuple(s.shape)} does not match the input's spatial shape "
            f"{tuple(x.shape[1:])}."
        )
    base = blurred_baseline(x, 4.0) if baseline is None else torch.as_tensor(baseline).float().to(device)
    if base.shape != x.shape:
        raise ValueError(f"baseline shape {tuple(base.shape)} differs from the input's {tuple(x.shape)}.")
    dom = None if domain is None else torch.as_tensor(domain).bool().to(device)
    order = saliency_order(s, seed=seed, domain=dom)
    n = order.numel()
    counts = np.round(fr * n).astype(np.int64)
    start, end = (x, base) if mode == "deletion" else (base, x)
    return fr, _prefix_scores(model, start, end, order, counts, target, score, batch_size).numpy()


def deletion_fractions(max_fraction: float = 0.05, step: float = 0.001) -> tuple[float, ...]:
    """Evenly spaced deletion fractions ``0, step, ..., max_fraction`` of the volume."""
    if not 0 < step <= max_fraction <= 1:
        raise ValueError(f"need 0 < step <= max_fraction <= 1, got step={step}, "
                         f"max_fraction={max_fraction}.")
    n = round(max_fraction / step)
    return tuple(float(v) for v in np.linspace(0.0, n * step, n + 1))


@torch.no_grad()
def counterfactual_deletion(model: nn.Module, x: torch.Tensor, twin: torch.Tensor,
                            saliency: torch.Tensor, target: int, *,
                            fractions: Sequence[float] | None = None, score: str = "probability",
                            batch_size: int = 32, seed: int = 0
                            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Counterfactual deletion: the map's top voxels are copied from the healthy twin.

    Voxels are taken in order of decreasing saliency (ties in a seeded random order, over
    the whole volume); at each fraction ``f`` the top ``round(f * n_voxels)`` voxels of
    ``x`` are replaced by those of ``twin`` (the same scan without the lesion) and the
    target's score is read. A faithful map removes the lesion first, so the score falls
    to the twin's at once. Unlike a blurred or constant baseline, the replacement is what
    the scan would look like without the evidence: no artificial structure is painted.

    Only voxels where ``x`` and ``twin`` differ change anything, so each distinct count of
    such voxels removed is scored once (a map that removes the lesion in the first step
    costs two forward passes, not one per fraction).

    Args:
        model: the classifier (eval mode is used; it is not modified).
        x: ``(C, *spatial)`` input as the model sees it.
        twin: ``(C, *spatial)`` the healthy twin, preprocessed the same way.
        saliency: ``(*spatial)`` map.
        target: class index whose score is followed.
        fractions: increasing fractions starting at 0 (default :func:`deletion_fractions`:
            0 to 5 % in 0.1 % steps).
        score: ``"probability"`` (softmax of the target) or ``"logit"``.
        batch_size: perturbed copies per forward pass.
        seed: tie-breaking seed.

    Returns:
        ``(fractions, scores, auc)``: ``auc`` is the trapezoid area divided by the last
        fraction, i.e. the mean score over ``[0, max fraction]`` (lower is better).
    """
    fr = np.asarray(deletion_fractions() if fractions is None else fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size < 2 or fr[0] != 0 or np.any(np.diff(fr) <= 0) or fr[-1] > 1:
        raise ValueError("fractions must increase strictly from 0, within [0, 1].")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.as_tensor(x).float().to(device)
    twin = torch.as_tensor(twin).float().to(device)
    if twin.shape != x.shape:
        raise ValueError(f"twin shape {tuple(twin.shape)} differs from the input's {tuple(x.shape)}.")
    s, _ = _spatial(saliency)
    s = s.to(device)
    if tuple(s.shape) != tuple(x.shape[1:]):
        raise ValueError(f"saliency shape {tuple(s.shape)} does not match the input's spatial "
                         f"shape {tuple(x.shape[1:])}.")
    order = saliency_order(s, seed=seed)
    n = order.numel()
    counts = np.round(fr * n).astype(np.int64)
    differs = (x != twin).any(0).reshape(-1)[order]  # in deletion order
    removed = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                         differs.long().cumsum(0)]).cpu().numpy()[counts]
    unique, inverse = np.unique(removed, return_inverse=True)
    # For each distinct number of differing voxels removed, the shortest prefix doing it.
    first_k = [int(counts[np.flatnonzero(removed == u)[0]]) for u in unique]
    curve = _prefix_scores(model, x, twin, order, first_k, target, score, batch_size).numpy()[inverse]
    auc = area_under_curve(fr, curve) / float(fr[-1]) if fr[-1] > 0 else float(curve[0])
    return fr, curve, auc


def area_under_curve(fractions: Sequence[float], scores: Sequence[float]) -> float:
    """Trapezoid-rule area under a perturbation curve on ``[0, 1]``."""
    f = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    if f.shape != y.shape or f.ndim != 1:
        raise ValueError(f"fractions and scores must be 1-D and equal length, got {f.shape}, {y.shape}.")
    return float(np.sum((f[1:] - f[:-1]) * (y[1:] + y[:-1]) / 2.0))


@torch.no_grad()
def confidence_change(model: nn.Module, x: torch.Tensor, saliency: torch.Tensor, target: int, *,
                      baseline: torch.Tensor | None = None, score: str = "probability"
                      ) -> tuple[float, float]:
    """Drop and increase in confidence when the model sees only what the map shows.

    The "explanation image" keeps each voxel in proportion to the map:
    ``e = baseline + m * (x - baseline)`` with ``m = saliency / max(saliency)``; with a
    zero baseline this is Grad-CAM++'s ``x * m``. With ``Y`` the target's score on ``x``
    and ``O`` on ``e``:

    * drop = ``max(0, Y - O) / Y`` (averaged over samples, lower is better);
    * increase = ``1 if O > Y else 0`` (its mean is the "increase in confidence", higher
      is better).

    Returns:
        ``(drop, increase)`` for this sample.
    """
    device = next(iter(model.parameters())).device
    x = torch.as_tensor(x).float().to(device)
    s, _ = _spatial(saliency)
    s = s.to(device).clamp_min(0)
    base = blurred_baseline(x, 4.0) if baseline is None else torch.as_tensor(baseline).float().to(device)
    peak = float(s.max())
    m = s / peak if peak > 0 else torch.zeros_like(s)
    e = base + m.unsqueeze(0) * (x - base)
    was_training = model.training
    model.eval()
    try:
        y, o = _scores(model, torch.stack([x, e]), target, score).double().cpu().tolist()
    finally:
        model.train(was_training)
    if score == "probability":
        drop = max(0.0, y - o) / y if y > 0 else 0.0
    else:
        drop = max(0.0, y - o) / abs(y) if y != 0 else 0.0
    return float(drop), float(o > y)


# ----------------------------------------------------------------------------- sanity


def _reinitialise(root: nn.Module) -> None:
    """Reset every module under ``root`` that defines ``reset_parameters`` (in place).

    Normalisation layers also reset their running statistics. Draws from the global torch
    generator: the caller seeds it.
    """
    for module in root.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        reset_stats = getattr(module, "reset_running_stats", None)
        if callable(reset_stats):
            reset_stats()


def randomize_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every parameter re-initialised (full randomisation).

    Each module that defines ``reset_parameters`` is reset (normalisation layers also reset
    their running statistics); the generator is seeded, so the result is reproducible.
    The original model is untouched.
    """
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        _reinitialise(clone)
    clone.train(model.training)
    return clone


def cascade_groups(model: nn.Module) -> list[tuple[str, list[str]]]:
    """The model's parameter blocks from the output down, for cascading randomisation.

    Known layouts: LesionNet (``head``, ``stages.N-1`` ... ``stages.0``, ``stem``) and
    MONAI ResNets (``fc``, ``layer4`` ... ``layer1``, ``conv1`` + ``bn1``). Otherwise the
    top-level children that hold parameters, last first.

    Returns:
        ``[(label, [module names]), ...]``, the top block first.
    """
    children = dict(model.named_children())
    if {"stem", "stages", "head"} <= children.keys():
        stages = [f"stages.{name}" for name, _ in children["stages"].named_children()]
        return [("head", ["head"])] + [(n, [n]) for n in reversed(stages)] + [("stem", ["stem"])]
    if {"layer1", "fc", "conv1"} <= children.keys():
        layers = [n for n in ("layer4", "layer3", "layer2", "layer1") if n in children]
        stem = [n for n in ("conv1", "bn1") if n in children]
        return [("fc", ["fc"])] + [(n, [n]) for n in layers] + [("stem", stem)]
    groups = [(name, [name]) for name, mod in children.items()
              if any(True for _ in mod.parameters())]
    return list(reversed(groups))


def cascading_randomisation(model: nn.Module, groups: Sequence[tuple[str, Sequence[str]]]
                            | None = None, *, seed: int = 0) -> list[tuple[str, nn.Module]]:
    """Copies of ``model`` randomised cumulatively from the top block down (Adebayo et al.).

    Copy ``d`` has the top ``d`` blocks of ``groups`` (default :func:`cascade_groups`)
    re-initialised (``reset_parameters``; normalisation layers also reset their running
    statistics), the rest as trained. Seeded and reproducible; ``model`` is untouched.

    Returns:
        ``[(label of the deepest block randomised so far, model copy), ...]``.
    """
    groups = cascade_groups(model) if groups is None else list(groups)
    if not groups:
        raise ValueError(f"{type(model).__name__}: no parameter blocks to randomise.")
    modules = dict(model.named_modules())
    for _, names in groups:
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"cascading randomisation: no module named {missing} in "
                             f"{type(model).__name__}.")
    out = []
    current = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        for label, names in groups:
            current = copy.deepcopy(current)
            mods = dict(current.named_modules())
            for name in names:
                _reinitialise(mods[name])
            current.train(model.training)
            out.append((label, current))
    return out


def rank_correlation(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of two maps of the same shape (ties get average ranks).

    A constant map has no ranking: the correlation is then reported as 0 (the map did not
    survive as a ranking), never NaN.
    """
    from scipy import stats

    x = torch.as_tensor(a).detach().float().cpu().reshape(-1).numpy()
    y = torch.as_tensor(b).detach().float().cpu().reshape(-1).numpy()
    if x.shape != y.shape:
        raise ValueError(f"maps differ in size: {x.size} and {y.size} values.")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    rho = stats.spearmanr(x, y).statistic
    return float(rho) if np.isfinite(rho) else 0.0


def randomisation_check(explain: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                        model: nn.Module, x: torch.Tensor, *, seed: int = 0,
                        threshold: float = 0.5) -> dict[str, float | bool]:
    """Model-parameter randomisation test of one explanation method on one input.

    Args:
        explain: ``explain(model, x) -> (*spatial)`` map of a ``(C, *spatial)`` input.
        model: the trained model (left unchanged).
        x: the input.
        seed: seed of the re-initialisation.
        threshold: a rank correlation above it flags the method as insensitive to the model.

    Returns:
        ``{"rank_correlation": rho, "flagged": rho > threshold}``.
    """
    rand = randomize_parameters(model, seed=seed)
    rho = rank_correlation(explain(model, x), explain(rand, x))
    return {"rank_correlation": rho, "flagged": bool(rho > threshold)}


# ----------------------------------------------------------------------------- aggregation


def bootstrap_ci(values: Sequence[float], *, confidence: float = 0.95, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean.

    NaN values are dropped first. Returns ``(mean, low, high)``; all NaN when no value is left.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(v.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
