"""Reference maps the evaluation compares Integrative CAM against (issue 11).

* :func:`polycam_fusion`: coarse-to-fine multiplicative fusion of per-layer maps (a
  Poly-CAM-style prototype, Englebert et al., ICPR 2022): each finer map is gated by the
  upsampled coarser result, so class evidence comes from the deep layers and resolution
  from the shallow ones. Applied to the engine's LayerCAM per-layer maps.
* :func:`torchcam_layercam`: TorchCAM's own multi-layer LayerCAM (``torchcam.methods``),
  fused by its ``fuse_cams`` (tanh scaling and a voxel-wise maximum), an external peer.
* :func:`intensity_map`: the input's own intensity, a model-free control: it finds bright
  lesions (and bright distractors) and must lose on dark lesions.
* :func:`edge_map`: the input's gradient magnitude, a model-free control for the
  randomisation check.

Every function returns a ``(N, 1, *spatial)`` map at input size for a ``(N, C, *spatial)``
batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["edge_map", "intensity_map", "polycam_fusion", "torchcam_layercam"]


def _minmax(m: torch.Tensor) -> torch.Tensor:
    flat = m.flatten(1)
    lo = flat.min(1).values.view(-1, *([1] * (m.ndim - 1)))
    hi = flat.max(1).values.view(-1, *([1] * (m.ndim - 1)))
    span = hi - lo
    return torch.where(span > 0, (m - lo) / span.clamp_min(1e-12), torch.zeros_like(m))


def _resize(m: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(m.shape[2:]) == tuple(shape):
        return m
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    return F.interpolate(m, size=tuple(shape), mode=mode, align_corners=False)


def polycam_fusion(layer_maps: Mapping[str, torch.Tensor], output_shape: Sequence[int]
                   ) -> torch.Tensor:
    """Coarse-to-fine multiplicative fusion of per-layer maps (Poly-CAM style).

    Args:
        layer_maps: layer name -> ``(N, 1, *s_l)`` non-negative map at the layer's own
            resolution (e.g. ``CAMResult.layer_maps``).
        output_shape: the input's spatial shape.

    Returns:
        ``(N, 1, *output_shape)`` map in ``[0, 1]``: starting from the coarsest map, each
        finer map is multiplied by the upsampled running product (min-max normalised at
        every step), and the result is upsampled to the input size.
    """
    if not layer_maps:
        raise ValueError("polycam_fusion needs at least one layer map.")
    maps = sorted(layer_maps.values(), key=lambda m: m[0, 0].numel())
    fused = _minmax(maps[0].float())
    for m in maps[1:]:
        fused = _minmax(_resize(fused, m.shape[2:]) * m.float())
    return _minmax(_resize(fused, output_shape))


def torchcam_layercam(model: nn.Module, x: torch.Tensor, target: int,
                      layers: Sequence[str]) -> torch.Tensor:
    """TorchCAM's LayerCAM on ``layers``, fused by ``LayerCAM.fuse_cams``.

    The extractor's hooks are registered for this call only and removed afterwards.
    """
    from torchcam.methods import LayerCAM as TorchCamLayerCAM

    was_training = model.training
    model.eval()
    extractor = TorchCamLayerCAM(model, target_layer=list(layers),
                                 input_shape=tuple(x.shape[1:]))
    try:
        with torch.enable_grad():
            scores = model(x)
            cams = extractor(class_idx=int(target), scores=scores)
        fused = extractor.fuse_cams([c.detach() for c in cams], tuple(x.shape[2:]))
    finally:
        extractor.remove_hooks()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return fused.unsqueeze(1).float()


def intensity_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input's intensity (channels summed, shifted to start at 0); ignores ``model``."""
    del model
    m = x.float().sum(1, keepdim=True)
    return m - m.flatten(1).min(1).values.view(-1, *([1] * (m.ndim - 1)))


def edge_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A model-free "explanation": the gradient magnitude of the input (its edges).

    A control for the randomisation check: it ignores ``model`` entirely, so its maps
    cannot change when the weights are randomised.
    """
    del model
    xs = x.float()
    grads = torch.gradient(xs, dim=tuple(range(2, xs.ndim)))
    return torch.sqrt(sum(g * g for g in grads)).sum(1, keepdim=True)
