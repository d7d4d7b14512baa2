"""Input-gradient methods: vanilla gradient, guided backpropagation and Guided Grad-CAM.

| method (``make_cam`` name) | map | passes |
|---|---|---|
| :class:`VanillaGradient` (``gradient``) | ``max_c rectify(dS/dx)`` (Simonyan et al. 2014) | 1 forward, 1 backward to the input |
| :class:`GuidedBackprop` (``guided-backprop``) | the same with the guided ReLU rule (Springenberg et al. 2015) | 1 forward, 1 backward to the input |
| :class:`GuidedGradCAM` (``guided-gradcam``) | guided backprop x any CAM of the engine (Selvaraju et al. 2017) | the CAM's passes + 1 forward, 1 backward |

``rectify`` turns the signed gradient into a map: ``abs`` (default, Captum's ``Saliency``)
or ``positive`` (evidence for the target only); channels are reduced by their maximum.

**Guided backpropagation** applies its rule (``grad_in = relu(grad_out) * (x > 0)``) at
every ``nn.ReLU`` module of the model: a forward hook (registered for the call, removed in
``finally``) puts a tensor hook on each ReLU's output that keeps only the positive part of
the gradient arriving there; the ReLU's own backward then applies ``x > 0``. Nothing of the
model is replaced or changed (MONAI's ``GuidedBackpropGrad`` swaps the modules for the call
and flips in-place flags); in-place ReLUs and ReLU modules used twice in one forward (MONAI
ResNet blocks) are handled. A model that applies ReLU functionally (``F.relu`` /
``torch.relu`` in ``forward``) cannot be guided this way: the call is refused, as is a model
with no ``nn.ReLU`` at all (PReLU, SiLU networks), rather than silently returning the plain
gradient. Other activations (sigmoid gates, LeakyReLU) pass the ordinary gradient, as in
Captum's ``GuidedBackprop``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from icam_med.cam._copies import restore_state
from icam_med.cam.base import BaseCAM, CAMResult, minmax_normalize
from icam_med.cam.layers import LAYER_PRESETS
from icam_med.cam.targets import resolve_targets

__all__ = ["RECTIFY", "GuidedBackprop", "GuidedGradCAM", "VanillaGradient"]

log = logging.getLogger(__name__)

#: How a signed input gradient becomes a map (option ``rectify``), name -> meaning.
RECTIFY: dict[str, str] = {
    "abs": "|dS/dx|, maximum over input channels (Simonyan et al.; Captum Saliency abs=True)",
    "positive": "relu(dS/dx), maximum over input channels (evidence for the target only)",
}
_RELU_NODES = ("ReluBackward0", "ReluBackward1")


def rectify_map(grad: torch.Tensor, rectify: str) -> torch.Tensor:
    """``(N, C, *S)`` signed gradient -> ``(N, 1, *S)`` non-negative map (not normalised)."""
    g = grad.float()
    g = g.abs() if rectify == "abs" else torch.relu(g)
    return g.amax(1, keepdim=True)


def _layers_not_used(method: str, target_layers: Any) -> None:
    """Input-gradient methods hook no layer: presets are accepted (the napari widget and
    configs always pass one) and resolve to none; named layers are refused."""
    if target_layers is None or (isinstance(target_layers, str) and target_layers in LAYER_PRESETS):
        return
    raise ValueError(
        f"method '{method}' takes its map from the gradient at the input and hooks no layer; "
        f"target_layers={target_layers!r} cannot apply. Leave target_layers out (or a preset "
        f"{list(LAYER_PRESETS)}), or use 'guided-gradcam' to combine it with a CAM on that layer."
    )


class VanillaGradient:
    """Vanilla gradient (saliency): ``max_c rectify(dS/dx)``, min-max normalised.

    One forward and one backward pass to the input per call, whatever the batch size; the
    model is left exactly as found (training flags; no parameter gradient is computed).

    Args:
        model: a 2D or 3D CNN (see :class:`~icam_med.cam.base.BaseCAM` for what is checked).
        target_layers: unused (no layer is hooked); a preset name is accepted and recorded.
        rectify: a name of :data:`RECTIFY` (``"abs"`` default).
        device: where the computation runs (the model must already be there).
        amp_dtype: optional autocast dtype of the forward pass.
        eval_mode: run the model in eval mode; flags restored afterwards.
    """

    method_name = "gradient"
    guided = False

    def __init__(self, model: nn.Module, target_layers: str | Sequence[str] | None = None, *,
                 rectify: str = "abs", device: str | torch.device | None = None,
                 amp_dtype: torch.dtype | str | None = None, eval_mode: bool = True) -> None:
        _layers_not_used(self.method_name, target_layers)
        if rectify not in RECTIFY:
            raise ValueError(f"rectify='{rectify}' is not supported; use one of {list(RECTIFY)}.")
        # the engine's checks of the model, the input and the targets (one probe per shape)
        self._engine = BaseCAM(model, "last", device=device, amp_dtype=amp_dtype,
                               eval_mode=eval_mode)
        self.model = model
        self.target_layers = target_layers
        self.rectify = rectify
        self._checked_shapes: set[tuple[int, ...]] = set()

    @property
    def device(self) -> torch.device:
        return self._engine.device

    @property
    def options(self) -> dict[str, Any]:
        """Every option, JSON-serialisable."""
        e = self._engine
        return {"method": self.method_name, "target_layers": [],
                "target_layers_spec": self.target_layers, "rectify": self.rectify,
                "channel_reduction": "max", "guided_relu": self.guided,
                "amp_dtype": None if e.amp_dtype is None else str(e.amp_dtype).replace("torch.", ""),
                "eval_mode": e.eval_mode}

    def layer_names(self, spatial_shape: Sequence[int] | None = None) -> list[str]:
        """No layer is hooked (with a shape, the one-off probe of that shape runs now, as for
        the engine's methods)."""
        if spatial_shape is not None:
            self._engine.layer_names(spatial_shape)
        return []

    def input_gradient(self, x: torch.Tensor, targets: object = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(dS/dx (N, C, *S) float32, scores, logits, target classes)`` of one pass."""
        e = self._engine
        x = e._check_input(x)
        n = x.shape[0]
        target_fn = resolve_targets(targets, n)
        _, out_shape = e._resolve(x)
        e._check_targets(target_fn, out_shape)
        restore = restore_state(self.model)
        handles: list[Any] = []
        guided_nodes: set[Any] = set()
        relu_calls = [0]
        try:
            if e.eval_mode:
                self.model.eval()
            if self.guided:
                for module in self.model.modules():
                    if isinstance(module, nn.ReLU):
                        handles.append(module.register_forward_hook(
                            self._guide_hook(guided_nodes, relu_calls)))
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                output = e._forward(x_in)
                for h in handles:
                    h.remove()
                handles.clear()
                scores, classes = e._scores(output, target_fn, n)
                if self.guided:
                    self._check_guided(scores, guided_nodes, relu_calls[0], tuple(x.shape[2:]))
                (grad,) = torch.autograd.grad(scores.sum(), x_in)
        finally:
            for h in handles:
                h.remove()
            restore()
        return grad.detach().float(), scores.detach().float(), output.detach(), classes

    @staticmethod
    def _guide_hook(nodes: set[Any], calls: list[int]):
        def hook(_m, _inp, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                calls[0] += 1
                nodes.add(out.grad_fn)
                out.register_hook(lambda g: g.clamp_min(0))
            return None

        return hook

    def _check_guided(self, scores: torch.Tensor, guided: set[Any], calls: int,
                      shape: tuple[int, ...]) -> None:
        """Refuse a model whose ReLUs are not all ``nn.ReLU`` modules (one graph walk per
        input shape), or that has none: its map would silently be the plain gradient."""
        if calls == 0:
            raise ValueError(
                f"{type(self.model).__name__} runs no nn.ReLU module: guided backpropagation's "
                "rule is defined at ReLUs (this network uses other activations, e.g. PReLU or "
                "SiLU, or applies ReLU functionally). Use 'gradient' or 'smoothgrad' instead."
            )
        if shape in self._checked_shapes:
            return
        unguided = 0
        seen: set[Any] = set()
        stack = [scores.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if type(node).__name__ in _RELU_NODES and node not in guided:
                unguided += 1
            stack.extend(child for child, _ in node.next_functions)
        if unguided:
            raise ValueError(
                f"{type(self.model).__name__} applies ReLU functionally ({unguided} ReLU "
                "operation(s) in forward() that are not nn.ReLU modules, e.g. F.relu or "
                "torch.relu): guided backpropagation cannot hook them, and guiding only the "
                "others would give a map that is neither method. Replace them with nn.ReLU "
                "modules, or use 'gradient' or 'smoothgrad'."
            )
        self._checked_shapes.add(shape)

    def __call__(self, x: torch.Tensor, targets: object = None) -> CAMResult:
        """Explain ``x`` ``(N, C, *spatial)``; see :meth:`BaseCAM.__call__` for ``targets``."""
        grad, scores, logits, classes = self.input_gradient(x, targets)
        fused = minmax_normalize(rectify_map(grad, self.rectify))
        return CAMResult(
            fused=fused, layer_maps={}, layer_weights={}, layer_scores={}, scores=scores,
            logits=logits, target_classes=classes, method=self.method_name,
            options={**self.options, "device": str(fused.device)},
            cost={"forward_passes": 1, "backward_passes": 1, "extra_forward_samples": 0},
        )


class GuidedBackprop(VanillaGradient):
    """Guided backpropagation (Springenberg et al. 2015): the input gradient with the
    guided ReLU rule, ``max_c rectify(.)``, min-max normalised. Options as
    :class:`VanillaGradient`."""

    method_name = "guided-backprop"
    guided = True


class GuidedGradCAM:
    """Guided Grad-CAM (Selvaraju et al. 2017): guided backprop times a CAM of the engine.

    ``F = norm(max_c rectify(guided dS/dx) * CAM)`` with ``CAM`` the fused map (input size)
    of any engine method, multi-layer fused maps included (``cam="integrative"``).

    Args:
        model: the CNN.
        target_layers: the CAM's layers (default ``"last"``: the published method).
        cam: the CAM method, a name of :data:`~icam_med.cam.METHODS` built on the engine
            (``gradcam`` default, ``gradcam++``, ``hirescam``, ``layercam``,
            ``integrative``, ``scorecam``).
        rectify: how the guided gradient becomes a map (:data:`RECTIFY`).
        device, amp_dtype, eval_mode: as for every method (passed to both parts).
        **cam_options: options of the CAM method.
    """

    method_name = "guided-gradcam"

    def __init__(self, model: nn.Module, target_layers: str | Sequence[str] = "last", *,
                 cam: str = "gradcam", rectify: str = "abs",
                 device: str | torch.device | None = None,
                 amp_dtype: torch.dtype | str | None = None, eval_mode: bool = True,
                 **cam_options: Any) -> None:
        from icam_med.cam.methods import METHODS, make_cam, method_key

        key = method_key(cam)
        if key not in METHODS or not issubclass(METHODS[key], BaseCAM):
            cams = sorted(k for k, v in METHODS.items() if issubclass(v, BaseCAM))
            raise ValueError(f"cam='{cam}' is not a CAM of the engine; Guided Grad-CAM multiplies "
                             f"guided backprop by one of {cams}.")
        self.cam = make_cam(key, model, target_layers=target_layers, device=device,
                            amp_dtype=amp_dtype, eval_mode=eval_mode, **cam_options)
        self.guided = GuidedBackprop(model, rectify=rectify, device=device, amp_dtype=amp_dtype,
                                     eval_mode=eval_mode)
        self.model = model
        self.cam_name = key
        self.rectify = rectify

    @property
    def device(self) -> torch.device:
        return self.cam.device

    @property
    def options(self) -> dict[str, Any]:
        cam_options = self.cam.options
        return {"method": self.method_name, "cam": self.cam_name, "rectify": self.rectify,
                "channel_reduction": "max", "combination": "product",
                "target_layers": cam_options["target_layers"],
                "amp_dtype": cam_options["amp_dtype"], "eval_mode": cam_options["eval_mode"],
                "cam_options": cam_options}

    def layer_names(self, spatial_shape: Sequence[int] | None = None) -> list[str]:
        """The CAM's layers for inputs of ``spatial_shape``."""
        return self.cam.layer_names(spatial_shape)

    def __call__(self, x: torch.Tensor, targets: object = None) -> CAMResult:
        """Explain ``x`` ``(N, C, *spatial)``; see :meth:`BaseCAM.__call__` for ``targets``."""
        result = self.cam(x, targets)
        # the guided pass explains exactly the class the CAM explained
        same = targets if result.target_classes is None else result.target_classes.tolist()
        grad, _, _, _ = self.guided.input_gradient(x, same)
        fused = minmax_normalize(rectify_map(grad, self.rectify) * result.fused)
        cost = dict(result.cost)
        cost["forward_passes"] = cost.get("forward_passes", 0) + 1
        cost["backward_passes"] = cost.get("backward_passes", 0) + 1
        return CAMResult(
            fused=fused, layer_maps=result.layer_maps, layer_weights=result.layer_weights,
            layer_scores=result.layer_scores, scores=result.scores, logits=result.logits,
            target_classes=result.target_classes, method=self.method_name,
            options={**self.options, "target_layers": result.options["target_layers"],
                     "cam_options": result.options, "device": str(fused.device)},
            cost=cost,
        )
