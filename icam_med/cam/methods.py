"""CAM methods: each one a small subclass of the shared engine.

| method            | activation term of a layer                           | defaults                  |
|-------------------|------------------------------------------------------|---------------------------|
| Grad-CAM          | ``relu(sum_k mean_pos(G_k) A_k)``                    | uniform fusion, no bias   |
| Grad-CAM++        | ``relu(sum_k w_k A_k)``, ``w_k = sum(alpha relu(G))`` | generalised alpha         |
| HiResCAM          | ``relu(sum_k G_k * A_k)``                            | element-wise              |
| LayerCAM          | ``relu(sum_k relu(G_k) * A_k)``                      | element-wise, positive G  |
| Integrative CAM   | any term of :data:`ACTIVATION_TERMS` + bias term,    | ``score`` weights, bias 1 |
|                   | adaptive layer weights and a fusion                  |                           |

The rest of the toolbox (issue 16) is registered here too, so every caller (``explain``,
audit, report, napari, evaluation) takes it by name: Score-CAM
(:mod:`icam_med.cam.scorecam`, an engine subclass with no backward pass), the input-gradient
methods (:mod:`icam_med.cam.gradients`: vanilla gradient, guided backprop, Guided Grad-CAM)
and SmoothGrad around any of them (:mod:`icam_med.cam.smoothgrad`). Each is called like an
engine method and returns a :class:`~icam_med.cam.base.CAMResult`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icam_med.cam.alpha import (
    ALPHA_FUNCTIONS,
    alpha_channel_weights,
    alpha_ratio,
    callable_ratio,
    softmax_channel_weights,
)
from icam_med.cam.base import BaseCAM, _LayerContext
from icam_med.cam.gradients import GuidedBackprop, GuidedGradCAM, VanillaGradient
from icam_med.cam.lrp import LRP
from icam_med.cam.scorecam import ScoreCAM
from icam_med.cam.smoothgrad import SmoothGrad
from icam_med.cam.targets import ClassTarget

__all__ = [
    "ACTIVATION_TERMS",
    "METHODS",
    "GradCAM",
    "GradCAMPlusPlus",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "IntegrativeCAM",
    "LayerCAM",
    "ScoreCAM",
    "SmoothGrad",
    "VanillaGradient",
    "make_cam",
    "method_key",
]


def _weighted_sum(weights: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    """``relu(sum_k w_k A_k)`` for channel weights ``(N, K)``, any number of spatial axes."""
    n, _k, *spatial = acts.shape
    summed = torch.bmm(weights.unsqueeze(1), acts.flatten(2))  # (N, 1, P): one pass, no temp
    return F.relu(summed.view(n, 1, *spatial))


def _gradcam_term(acts: torch.Tensor, grads: torch.Tensor, ctx: _LayerContext) -> torch.Tensor:
    return _weighted_sum(grads.flatten(2).mean(-1), acts)


def _hirescam_term(acts: torch.Tensor, grads: torch.Tensor, ctx: _LayerContext) -> torch.Tensor:
    return F.relu((grads * acts).sum(1, keepdim=True))


def _layercam_term(acts: torch.Tensor, grads: torch.Tensor, ctx: _LayerContext) -> torch.Tensor:
    weighted = torch.relu(grads)  # one temporary, reused in place
    weighted.mul_(acts)
    return F.relu(weighted.sum(1, keepdim=True))


def _gradcampp_term(acts: torch.Tensor, grads: torch.Tensor, ctx: _LayerContext) -> torch.Tensor:
    if ctx.probs is not None:  # the true softmax: every logit's gradient at this layer
        assert ctx.classes is not None
        per_logit = torch.stack(ctx.stash[ctx.current], 0)
        weights = softmax_channel_weights(per_logit, acts.flatten(2).sum(-1), ctx.probs, ctx.classes)
        return _weighted_sum(weights, acts)
    assert ctx.ratio is not None
    weights = alpha_channel_weights(grads, acts.flatten(2).sum(-1), ctx.ratio)
    return _weighted_sum(weights, acts)


#: The activation term of a layer's map (Integrative CAM's option ``activation_term``):
#: name -> (function, meaning).
ACTIVATION_TERMS: dict[str, tuple[Any, str]] = {
    "gradcam++": (_gradcampp_term, "relu(sum_k w_k A_k), w_k = sum(alpha * relu(G_k)) with the "
                                   "generalised alpha of alpha_fn"),
    "layercam": (_layercam_term, "relu(sum_k relu(G_k) * A_k), position by position"),
    "gradcam": (_gradcam_term, "relu(sum_k mean(G_k) A_k)"),
    "hirescam": (_hirescam_term, "relu(sum_k G_k * A_k), position by position"),
}


class GradCAM(BaseCAM):
    """Grad-CAM: channel weights are the spatial mean of the gradient."""

    method_name = "gradcam"

    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:
        return _gradcam_term(acts, grads, ctx)


class HiResCAM(BaseCAM):
    """HiResCAM: the element-wise product of gradient and activation, summed over channels."""

    method_name = "hirescam"

    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:
        return _hirescam_term(acts, grads, ctx)


class LayerCAM(BaseCAM):
    """LayerCAM: activations weighted position by position by the positive gradient."""

    method_name = "layercam"

    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:
        return _layercam_term(acts, grads, ctx)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ with its alpha generalised to any smooth output function (ICAM_SPEC 1).

    Args:
        alpha_fn: the output function ``f`` of the score: ``"exp"`` (Grad-CAM++ as
            published), ``"sigmoid"`` (of the target score), ``"softmax"`` (probability of
            the target class with every logit free: one extra backward pass per logit),
            ``"identity"`` (alpha = 1/2), or any smooth callable ``f`` written in torch
            (``r = f''' / f''`` by autograd on the scalar score).
        alpha_beta: temperature of ``exp(beta * S)`` (``alpha_fn="exp"`` only).
        **kwargs: engine options of :class:`~icam_med.cam.base.BaseCAM`.
    """

    method_name = "gradcam++"

    def __init__(self, model: nn.Module, target_layers: Any = "stages", *,
                 alpha_fn: str | Callable[[torch.Tensor], torch.Tensor] = "exp",
                 alpha_beta: float = 1.0, **kwargs: Any) -> None:
        if callable(alpha_fn) and not isinstance(alpha_fn, str):
            name = getattr(alpha_fn, "__qualname__", type(alpha_fn).__name__)
            self._alpha_callable: Callable[[torch.Tensor], torch.Tensor] | None = alpha_fn
            self.alpha_fn = f"callable:{name}"
        elif alpha_fn not in ALPHA_FUNCTIONS:
            raise ValueError(
                f"alpha_fn={alpha_fn!r} is not supported; use one of {sorted(ALPHA_FUNCTIONS)} "
                "or a smooth torch callable f(score)."
            )
        else:
            self._alpha_callable = None
            self.alpha_fn = alpha_fn
        if not (isinstance(alpha_beta, (int, float)) and alpha_beta > 0):
            raise ValueError(f"alpha_beta={alpha_beta!r} must be a positive number.")
        if alpha_beta != 1.0 and self.alpha_fn != "exp":
            raise ValueError(f"alpha_beta applies to alpha_fn='exp' only (got alpha_fn='{self.alpha_fn}').")
        self.alpha_beta = float(alpha_beta)
        super().__init__(model, target_layers, **kwargs)

    def method_options(self) -> dict[str, Any]:
        return {"alpha_fn": self.alpha_fn, "alpha_beta": self.alpha_beta}

    def _uses_alpha(self) -> bool:
        return True

    def _check_targets(self, target_fn: object, out_shape: tuple[int, ...]) -> None:
        super()._check_targets(target_fn, out_shape)
        if self._uses_alpha() and self.alpha_fn == "softmax" and not (
                target_fn is None or isinstance(target_fn, ClassTarget)):
            raise ValueError(
                "alpha_fn='softmax' needs a class target on a classification output (it uses the "
                "softmax probability of the target class); use 'sigmoid' or 'exp' for callable "
                "or segmentation targets."
            )

    def _extra_backward_scores(self, output: torch.Tensor) -> list[torch.Tensor]:
        if not (self._uses_alpha() and self.alpha_fn == "softmax"):
            return []
        return [output[:, j] for j in range(output.shape[1])]

    def _prepare_context(self, ctx: _LayerContext, scores: torch.Tensor,
                         logits: torch.Tensor, classes: torch.Tensor | None) -> None:
        if not self._uses_alpha():
            return
        if self.alpha_fn == "softmax":
            assert classes is not None
            ctx.probs = torch.softmax(logits.float(), dim=1)
            ctx.classes = classes
            return
        if self._alpha_callable is not None:
            ctx.ratio = callable_ratio(self._alpha_callable, scores)
            return
        prob = torch.sigmoid(scores) if self.alpha_fn == "sigmoid" else None
        ctx.ratio = alpha_ratio(self.alpha_fn, scores, prob, self.alpha_beta)

    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:
        return _gradcampp_term(acts, grads, ctx)


