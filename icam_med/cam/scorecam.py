"""Score-CAM (Wang et al., CVPR-W 2020): the CAM that trusts no gradient.

For a hooked layer with activation ``A`` ``(N, K, *s)``: each channel ``A_k`` is upsampled
to the input size (trilinear/bilinear, ``align_corners=False``) and min-max normalised to
``H_k`` in ``[0, 1]`` (a constant channel gives ``H_k = 0``); the model scores the masked
input ``x * H_k``; the channel weights are ``w = softmax_k(S(x * H_k))`` (``weights=
"softmax"``, the published algorithm and pytorch-grad-cam) or the normalised score increase
over the all-zero input ``relu(S(x * H_k) - S(0)) / sum`` (``weights="increase"``, the
paper's channel-wise increase of confidence); the layer map is ``relu(sum_k w_k A_k)`` at
the layer's resolution.

Cost: one forward pass to take the activations, then ``K * N`` masked inputs per layer in
gradient-free forwards of ``chunk`` inputs each (no backward pass at all). Memory is bounded
by ``chunk``: only ``chunk / N`` channels are upsampled at a time (never ``K`` full-size
masks), and a forward sees at most ``max(chunk, N)`` inputs. Several layers are fused like
any engine method (``fusion``), with ``uniform`` or ``counterfactual`` layer weights (the
gradient-based weightings and the bias term need a gradient and are refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icam_med.cam._copies import clean_forward, freeze_target, grouped_scores
from icam_med.cam.base import BaseCAM, CAMResult, _LayerContext, minmax_normalize

__all__ = ["SCORECAM_WEIGHTS", "ScoreCAM"]

#: Score-CAM's channel weights (option ``weights``), name -> meaning.
SCORECAM_WEIGHTS: dict[str, str] = {
    "softmax": "w = softmax over channels of S(x * H_k) (published algorithm, pytorch-grad-cam)",
    "increase": "w = relu(S(x * H_k) - S(0)) / sum over channels (the paper's increase of "
                "confidence over the all-zero input)",
}
_GRADIENT_FREE_WEIGHTINGS = ("uniform", "counterfactual")


class ScoreCAM(BaseCAM):
    """Score-CAM on any layer the engine can hook (several layers are fused).

    Args:
        model: the CNN.
        target_layers: as for every engine method; default ``"last"`` (the published method:
            the last block output).
        chunk: masked inputs per gradient-free forward (>= 1, default 32).
        weights: a name of :data:`SCORECAM_WEIGHTS` (``"softmax"`` default).
        **kwargs: engine options (``fusion``, ``layer_weighting`` ``"uniform"`` or
            ``"counterfactual"``, ``device``, ``amp_dtype``, ``eval_mode``).
    """

    method_name = "scorecam"

    def __init__(self, model: nn.Module, target_layers: str | Sequence[str] = "last", *,
                 chunk: int = 32, weights: str = "softmax", **kwargs: Any) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} must be an integer >= 1 (masked inputs per forward).")
        if weights not in SCORECAM_WEIGHTS:
            raise ValueError(f"weights='{weights}' is not supported; use one of "
                             f"{list(SCORECAM_WEIGHTS)}.")
        weighting = kwargs.get("layer_weighting")
        if weighting is not None and weighting not in _GRADIENT_FREE_WEIGHTINGS:
            raise ValueError(
                f"layer_weighting='{weighting}' needs gradients; Score-CAM uses none. Use one of "
                f"{list(_GRADIENT_FREE_WEIGHTINGS)}.")
        bias_weight = kwargs.get("bias_weight")
        if kwargs.get("bias_mode") is not None or (bias_weight is not None and bias_weight != 0):
            raise ValueError("Score-CAM has no bias term (it needs the gradient at the bias); "
                             "leave bias_weight and bias_mode out.")
        self.chunk = int(chunk)
        self.weights = weights
        super().__init__(model, target_layers, **kwargs)

    def method_options(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "weights": self.weights, "mask_normalisation": "per channel min-max",
                "masking": "x * H_k"}

    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:  # pragma: no cover - not used
        raise NotImplementedError("Score-CAM computes its maps without gradients.")

    def __call__(self, x: torch.Tensor, targets: object = None) -> CAMResult:
        """Explain ``x`` ``(N, C, *spatial)``; see :meth:`BaseCAM.__call__` for ``targets``."""
        x, n, target_fn, layers, modules, training = self._begin_call(x, targets)
        ctx = _LayerContext(input_size=tuple(x.shape[2:]),
                            mode="bilinear" if self.spatial_dims == 2 else "trilinear")
        acts: dict[str, torch.Tensor] = {}
        handles = []

        def keep(name: str):
            def hook(_m, _inp, out):
                if isinstance(out, torch.Tensor) and name not in acts:
                    acts[name] = out.detach().float().clone()
            return hook

        try:
            if self.eval_mode:
                self.model.eval()
            for name in layers:
                handles.append(modules[name].register_forward_hook(keep(name)))
            output = clean_forward(self.model, x, self.amp_dtype)
            for h in handles:
                h.remove()
            handles.clear()
            target_fn = freeze_target(target_fn, output)
            with torch.no_grad():
                scores, classes = self._scores(output, target_fn, n)
                baseline = None
                if self.weights == "increase":
                    baseline = grouped_scores(self._forward(torch.zeros_like(x)), target_fn, n)[0]
                extra = n if baseline is not None else 0
                maps = {}
                for name in layers:
                    if name not in acts:
                        raise ValueError(f"target layer '{name}' did not run in the forward pass.")
                    a = acts.pop(name)
                    raw, samples = self._layer_map_scorecam(x, a, target_fn, baseline)
                    extra += samples
                    maps[name] = minmax_normalize(raw)
                    del a
                ctx.maps.clear()
                relevance: dict[str, torch.Tensor]
                if self.layer_weighting == "counterfactual":
                    relevance, cf = self._counterfactual_relevance(x, maps, target_fn, scores, ctx)
                    extra += cf
                else:
                    relevance = {k: torch.zeros(n, device=x.device) for k in layers}
                weights = self._layer_weights(layers, relevance, n, x.device)
                if self.fusion == "multiplicative":
                    fused = self._fuse_multiplicative(layers, maps, weights, ctx)
                else:
                    fused = self._fuse_weighted(layers, maps, weights, ctx)
        finally:
            for h in handles:
                h.remove()
            for m, flag in training.items():
                m.training = flag
        options = self.options
        return CAMResult(
            fused=fused, layer_maps=maps, layer_weights=weights,
            layer_scores={k: relevance[k] for k in layers}, scores=scores.detach().float(),
            logits=output.detach(), target_classes=classes, method=self.method_name,
            options={**options, "target_layers": list(layers),
                     "target_layers_spec": options["target_layers"], "device": str(x.device)},
            cost={"forward_passes": 1, "backward_passes": 0, "extra_forward_samples": extra},
        )

    def _layer_map_scorecam(self, x: torch.Tensor, a: torch.Tensor, target_fn: Any,
                            baseline: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """``(relu(sum_k w_k A_k) (N, 1, *s), masked inputs run)`` for one layer."""
        n, k = a.shape[:2]
        size = tuple(x.shape[2:])
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        per_pass = max(1, self.chunk // n)  # channels per forward: chunk inputs, >= 1 per sample
        channel_scores = torch.empty((k, n), device=x.device, dtype=torch.float32)
        for k0 in range(0, k, per_pass):
            k1 = min(k, k0 + per_pass)
            up = F.interpolate(a[:, k0:k1], size=size, mode=mode, align_corners=False)  # (N, g, *S)
            flat = up.flatten(2)
            lo = flat.amin(2).view(n, k1 - k0, *(1,) * len(size))
            hi = flat.amax(2).view(n, k1 - k0, *(1,) * len(size))
            span = hi - lo
            masks = torch.where(span > 0, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up))
            del up, flat
            # group-major: rows j*N .. j*N+N-1 are channel k0+j of every sample
            masked = (x.unsqueeze(0) * masks.transpose(0, 1).unsqueeze(2)).to(x.dtype)
            masked = masked.reshape((k1 - k0) * n, *x.shape[1:])
            del masks
            out = self._forward(masked)
            channel_scores[k0:k1] = grouped_scores(out, target_fn, n).float()
            del masked, out
        if self.weights == "softmax":
            w = torch.softmax(channel_scores, dim=0)                      # (K, N)
        else:
            assert baseline is not None
            gain = torch.relu(channel_scores - baseline.float().view(1, n))
            total = gain.sum(0, keepdim=True)
            w = torch.where(total > 0, gain / total.clamp_min(1e-12), torch.zeros_like(gain))
        summed = torch.bmm(w.t().unsqueeze(1), a.flatten(2))                # (N, 1, P)
        return F.relu(summed.view(n, 1, *a.shape[2:])), k * n


def expected_passes(channels: int, n: int, chunk: int) -> int:
    """Gradient-free forwards Score-CAM runs for one layer of ``channels`` channels."""
    return math.ceil(channels / max(1, chunk // n))
