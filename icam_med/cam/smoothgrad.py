"""SmoothGrad around any method of the engine (Smilkov et al. 2017).

``make_cam("smoothgrad", model, base="integrative", n_samples=25, sigma=0.15, chunk=8,
**base_options)`` explains ``n_samples`` noisy copies ``x + eps_j``,
``eps_j ~ N(0, (sigma * (max(x) - min(x)))^2)`` (``sigma`` a fraction of each sample's
intensity range, MONAI's ``stdev_spread``), and averages their maps.

* The copies run through the base method as **batches** of ``chunk`` copies per sample (one
  engine call, so one forward and one backward pass, per chunk; ``ceil(n / chunk)`` calls
  in all), never ``n`` separate calls. ``chunk`` bounds the memory: a pass holds
  ``chunk * N`` copies.
* The noise is seeded (``seed``) and drawn copy by copy in the same order whatever the
  chunk, so the map does not depend on ``chunk``; copy ``j`` has the same noise pattern for
  every sample of a batch (scaled by that sample's range), so a batch gives what
  single-sample calls give. With the same seed, the noise equals MONAI's ``SmoothGrad``
  after ``torch.manual_seed(seed)`` (CPU).
* Every copy explains the **clean** input's target: ``targets=None`` is the clean input's
  predicted class, a segmentation target without a mask the clean predicted region (MONAI
  explains each noisy copy's own arg-max). Scores, logits and the prediction reported are
  the clean input's (one extra gradient-free forward of ``N`` samples).
* What is averaged: for the input-gradient bases (``gradient``, ``guided-backprop``) the
  signed gradients, rectified after averaging (Smilkov et al.; Captum's ``NoiseTunnel``);
  for every other base its fused maps. ``aggregate="rms"`` takes the root mean square
  instead (MONAI's ``magnitude=True``, up to a constant factor). Per-layer maps, layer
  weights and scores of CAM bases are averaged over the copies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from icam_med.cam._copies import clean_forward, freeze_target, grouped_target, restore_state
from icam_med.cam.base import BaseCAM, CAMResult, minmax_normalize
from icam_med.cam.gradients import VanillaGradient, rectify_map
from icam_med.cam.targets import ClassTarget, resolve_targets

__all__ = ["AGGREGATES", "SmoothGrad"]

#: How the copies' maps are combined (option ``aggregate``), name -> meaning.
AGGREGATES: dict[str, str] = {
    "mean": "mean over the copies (SmoothGrad; for gradient bases the signed gradient is "
            "averaged, then rectified)",
    "rms": "root mean square over the copies (MONAI SmoothGrad magnitude=True, up to a factor)",
}


class SmoothGrad:
    """SmoothGrad: the average map of noisy copies, around any engine method.

    Args:
        model: the CNN.
        target_layers: passed to the base method when given (``None``: the base's default).
        base: the method explained on the copies, a name of :data:`~icam_med.cam.METHODS`
            (``"integrative"`` default; ``"gradient"`` is the SmoothGrad of the paper).
        n_samples: number of noisy copies (>= 1; MONAI's default 25).
        sigma: noise standard deviation as a fraction of each sample's intensity range
            ``max(x) - min(x)`` (MONAI's ``stdev_spread``, default 0.15); 0 gives the base map.
        chunk: copies per sample run in one pass (bounds memory; default 8).
        seed: seed of the noise (recorded, so a map can be reproduced).
        aggregate: a name of :data:`AGGREGATES` (``"mean"`` default).
        **base_options: options of the base method (``device``, ``amp_dtype`` and
            ``eval_mode`` included).
    """

    method_name = "smoothgrad"

    def __init__(self, model: nn.Module, target_layers: str | Sequence[str] | None = None, *,
                 base: str = "integrative", n_samples: int = 25, sigma: float = 0.15,
                 chunk: int = 8, seed: int = 0, aggregate: str = "mean",
                 **base_options: Any) -> None:
        from icam_med.cam.methods import METHODS, make_cam, method_key

        key = method_key(base)
        if key == self.method_name or key not in METHODS:
            choices = sorted(k for k in METHODS if k != self.method_name)
            raise ValueError(f"base='{base}' is not a method SmoothGrad can wrap; use one of "
                             f"{choices}.")
        for name, value, lo in (("n_samples", n_samples, 1), ("chunk", chunk, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name}={value!r} must be an integer >= {lo}.")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) \
                or not math.isfinite(sigma) or sigma < 0:
            raise ValueError(f"sigma={sigma!r} must be a non-negative fraction of the input's "
                             "intensity range (e.g. 0.15).")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} must be an integer.")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate='{aggregate}' is not supported; use one of "
                             f"{list(AGGREGATES)}.")
        if target_layers is not None:
            base_options["target_layers"] = target_layers
        self.base = make_cam(key, model, **base_options)
        self.base_name = key
        self.model = model
        self.n_samples = int(n_samples)
        self.sigma = float(sigma)
        self.chunk = int(chunk)
        self.seed = int(seed)
        self.aggregate = aggregate

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def options(self) -> dict[str, Any]:
        base_options = self.base.options
        return {"method": self.method_name, "base": self.base_name, "n_samples": self.n_samples,
                "sigma": self.sigma, "noise": "gaussian, std = sigma * (max(x) - min(x)) per sample",
                "chunk": self.chunk, "seed": self.seed, "aggregate": self.aggregate,
                "target_layers": base_options.get("target_layers", []),
                "base_options": base_options}

    def layer_names(self, spatial_shape: Sequence[int] | None = None) -> list[str]:
        """The base method's layers."""
        return self.base.layer_names(spatial_shape)

    def _engine(self) -> BaseCAM:
        """The engine object that checks inputs for the base method."""
        for candidate in (self.base, getattr(self.base, "_engine", None),
                          getattr(self.base, "cam", None)):
            if isinstance(candidate, BaseCAM):
                return candidate
        if not hasattr(self, "_checker"):
            self._checker = BaseCAM(self.model, "last", device=self.device)
        return self._checker

    def _noise(self, generator: torch.Generator, shape: tuple[int, ...], device: torch.device
               ) -> torch.Tensor:
        return torch.normal(0.0, 1.0, size=shape, generator=generator, device=device)

    def __call__(self, x: torch.Tensor, targets: object = None) -> CAMResult:
        """Explain ``x`` ``(N, C, *spatial)``; see :meth:`BaseCAM.__call__` for ``targets``."""
        x = self._engine()._check_input(x)  # dims, channels, finite: before any pass
        n = x.shape[0]
        target_fn = resolve_targets(targets, n)
        amp = getattr(getattr(self.base, "_engine", self.base), "amp_dtype", None)
        restore = restore_state(self.model)
        try:
            if self.base.options.get("eval_mode", True):
                self.model.eval()
            clean = clean_forward(self.model, x, amp)
        finally:
            restore()
        target_fn = freeze_target(target_fn, clean)
        if isinstance(target_fn, ClassTarget) and clean.ndim != 2:
            raise ValueError(
                f"a class index target needs a classification output (N, K); the model output "
                f"has per-sample shape {tuple(clean.shape[1:])}. Use SegmentationTarget for "
                "segmentation.")
        if isinstance(target_fn, ClassTarget) and clean.ndim == 2:
            classes: torch.Tensor | None = target_fn.indices(n, x.device)
            if bool(((classes < 0) | (classes >= clean.shape[1])).any()):
                bad = int(classes[(classes < 0) | (classes >= clean.shape[1])][0])
                raise ValueError(f"target class {bad} is out of range: the model has "
                                 f"{clean.shape[1]} classes (valid indices 0..{clean.shape[1] - 1}).")
            scores = clean.float().gather(1, classes.view(-1, 1)).squeeze(1)
        else:
            classes = None
            with torch.no_grad():
                scores = target_fn(clean).float() if target_fn is not None else None
            if scores is None:
                raise ValueError(
                    f"targets=None explains the predicted class of a classifier, but the model "
                    f"output has per-sample shape {tuple(clean.shape[1:])}; pass a "
                    "SegmentationTarget or a callable.")

        view = (n,) + (1,) * (x.ndim - 1)
        spread = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(view) * self.sigma
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        gradient_base = isinstance(self.base, VanillaGradient)
        acc: torch.Tensor | None = None
        layer_acc: dict[str, torch.Tensor] = {}
        weight_acc: dict[str, torch.Tensor] = {}
        score_acc: dict[str, torch.Tensor] = {}
        cost = {"forward_passes": 0, "backward_passes": 0, "extra_forward_samples": n}
        last_options: dict[str, Any] = {}
        done = 0
        while done < self.n_samples:
            g = min(self.chunk, self.n_samples - done)
            noise = torch.stack([self._noise(generator, tuple(x.shape[1:]), x.device)
                                 for _ in range(g)])                    # (g, C, *S)
            batch = (x.unsqueeze(0) + noise.unsqueeze(1) * spread.unsqueeze(0))  # (g, N, C, *S)
            batch = batch.reshape(g * n, *x.shape[1:]).to(x.dtype)
            del noise
            group_target = grouped_target(target_fn, n, g)
            if gradient_base:
                grad = self.base.input_gradient(batch, group_target)[0]
                m = grad.view(g, n, *grad.shape[1:])
                for key in ("forward_passes", "backward_passes"):
                    cost[key] += 1
            else:
                res = self.base(batch, group_target)
                m = res.fused.float().view(g, n, *res.fused.shape[1:])
                last_options = res.options
                for key, value in res.cost.items():
                    cost[key] = cost.get(key, 0) + int(value)
                for name, lm in res.layer_maps.items():
                    part = lm.float().view(g, n, *lm.shape[1:]).sum(0)
                    layer_acc[name] = layer_acc[name] + part if name in layer_acc else part
                for name, w in res.layer_weights.items():
                    part = w.float().view(g, n).sum(0)
                    weight_acc[name] = weight_acc[name] + part if name in weight_acc else part
                for name, s in res.layer_scores.items():
                    part = s.float().view(g, n).sum(0)
                    score_acc[name] = score_acc[name] + part if name in score_acc else part
            part = (m * m if self.aggregate == "rms" else m).sum(0)
            acc = part if acc is None else acc + part
            del batch, m
            done += g
        assert acc is not None
        mean = acc / self.n_samples
        if self.aggregate == "rms":
            mean = mean.sqrt()
        if gradient_base:
            fused = minmax_normalize(rectify_map(mean, self.base.rectify))
            last_options = self.base.options
        else:
            fused = minmax_normalize(mean)
        k = float(self.n_samples)
        options = self.options
        options["target_layers"] = list(last_options.get("target_layers", []))
        options["base_options"] = {**last_options}
        options["device"] = str(fused.device)
        return CAMResult(
            fused=fused,
            layer_maps={name: minmax_normalize(v / k) for name, v in layer_acc.items()},
            layer_weights={name: v / k for name, v in weight_acc.items()},
            layer_scores={name: v / k for name, v in score_acc.items()},
            scores=scores.detach().float(),
            logits=clean.detach(),
            target_classes=classes,
            method=self.method_name,
            options=options,
            cost=cost,
        )