class IntegrativeCAM(GradCAMPlusPlus):
    """Integrative CAM: per-layer maps (an activation term plus a bias term) fused over many
    layers with adaptive weights (ICAM_SPEC 1-3).

    Args:
        activation_term: the per-layer activation term, a name of :data:`ACTIVATION_TERMS`
            (``"gradcam++"``: the generalised alpha of ``alpha_fn``; ``"layercam"``:
            ``relu(G) * A`` position by position).
        **kwargs: ``alpha_fn``, ``alpha_beta`` and the engine options of
            :class:`~icam_med.cam.base.BaseCAM` (``layer_weighting``, ``fusion``,
            ``bias_weight``, ``bias_mode``...).

    Defaults (chosen by the evaluation's validation split by a rule stated before the runs,
    see docs/evaluation.md): ``target_layers="stages"``, ``activation_term="layercam"``,
    ``layer_weighting="counterfactual"`` (one extra batched gradient-free forward),
    ``fusion="multiplicative"`` (coarse to fine), ``bias_weight=0.0`` (the bias term is an
    option: ``bias_weight=1.0`` with ``bias_mode``). The previous defaults (Grad-CAM++ alpha
    ``exp``, signed bias term of weight 1, ``score`` weighting, weighted sum) are one
    ``make_cam(..., activation_term="gradcam++", bias_weight=1.0, layer_weighting="score",
    fusion="weighted")`` away.
    """

    method_name = "integrative"
    default_layer_weighting = "counterfactual"
    default_bias_weight = 0.0
    default_activation_term = "layercam"
    default_fusion = "multiplicative"

    def __init__(self, model: nn.Module, target_layers: Any = "stages", *,
                 activation_term: str | None = None, **kwargs: Any) -> None:
        term = activation_term or self.default_activation_term
        if term not in ACTIVATION_TERMS:
            raise ValueError(f"activation_term='{term}' is not supported; use one of "
                             f"{list(ACTIVATION_TERMS)}.")
        self.activation_term = term
        super().__init__(model, target_layers, **kwargs)

    def method_options(self) -> dict[str, Any]:
        return {**super().method_options(), "activation_term": self.activation_term}

    def _uses_alpha(self) -> bool:
        return self.activation_term == "gradcam++"

    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:
        return ACTIVATION_TERMS[self.activation_term][0](acts, grads, ctx)


#: Every method by name. The engine's CAMs are :class:`BaseCAM` subclasses; the others
#: (input gradients, SmoothGrad) are called the same way and return the same result.
METHODS: dict[str, type] = {
    "integrative": IntegrativeCAM,
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "gradient": VanillaGradient,
    "guided-backprop": GuidedBackprop,
    "guided-gradcam": GuidedGradCAM,
    "smoothgrad": SmoothGrad,
    "lrp": LRP,
}

_ALIASES = {
    "integrativecam": "integrative", "icam": "integrative", "grad-cam": "gradcam",
    "gradcampp": "gradcam++", "gradcamplusplus": "gradcam++", "grad-cam++": "gradcam++",
    "score-cam": "scorecam", "vanilla-gradient": "gradient", "vanillagrad": "gradient",
    "saliency": "gradient", "guidedbackprop": "guided-backprop",
    "guided-backpropagation": "guided-backprop", "guidedbackpropgrad": "guided-backprop",
    "guidedgradcam": "guided-gradcam", "guided-grad-cam": "guided-gradcam",
}


def method_key(method: str) -> str:
    """The registry name of ``method`` (aliases and case resolved; unknown names unchanged)."""
    return _ALIASES.get(method.lower(), method.lower())


def make_cam(method: str, model: nn.Module, **options: Any) -> BaseCAM:
    """Build a CAM method by name (see :data:`METHODS`) with its options.

    Raises:
        ValueError: unknown method or option (the message lists the valid ones).
    """
    key = method_key(method)
    if key not in METHODS:
        raise ValueError(f"unknown CAM method '{method}'; choose one of {sorted(METHODS)}.")
    cls = METHODS[key]
    try:
        return cls(model, **options)
    except TypeError as exc:
        raise ValueError(f"method '{key}' got an invalid option: {exc}.") from exc
