"""The one CAM engine every method shares (ICAM_SPEC section 5).

A call is one forward pass and one backward pass, whatever the number of hooked layers:

1. forward hooks (removed in ``finally``) keep a reference to each hooked layer's output
   (a container's ``forward`` output: a block after its activation and residual add), and
   to the outputs of the modules that carry its bias (the norm or conv feeding it);
2. tensor hooks on those outputs receive ``G = dS/dA`` during a single
   ``torch.autograd.grad(score, edges)`` that computes no parameter gradients and stops
   at the shallowest hooked tensor;
3. inside each tensor hook the layer is reduced at once to its native-resolution activation
   term and relevance score (the bias sources to their bias term), and its activation is
   dropped;
4. after the pass the layer weights are computed (``layer_weighting``, see
   :data:`LAYER_WEIGHTINGS`; ``counterfactual`` adds one batched gradient-free forward pass)
   and the maps are fused (``fusion``, see :data:`FUSIONS`). A weighted sum is taken per
   native resolution and each resolution is upsampled once (never L full-size copies).

Subclasses differ only in :meth:`BaseCAM.activation_map` (channel weights or per-position
weighting); the bias term, the layer weights and the fusion are options of the base.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icam_med.cam.layers import (
    LAYER_PRESETS,
    LayerRecord,
    check_supported_model,
    first_conv,
    own_bias,
    probe_layers,
    record_bias,
    select_layers,
    validate_layer_names,
)
from icam_med.cam.targets import ClassTarget, resolve_targets
from icam_med.memory import release_freed_memory

__all__ = ["BIAS_MODES", "FUSIONS", "LAYER_WEIGHTINGS", "BaseCAM", "CAMResult", "minmax_normalize"]

log = logging.getLogger(__name__)

#: How each layer is weighted in the fusion (option ``layer_weighting``), name -> meaning.
LAYER_WEIGHTINGS: dict[str, str] = {
    "score": "s_l = sum(relu(G*A)) over channels and positions; omega = s / sum(s)",
    "net": "s_l = max(sum(G*A), 0), the layer's net first-order contribution; omega = s / sum(s)",
    "per_position": "s_l = mean over positions of relu(sum_k G_k*A_k) (per-position net "
                    "contribution, averaged so resolution does not inflate it); omega = s / sum(s)",
    "softmax": "omega = softmax(log(s_l) / tau) with s_l the 'score' relevance",
    "uniform": "omega = 1 / L",
    "counterfactual": "one batched gradient-free forward over the input kept only inside each "
                      "layer's top region (counterfactual_keep of the voxels, the rest set to the "
                      "input's mean): s_l = max(S(kept_l) - S(baseline), 0); omega = s / sum(s)",
}
#: How the per-layer maps are fused (option ``fusion``), name -> meaning.
FUSIONS: dict[str, str] = {
    "weighted": "F = norm(sum_l omega_l * up(M_l))",
    "multiplicative": "coarse to fine (Poly-CAM style): F <- norm(up(F) * M_l ** (L*omega_l)) from "
                      "the coarsest map to the finest, then up to the input size; deep maps gate "
                      "shallow ones",
}
#: The bias term of a layer's map (option ``bias_mode``), name -> meaning.
BIAS_MODES: dict[str, str] = {
    "signed": "relu(sum_k G_k * b_k) with b the folded bias of the norm/conv feeding the layer",
    "abs": "sum_k |G_k * b_k| (FullGrad style)",
    "complete": "FullGrad's completeness: one map over every bias-carrying module of the network "
                "(each bias b with the gradient G at its output, sum_k G_k b_k) plus the input-"
                "gradient term x * dS/dx, whose totals sum to the score for a piecewise-linear "
                "network (result.bias_contributions); relu of it is added to the fused map with "
                "bias_weight. Runs the backward pass to the input",
}
_NORM_EPS = 1e-12


def minmax_normalize(m: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max over every non-batch axis (whole volume, never per slice).

    A zero map stays zero; a constant positive map becomes ones.
    """
    flat = m.flatten(1)
    lo = flat.min(1).values
    hi = flat.max(1).values
    rng = hi - lo
    extra = (1,) * (m.ndim - 1)
    lo_, rng_, hi_ = lo.view(-1, *extra), rng.view(-1, *extra), hi.view(-1, *extra)
    spread = (m - lo_) / rng_.clamp_min(_NORM_EPS)
    flat_map = torch.where(hi_ > _NORM_EPS, m / hi_.clamp_min(_NORM_EPS), torch.zeros_like(m))
    return torch.where(rng_ > _NORM_EPS, spread, flat_map)


@dataclass
class CAMResult:
    """What a CAM call returns. Tensors stay on the model's device (see :meth:`cpu`).

    Attributes:
        fused: ``(N, 1, *spatial)`` fused map at input size, float32 in ``[0, 1]``.
        layer_maps: layer name -> ``(N, 1, *s_l)`` map at the layer's own resolution, in ``[0, 1]``.
        layer_weights: layer name -> ``(N,)`` weight of that layer in the fusion (sum to 1
            over layers; uniform where every relevance ``s_l`` is 0).
        layer_scores: layer name -> ``(N,)`` relevance ``s_l`` of the ``layer_weighting``
            (for ``counterfactual`` the score gain, which may be negative).
        scores: ``(N,)`` target scores.
        logits: the model output (detached).
        target_classes: ``(N,)`` class indices explained, or ``None`` for callable targets.
        method: method name.
        options: every option of the method, JSON-serialisable (for audit records).
        cost: what the call ran: ``forward_passes`` and ``backward_passes`` of the batch,
            and ``extra_forward_samples`` (the ``counterfactual`` weighting's batched
            gradient-free forward, in samples; 0 otherwise).
        bias_contributions: with ``bias_mode="complete"``, module name -> ``(N,)`` total
            contribution ``sum_pos sum_k G_k b_k`` of that module's bias, and ``"input"`` ->
            ``sum(x * dS/dx)``; for a piecewise-linear network in eval mode they sum to
            ``scores`` (FullGrad's completeness). Empty otherwise.
    """

    fused: torch.Tensor
    layer_maps: dict[str, torch.Tensor]
    layer_weights: dict[str, torch.Tensor]
    layer_scores: dict[str, torch.Tensor]
    scores: torch.Tensor
    logits: torch.Tensor
    target_classes: torch.Tensor | None
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    cost: dict[str, int] = field(default_factory=dict)
    bias_contributions: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def predicted(self) -> torch.Tensor | None:
        """``(N,)`` predicted class for a classification output, else ``None``."""
        return self.logits.argmax(1) if self.logits.ndim == 2 else None

    def to(self, device: str | torch.device) -> CAMResult:
        """A copy with every tensor moved to ``device``."""

        def mv(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in d.items()}

        return replace(
            self,
            fused=self.fused.to(device),
            layer_maps=mv(self.layer_maps),
            layer_weights=mv(self.layer_weights),
            layer_scores=mv(self.layer_scores),
            scores=self.scores.to(device),
            logits=self.logits.to(device),
            target_classes=None if self.target_classes is None else self.target_classes.to(device),
            options=dict(self.options),
            cost=dict(self.cost),
            bias_contributions=mv(self.bias_contributions),
        )

    def cpu(self) -> CAMResult:
        """A copy with every tensor on the CPU."""
        return self.to("cpu")


@dataclass
class _LayerContext:
    """Per-call state shared by the tensor hooks."""

    input_size: tuple[int, ...]
    mode: str
    ratio: torch.Tensor | None = None  # generalised-alpha r per sample
    probs: torch.Tensor | None = None  # softmax probabilities (N, J) for the true softmax alpha
    classes: torch.Tensor | None = None
    stashing: bool = False  # an extra backward pass only collects per-logit gradients
    stash: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    current: str = ""  # the layer whose activation term is being computed
    # bias_mode="complete": per-module totals and per-resolution sums of the bias maps
    complete_totals: dict[str, torch.Tensor] = field(default_factory=dict)
    complete_maps: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)  # activation term, raw
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # bias term, summed over sources
    relevance: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _HookedLayer:
    """One hooked layer during a call: how its activation is kept, and its gradient anchor."""

    name: str
    module: nn.Module
    strategy: str  # "hold" | "recompute" | "clone"
    value: torch.Tensor | None = None
    inputs: tuple[Any, ...] | None = None
    input_version: int = 0
    anchor: Any = None  # gradient edge of the output, taken before any later in-place change
    native_shape: tuple[int, ...] = ()
    error: str | None = None
    calls: int = 0

    def activation(self, amp_dtype: torch.dtype | None) -> torch.Tensor:
        """The layer's output values, then forget them."""
        if self.value is not None:
            value, self.value = self.value.detach(), None
            return value
        assert self.inputs is not None
        first = self.inputs[0]
        if first._version != self.input_version:
            raise RuntimeError(
                f"the input of target layer '{self.name}' was changed in place after the layer "
                "ran; its activation cannot be recomputed. Choose another layer."
            )
        args = tuple(i.detach() if isinstance(i, torch.Tensor) else i for i in self.inputs)
        self.inputs = None
        if amp_dtype is not None:
            with torch.autocast(device_type=first.device.type, dtype=amp_dtype):
                return self.module(*args)
        return self.module(*args)

    def release(self) -> None:
        self.value = self.inputs = self.anchor = None


@dataclass
class _BiasSource:
    """A module whose output carries (part of) the bias of one or more hooked layers."""

    name: str
    module: nn.Module
    bias: torch.Tensor
    layers: tuple[str, ...]
    anchor: Any = None
    calls: int = 0


def _all_biases(model: nn.Module) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """Every module that adds a per-channel bias of its own (``complete`` mode): convolutions
    and linear layers with a bias, BatchNorm's ``beta - gamma * mean / sqrt(var + eps)`` (the
    conv bias before it is counted at the conv), GroupNorm/InstanceNorm's ``beta``."""
    found = []
    for name, module in model.named_modules():
        bias = own_bias(module)
        if bias is not None:
            found.append((name, module, bias))
    return found


def _covering_anchors(scores: torch.Tensor, edges: list[Any]) -> list[Any]:
    """The fewest gradient edges whose backward pass runs through every one of ``edges``.

    ``autograd.grad`` returns one gradient per input and holds them all until it returns;
    asking only for edges that are not already upstream of another one (usually just the
    shallowest layer) keeps that memory to one layer's size. An edge is covered when the
    backward to a chosen edge has to run its node, which fires its tensor hooks. One
    memoised walk of the graph finds, for every node, the edges reachable through it.
    """
    bits_of: dict[tuple[Any, int], int] = {}
    for i, edge in enumerate(edges):
        key = (edge.node, edge.output_nr)
        bits_of[key] = bits_of.get(key, 0) | (1 << i)
    reach: dict[Any, int] = {}
    root = scores.grad_fn
    stack: list[tuple[Any, bool]] = [(root, False)] if root is not None else []
    while stack:  # iterative post-order: graphs are deeper than Python's recursion limit
        node, expanded = stack.pop()
        if node in reach:
            continue
        children = [(c, nr) for c, nr in node.next_functions if c is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((c, False) for c, _ in children if c not in reach)
            continue
        bits = 0
        for child, nr in children:
            bits |= bits_of.get((child, nr), 0) | reach.get(child, 0)
        reach[node] = bits
    # shallowest edges first (they reach no other edge), then any edge they do not cover
    order = sorted(range(len(edges)), key=lambda i: reach.get(edges[i].node, 0) != 0)
    chosen = 0
    anchors: list[Any] = []
    for i in order:
        if not reach.get(edges[i].node, 0) & chosen and not (chosen >> i) & 1:
            chosen |= bits_of[(edges[i].node, edges[i].output_nr)]
            anchors.append(edges[i])
    return anchors


class BaseCAM:
    """Shared engine. Subclasses override :meth:`activation_map` only.

    Args:
        model: a CNN with 2D or 3D convolutions (eager: TorchScript cannot be hooked). It
            is left exactly as it was after every call (training flags, hooks,
            ``requires_grad``, ``.grad``).
        target_layers: ``"stages"`` (default: the last block output before each change of
            spatial size), ``"all"`` (every block output), ``"last"`` (the last block
            output), a dotted module name (containers included, e.g. ``"layer4"``), or a
            list of them. See :mod:`icam_med.cam.layers` for what a block output is.
        layer_weighting: how layers are weighted in the fusion, a name of
            :data:`LAYER_WEIGHTINGS`. Default per method.
        tau: temperature of ``"softmax"`` layer weighting.
        fusion: how the per-layer maps are fused, a name of :data:`FUSIONS`.
            Default per method (``"weighted"``; Integrative CAM ``"multiplicative"``).
        counterfactual_keep: fraction of the voxels kept inside a layer's top region by the
            ``"counterfactual"`` weighting, in ``(0, 1)``.
        bias_weight: ``lambda_b``, weight of the bias term in each layer's map
            (0 disables it). Default per method (0 for every method), except that naming a
            ``bias_mode`` without a ``bias_weight`` turns the bias term on at weight 1: asking
            for a bias mode never silently gives no bias term.
        bias_mode: the bias term, a name of :data:`BIAS_MODES` (default ``"signed"``).
        device: where the computation runs; default the model's device. The model must
            already be there (it is never moved); inputs are moved to it.
        amp_dtype: optional autocast dtype for the forward pass (e.g. ``torch.bfloat16``);
            every reduction is done in float32 regardless.
        eval_mode: run the model in eval mode (BatchNorm running statistics, no dropout)
            during the call; its flags are restored afterwards.
    """

    method_name = "base"
    default_layer_weighting = "uniform"
    default_bias_weight = 0.0
    default_fusion = "weighted"

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] = "stages",
        *,
        layer_weighting: str | None = None,
        tau: float = 1.0,
        fusion: str | None = None,
        counterfactual_keep: float = 0.1,
        bias_weight: float | None = None,
        bias_mode: str | None = None,
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | str | None = None,
        eval_mode: bool = True,
    ) -> None:
        check_supported_model(model, presets=isinstance(target_layers, str)
                              and target_layers in LAYER_PRESETS)
        conv = first_conv(model)
        if conv is None:
            raise ValueError(
                f"{type(model).__name__} has no convolution layer: a CAM needs a network with "
                "spatial (2D or 3D convolutional) layers."
            )
        self.model = model
        self._conv_name, conv_mod = conv
        self.in_channels = int(conv_mod.in_channels)
        self.spatial_dims = len(conv_mod.kernel_size)
        if self.spatial_dims not in (2, 3):
            raise ValueError(
                f"first convolution '{self._conv_name}' is {self.spatial_dims}D; only 2D and 3D "
                "networks are supported."
            )

        if isinstance(target_layers, str):
            spec: str | tuple[str, ...] = target_layers
            if target_layers not in LAYER_PRESETS:
                validate_layer_names(model, [target_layers])
                spec = (target_layers,)
        else:
            spec = tuple(target_layers)
            if not spec:
                raise ValueError("target_layers is an empty list; give at least one layer name.")
            validate_layer_names(model, spec)
        self.target_layers = spec

        weighting = layer_weighting or self.default_layer_weighting
        if weighting not in LAYER_WEIGHTINGS:
            raise ValueError(
                f"layer_weighting='{weighting}' is not supported; use one of {list(LAYER_WEIGHTINGS)}."
            )
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau={tau!r} must be a positive number (softmax temperature).")
        fusion = fusion or self.default_fusion
        if fusion not in FUSIONS:
            raise ValueError(f"fusion='{fusion}' is not supported; use one of {list(FUSIONS)}.")
        if not (isinstance(counterfactual_keep, (int, float)) and 0 < counterfactual_keep < 1):
            raise ValueError(f"counterfactual_keep={counterfactual_keep!r} must be a fraction of "
                             "the voxels in (0, 1), e.g. 0.1.")
        if bias_weight is None:
            bw = self.default_bias_weight if bias_mode is None else 1.0
        else:
            bw = float(bias_weight)
        bias_mode = "signed" if bias_mode is None else bias_mode
        if not (math.isfinite(bw) and bw >= 0):
            raise ValueError(f"bias_weight={bias_weight!r} must be a non-negative number.")
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode='{bias_mode}' is not supported; use one of {list(BIAS_MODES)}.")
        self.layer_weighting = weighting
        self.tau = float(tau)
        self.fusion = fusion
        self.counterfactual_keep = float(counterfactual_keep)
        self.bias_weight = bw
        self.bias_mode = bias_mode
        if isinstance(amp_dtype, str):  # from a YAML config
            resolved = getattr(torch, amp_dtype.replace("torch.", ""), None)
            if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
                raise ValueError(f"amp_dtype='{amp_dtype}' is not a floating torch dtype; use "
                                 "'bfloat16' or 'float16'.")
            amp_dtype = resolved
        self.amp_dtype = amp_dtype
        self.eval_mode = bool(eval_mode)

        model_device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.device = torch.device(device) if device is not None else model_device
        if self.device.type != model_device.type or (
            self.device.index is not None and model_device.index is not None
            and self.device.index != model_device.index
        ):
            raise ValueError(
                f"device='{self.device}' was requested but the model is on '{model_device}'; "
                f"move the model first (model.to('{self.device}')): the engine never moves it."
            )
        self._probe_cache: dict[tuple[int, ...], tuple[list[LayerRecord], tuple[int, ...]]] = {}
        self._layer_cache: dict[tuple[int, ...], list[str]] = {}
        self._anchor_cache: dict[tuple[Any, ...], tuple[str, ...]] = {}

    # ------------------------------------------------------------------ method hooks
    def activation_map(self, acts: torch.Tensor, grads: torch.Tensor,
                       ctx: _LayerContext) -> torch.Tensor:
        """The activation term of one layer, ``(N, 1, *s)``, before normalisation (fp32)."""
        raise NotImplementedError

    def _prepare_context(self, ctx: _LayerContext, scores: torch.Tensor,
                         logits: torch.Tensor, classes: torch.Tensor | None) -> None:
        """Per-call preparation from the forward output (e.g. the alpha ratio)."""

    def method_options(self) -> dict[str, Any]:
        """Options specific to a method, for :attr:`CAMResult.options`."""
        return {}

    def _extra_backward_scores(self, output: torch.Tensor) -> list[torch.Tensor]:
        """Scores whose gradients an activation term needs besides the target's (each costs
        one more backward pass; e.g. every logit for the true softmax alpha)."""
        return []

    # ------------------------------------------------------------------ public API
    @property
    def options(self) -> dict[str, Any]:
        """Every option, JSON-serialisable."""
        spec = self.target_layers
        return {
            "method": self.method_name,
            "target_layers": spec if isinstance(spec, str) else list(spec),
            "layer_weighting": self.layer_weighting,
            "tau": self.tau,
            "fusion": self.fusion,
            "counterfactual_keep": self.counterfactual_keep,
            "bias_weight": self.bias_weight,
            "bias_mode": self.bias_mode,
            "amp_dtype": None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", ""),
            "eval_mode": self.eval_mode,
            "upsampling": "bilinear" if self.spatial_dims == 2 else "trilinear",
            "align_corners": False,
            **self.method_options(),
        }

    def layer_names(self, spatial_shape: Sequence[int] | None = None) -> list[str]:
        """The layers hooked for inputs of ``spatial_shape`` (presets need a shape)."""
        if not isinstance(self.target_layers, str):
            return list(self.target_layers)
        if spatial_shape is None:
            if len(self._layer_cache) == 1:
                return list(next(iter(self._layer_cache.values())))
            raise ValueError(f"target_layers='{self.target_layers}' depends on the input shape; "
                             "pass spatial_shape.")
        key = self._probed(spatial_shape)
        return list(self._layer_cache[key])

    def layer_records(self, spatial_shape: Sequence[int]) -> list[LayerRecord]:
        """What the probe saw for inputs of ``spatial_shape``: every module with a spatial
        output, its kind, whether a preset may choose it, and the modules carrying its bias.

        Works alike for a preset and for an explicit list of layers (one probe forward pass
        per input size, cached and shared with the explanation).

        Raises:
            ValueError: the model has no spatial layer at this size, or a named target layer
                gives no spatial feature map at this size.
        """
        return list(self._probe_cache[self._probed(spatial_shape)][0])

    def output_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The model's output shape per sample for inputs of ``spatial_shape``: ``(K,)``
        for a classifier, ``(K, *spatial)`` for a segmentation network (from the same cached
        probe as :meth:`layer_records`)."""
        return tuple(self._probe_cache[self._probed(spatial_shape)][1])

    def _probed(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The cache key of ``spatial_shape``, after one probe pass at that size if none ran
        yet (an example of zeros in the model's dtype, on its device)."""
        key = tuple(int(s) for s in spatial_shape)
        if key not in self._probe_cache:
            example = torch.zeros((1, self.in_channels, *key), device=self.device,
                                  dtype=self._param_dtype())
            self._probe(example)
        return key

    def _begin_call(self, x: torch.Tensor, targets: object) -> tuple[Any, ...]:
        """Every check of a call, before any pass: the checked input, its batch size, the
        target function, the hooked layers, the model's modules and their training flags."""
        x = self._check_input(x)
        n = x.shape[0]
        target_fn = resolve_targets(targets, n)
        layers, out_shape = self._resolve(x)
        self._check_targets(target_fn, out_shape)
        modules = dict(self.model.named_modules())
        training = {m: m.training for m in self.model.modules()}
        return x, n, target_fn, layers, modules, training

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward pass, under autocast when ``amp_dtype`` is set."""
        if self.amp_dtype is not None:
            with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                return self.model(x)
        return self.model(x)

    def __call__(self, x: torch.Tensor, targets: object = None) -> CAMResult:
        """Explain ``x`` of shape ``(N, C, *spatial)``.

        Args:
            x: input batch, 2D ``(N, C, H, W)`` or 3D ``(N, C, D, H, W)``.
            targets: ``None`` (each sample's predicted class), a class index, a list of class
                indices (one per sample), a callable ``output -> (N,)`` scores, a
                :class:`~icam_med.cam.targets.SegmentationTarget`, or a list of callables.

        Raises:
            ValueError: wrong dimensionality, channels, non-finite values, targets out of
                range or of the wrong kind; raised before the explained pass runs.
        """
        x, _n, target_fn, layers, modules, training = self._begin_call(x, targets)
        records = {r.name: r for r in self._probe_cache[tuple(x.shape[2:])][0]}
        ctx = _LayerContext(input_size=tuple(x.shape[2:]),
                            mode="bilinear" if self.spatial_dims == 2 else "trilinear")
        hooked = {name: _HookedLayer(name, modules[name], self._strategy(records.get(name), modules[name]))
                  for name in layers}
        complete = self.bias_weight > 0 and self.bias_mode == "complete"
        sources = self._bias_sources(layers, records, modules) \
            if self.bias_weight > 0 and not complete else {}
        handles = []
        try:
            if self.eval_mode:
                self.model.eval()
            for layer in hooked.values():
                handles.append(layer.module.register_forward_hook(self._forward_hook(layer, ctx)))
            for source in sources.values():
                handles.append(source.module.register_forward_hook(self._source_hook(source, ctx)))
            if complete:
                for name, module, bias in _all_biases(self.model):
                    handles.append(module.register_forward_hook(
                        self._complete_hook(name, bias.to(self.device), ctx)))
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                output = self._forward(x_in)
                for h in handles:
                    h.remove()
                handles.clear()
                return self._backward(x_in, output, target_fn, hooked, sources, ctx)
        finally:
            for h in handles:
                h.remove()
            for m, flag in training.items():
                m.training = flag
            for layer in hooked.values():
                layer.release()
            for source in sources.values():
                source.anchor = None

    # ------------------------------------------------------------------ internals
    def _param_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters() if p.is_floating_point()),
                    torch.float32)

    def _check_input(self, x: object) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"x must be a torch.Tensor of shape (N, C, *spatial), got {type(x).__name__}.")
        axes = "(N, C, H, W)" if self.spatial_dims == 2 else "(N, C, D, H, W)"
        if x.ndim != self.spatial_dims + 2:
            fix = " Add a batch axis with x[None]." if x.ndim == self.spatial_dims + 1 else ""
            raise ValueError(
                f"input has shape {tuple(x.shape)} ({x.ndim} dims), but this {self.spatial_dims}D "
                f"model expects {self.spatial_dims + 2} dims {axes}.{fix}"
            )
        if x.shape[0] == 0:
            raise ValueError("input batch is empty (N = 0).")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"input has {x.shape[1]} channel(s) (shape {tuple(x.shape)}), but the model's first "
                f"convolution '{self._conv_name}' expects {self.in_channels}. Select or stack the "
                "right channels before calling."
            )
        if not x.is_floating_point():
            x = x.to(self._param_dtype())
        x = x.to(self.device)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("input contains NaN or Inf values; clean or mask them before explaining.")
        return x

    def _probe(self, x: torch.Tensor) -> tuple[list[LayerRecord], tuple[int, ...]]:
        key = tuple(x.shape[2:])
        if key not in self._probe_cache:
            training = {m: m.training for m in self.model.modules()}
            out_shape: list[tuple[int, ...]] = []
            try:
                if self.eval_mode:
                    self.model.eval()
                records, out = probe_layers(self.model, x[:1].detach())
                if not isinstance(out, torch.Tensor):
                    raise ValueError(
                        f"the model returns {type(out).__name__}; a CAM needs a tensor output "
                        "(logits (N, K) or a segmentation map (N, K, *spatial))."
                    )
                out_shape.append(tuple(out.shape[1:]))
            finally:
                for m, flag in training.items():
                    m.training = flag
            if isinstance(self.target_layers, str):
                names = select_layers(records, self.target_layers)
                if not names:
                    raise ValueError(
                        f"{type(self.model).__name__} has no layer with a spatial output for inputs "
                        f"of spatial size {key}; a CAM needs convolutional feature maps."
                    )
            else:
                seen = {r.name: r for r in records}
                for name in self.target_layers:
                    if name not in seen:
                        raise ValueError(
                            f"target layer '{name}' produced no spatial feature map for inputs of "
                            f"spatial size {key} (it is not run, returns a non-tensor, or its output "
                            "has no spatial extent, like a Linear layer or a global pooling)."
                        )
                names = list(self.target_layers)
            self._probe_cache[key] = (records, out_shape[0])
            self._layer_cache[key] = names
        return self._probe_cache[key][0], self._probe_cache[key][1]

    def _resolve(self, x: torch.Tensor) -> tuple[list[str], tuple[int, ...]]:
        _, out_shape = self._probe(x)
        return self._layer_cache[tuple(x.shape[2:])], out_shape

    def _check_targets(self, target_fn: object, out_shape: tuple[int, ...]) -> None:
        n_classes = out_shape[0] if len(out_shape) >= 1 else None
        if target_fn is None:
            if len(out_shape) != 1:
                raise ValueError(
                    f"targets=None explains the predicted class of a classifier, but the model "
                    f"output has per-sample shape {out_shape}; pass a SegmentationTarget or a callable."
                )
            return
        if isinstance(target_fn, ClassTarget):
            if len(out_shape) != 1:
                raise ValueError(
                    f"a class index target needs a classification output (N, K); the model output "
                    f"has per-sample shape {out_shape}. Use SegmentationTarget for segmentation."
                )
            classes = [target_fn.classes] if isinstance(target_fn.classes, int) else list(target_fn.classes)
            bad = [c for c in classes if not 0 <= c < n_classes]
            if bad:
                raise ValueError(
                    f"target class {bad[0]} is out of range: the model has {n_classes} classes "
                    f"(valid indices 0..{n_classes - 1})."
                )

    def _bias_sources(self, layers: list[str], records: dict[str, LayerRecord],
                      modules: dict[str, nn.Module]) -> dict[str, _BiasSource]:
        """The modules carrying each hooked layer's bias, with their folded biases."""
        users: dict[str, list[str]] = {}
        for name in layers:
            rec = records.get(name)
            for src in (rec.bias_sources if rec is not None else ()):
                users.setdefault(src, []).append(name)
        sources = {}
        for src, names in users.items():
            bias = record_bias(records[src], modules) if src in records else None
            if bias is not None:
                sources[src] = _BiasSource(src, modules[src], bias.to(self.device), tuple(names))
        return sources

    def _scores(self, output: torch.Tensor, target_fn: object, n: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if target_fn is None:
            classes = output.detach().argmax(1)
            return output.gather(1, classes.view(-1, 1)).squeeze(1), classes
        if isinstance(target_fn, ClassTarget):
            return target_fn(output), target_fn.indices(n, output.device)
        scores = target_fn(output)  # type: ignore[operator]
        if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(
                f"target callable returned {got}; it must return one score per sample, shape ({n},)."
            )
        return scores, None

    def _backward(self, x: torch.Tensor, output: torch.Tensor, target_fn: object,
                  hooked: dict[str, _HookedLayer], sources: dict[str, _BiasSource],
                  ctx: _LayerContext) -> CAMResult:
        n = x.shape[0]
        scores, classes = self._scores(output, target_fn, n)
        for layer in hooked.values():
            if layer.error:
                raise ValueError(layer.error)
            if layer.anchor is None:
                raise ValueError(f"target layer '{layer.name}' did not run in the forward pass.")

        self._prepare_context(ctx, scores.detach().float(), output.detach().float(), classes)

        # One backward pass, to the hooked tensors only: no parameter gradients, and the
        # pass stops at the shallowest of them. Each tensor hook reduces its layer as soon
        # as its gradient arrives; the returned gradients themselves are not used.
        owners = [(name, layer.anchor) for name, layer in hooked.items()]
        owners += [(f"bias:{k}", s.anchor) for k, s in sources.items() if s.anchor is not None]
        edges = [edge for _, edge in owners]
        # Which edges cover the others is a property of the architecture and input shape:
        # the graph walk runs once per (shape, hooked tensors), later calls reuse its choice.
        key = (ctx.input_size, tuple(name for name, _ in owners))
        if key not in self._anchor_cache:
            chosen = {id(e) for e in _covering_anchors(scores, edges)}
            self._anchor_cache[key] = tuple(name for name, e in owners if id(e) in chosen)
        wanted = set(self._anchor_cache[key])
        anchors = [edge for name, edge in owners if name in wanted]
        extra = self._extra_backward_scores(output)
        if extra:
            ctx.stashing = True
            for extra_score in extra:
                torch.autograd.grad(extra_score.sum(), anchors, allow_unused=True, retain_graph=True)
            ctx.stashing = False
        complete = self.bias_weight > 0 and self.bias_mode == "complete"
        if complete:  # FullGrad: the backward runs to the input
            grads = torch.autograd.grad(scores.sum(), [*anchors, x], allow_unused=True)
            input_grad = grads[-1]
        else:
            grads = torch.autograd.grad(scores.sum(), anchors, allow_unused=True)
        del grads, anchors, edges
        x = x.detach()

        for layer in hooked.values():
            if layer.name not in ctx.maps:  # no gradient reached this layer
                log.warning("no gradient reached target layer '%s'; its map is zero", layer.name)
                ctx.maps[layer.name] = torch.zeros((n, 1, *layer.native_shape), device=x.device)
                ctx.relevance[layer.name] = torch.zeros((n,), device=x.device)
            layer.release()
        names = list(hooked)
        maps = {name: self._layer_map(name, ctx) for name in names}
        ctx.maps.clear()
        ctx.bias.clear()
        extra_samples = 0
        if self.layer_weighting == "counterfactual":
            relevance, extra_samples = self._counterfactual_relevance(x, maps, target_fn, scores, ctx)
        else:
            relevance = ctx.relevance
        weights = self._layer_weights(names, relevance, n, x.device)
        if self.fusion == "multiplicative":
            fused = self._fuse_multiplicative(names, maps, weights, ctx)
        else:
            fused = self._fuse_weighted(names, maps, weights, ctx)
        contributions: dict[str, torch.Tensor] = {}
        if complete:
            fused, contributions = self._add_complete_term(fused, x, input_grad, ctx)
        options = self.options
        return CAMResult(
            fused=fused,
            layer_maps=maps,
            layer_weights=weights,
            layer_scores={k: relevance[k] for k in names},
            scores=scores.detach().float(),
            logits=output.detach(),
            target_classes=classes,
            method=self.method_name,
            options={**options, "target_layers": names,
                     "target_layers_spec": options["target_layers"], "device": str(x.device)},
            cost={"forward_passes": 1, "backward_passes": 1 + len(extra),
                  "extra_forward_samples": extra_samples},
            bias_contributions=contributions,
        )

    def _complete_hook(self, name: str, bias: torch.Tensor, ctx: _LayerContext):
        """Forward hook of a bias-carrying module (``complete`` mode): its bias's contribution
        ``sum_k G_k b_k`` is taken from the gradient at its output, per call."""

        def hook(_m, _inp, out):
            if not isinstance(out, torch.Tensor) or not out.requires_grad or out.ndim < 2 \
                    or out.shape[1] != bias.numel():
                return None

            def grad_hook(grad: torch.Tensor) -> None:
                if ctx.stashing:
                    return
                with torch.no_grad():
                    g = grad.detach().float()
                    b = bias.view(1, -1, *(1,) * (g.ndim - 2))
                    per_pos = (g * b).sum(1, keepdim=True)  # (N, 1, *s)
                    total = per_pos.flatten(1).sum(1)
                    ctx.complete_totals[name] = ctx.complete_totals.get(name, 0) + total
                    if g.ndim == len(ctx.input_size) + 2:
                        key = tuple(g.shape[2:])
                        scale = math.prod(key) / math.prod(ctx.input_size)  # keep the sum
                        if key in ctx.complete_maps:
                            ctx.complete_maps[key].add_(per_pos, alpha=scale)
                        else:
                            ctx.complete_maps[key] = per_pos * scale

            out.register_hook(grad_hook)
            return None

        return hook

    def _add_complete_term(self, fused: torch.Tensor, x: torch.Tensor, input_grad: torch.Tensor,
                           ctx: _LayerContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``F <- norm(F + lambda_b * norm(relu(B)))`` with FullGrad's complete map ``B``."""
        gx = (x.float() * input_grad.float()).sum(1, keepdim=True)  # (N, 1, *S)
        contributions = {"input": gx.flatten(1).sum(1)}
        contributions.update({k: v.float() for k, v in ctx.complete_totals.items()})
        b_map = gx
        for buf in ctx.complete_maps.values():
            b_map = b_map + F.interpolate(buf, size=ctx.input_size, mode=ctx.mode, align_corners=False)
        ctx.complete_maps.clear()
        ctx.complete_totals.clear()
        fused = minmax_normalize(fused + self.bias_weight * minmax_normalize(F.relu(b_map)))
        return fused, contributions

    def _layer_map(self, name: str, ctx: _LayerContext) -> torch.Tensor:
        """``M_l = norm(norm(M_act) + lambda_b * norm(M_bias))`` at native resolution."""
        m = ctx.maps[name]
        bias = ctx.bias.get(name)
        if bias is not None:
            if self.bias_mode == "signed":
                bias = F.relu(bias)
            m = minmax_normalize(m) + self.bias_weight * minmax_normalize(bias)
        return minmax_normalize(m)

    def _layer_weights(self, names: list[str], relevance: dict[str, torch.Tensor], n: int,
                       device: torch.device) -> dict[str, torch.Tensor]:
        """``omega_l`` per sample, summing to 1 over layers (uniform where every ``s_l`` is 0)."""
        if self.layer_weighting == "uniform":
            w = torch.full((n,), 1.0 / len(names), device=device)
            return {k: w.clone() for k in names}
        s = torch.stack([relevance[k].float() for k in names], 0).clamp_min(0)  # (L, N)
        if self.layer_weighting == "softmax":
            logw = torch.log(s) / self.tau  # log(0) = -inf: weight 0
            top = logw.max(0, keepdim=True).values
            e = torch.where(torch.isfinite(top), torch.exp(logw - top), torch.zeros_like(s))
        else:
            e = s
        total = e.sum(0, keepdim=True)
        # every s_l is 0 (no layer contributes positively, no region keeps any score, or no
        # gradient at all): weigh the layers alike rather than return an empty map
        e = torch.where(total > 0, e, torch.ones_like(e))
        w = torch.nan_to_num(e / e.sum(0, keepdim=True), nan=0.0)
        return {k: w[i] for i, k in enumerate(names)}

    def _fuse_weighted(self, names: list[str], maps: dict[str, torch.Tensor],
                       weights: dict[str, torch.Tensor], ctx: _LayerContext) -> torch.Tensor:
        # Upsampling is linear: sum the weighted maps per native resolution, upsample each once.
        buffers: dict[tuple[int, ...], torch.Tensor] = {}
        for name in names:
            m = maps[name]
            contribution = m * weights[name].view(-1, *(1,) * (m.ndim - 1))
            key = tuple(m.shape[2:])
            if key in buffers:
                buffers[key].add_(contribution)
            else:
                buffers[key] = contribution
        n = next(iter(maps.values())).shape[0]
        device = next(iter(maps.values())).device
        fused = torch.zeros((n, 1, *ctx.input_size), device=device, dtype=torch.float32)
        for buf in buffers.values():
            fused.add_(F.interpolate(buf, size=ctx.input_size, mode=ctx.mode, align_corners=False))
        return minmax_normalize(fused)

    def _fuse_multiplicative(self, names: list[str], maps: dict[str, torch.Tensor],
                             weights: dict[str, torch.Tensor], ctx: _LayerContext) -> torch.Tensor:
        """Poly-CAM-style coarse-to-fine product: the coarsest map gates every finer one.

        Layers are taken from the fewest positions to the most (ties: the deeper first);
        each map enters with exponent ``L * omega_l`` (1 for uniform weights, and a layer of
        weight 0 gates nothing).
        """
        order = sorted(range(len(names)), key=lambda i: (math.prod(maps[names[i]].shape[2:]), -i))
        big_l = float(len(names))
        acc: torch.Tensor | None = None
        for i in order:
            m = maps[names[i]]
            e = (big_l * weights[names[i]]).view(-1, *(1,) * (m.ndim - 1))
            gate = minmax_normalize(m.clamp_min(0).pow(e))
            if acc is None:
                acc = gate
            else:
                up = F.interpolate(acc, size=m.shape[2:], mode=ctx.mode, align_corners=False)
                acc = minmax_normalize(up * gate)
        assert acc is not None
        fused = F.interpolate(acc, size=ctx.input_size, mode=ctx.mode, align_corners=False)
        total = torch.stack([weights[k] for k in names], 0).sum(0)
        fused = fused * (total > 0).view(-1, *(1,) * (fused.ndim - 1))  # no gradient: zero map
        return minmax_normalize(fused)

    @torch.no_grad()
    def _counterfactual_relevance(self, x: torch.Tensor, maps: dict[str, torch.Tensor],
                                  target_fn: object, scores: torch.Tensor,
                                  ctx: _LayerContext) -> tuple[dict[str, torch.Tensor], int]:
        """How much keeping only each layer's top region preserves the score.

        One batched gradient-free forward over ``(L + 1) * N`` inputs: for every layer, the
        input with the voxels outside the layer's top ``counterfactual_keep`` fraction set to
        the input's mean (per sample and channel), plus the all-mean baseline.
        ``s_l = S(kept_l) - S(baseline)``.
        """
        n = x.shape[0]
        names = list(maps)
        base = x.flatten(2).mean(-1).view(n, x.shape[1], *(1,) * (x.ndim - 2))
        batch = []
        k = max(1, round(self.counterfactual_keep * math.prod(ctx.input_size)))
        for name in names:
            up = F.interpolate(maps[name], size=ctx.input_size, mode=ctx.mode, align_corners=False)
            flat = up.flatten(1)
            thr = flat.topk(k, dim=1).values[:, -1].view(n, *(1,) * (up.ndim - 1))
            keep = ((up >= thr) & (up > 0)).to(x.dtype)
            batch.append(base + keep * (x - base))
        batch.append(base.expand_as(x))
        stacked = torch.cat(batch, 0)
        del batch
        if stacked.device.type == "cpu":
            # the backward pass's activations are freed but still resident (glibc keeps
            # them): hand them back, or this batch's forward is allocated beside them and
            # the two peaks stack (DenseNet121 at 96x96x64: 650 MB -> 340 MB above the model)
            release_freed_memory()
        out = self._forward(stacked)
        per = []
        for j in range(len(names) + 1):
            s, _ = self._scores(out[j * n:(j + 1) * n], target_fn, n)
            per.append(s.float())
        baseline = per[-1]
        return {name: per[i] - baseline for i, name in enumerate(names)}, stacked.shape[0]

    def _strategy(self, record: LayerRecord | None, module: nn.Module) -> str:
        """How a layer's activation is kept until its gradient arrives.

        * ``hold``: keep a reference to the output (free: autograd keeps most of them anyway);
        * ``recompute``: the model changes the output in place later (e.g.
          ``ReLU(inplace=True)`` after a norm layer), so keep the module's input (which it
          saves for its own backward anyway) and recompute the output in the gradient hook;
        * ``clone``: the output is changed in place and cannot be recomputed (the input is
          changed too, or the module is in training mode): give the network a copy.
        """
        if record is None or not record.mutated_inplace:
            return "hold"
        if record.input_mutated or module.training or record.is_container:
            return "clone"
        return "recompute"

    def _forward_hook(self, layer: _HookedLayer, ctx: _LayerContext):
        from torch.autograd.graph import get_gradient_edge

        def hook(_m, inp, out):
            layer.calls += 1
            if not isinstance(out, torch.Tensor):
                layer.error = (f"target layer '{layer.name}' returns {type(out).__name__}, not a "
                               "tensor; choose a layer whose output is a feature map.")
                return None
            if not out.requires_grad:
                layer.error = (f"target layer '{layer.name}' output does not depend on the input "
                               "through autograd (it is detached inside the model); choose another layer.")
                return None
            if layer.calls > 1:
                layer.error = (f"target layer '{layer.name}' runs more than once in a forward pass "
                               "(a shared module, e.g. one activation used by several layers); "
                               "hook the block that contains it instead.")
                return None
            layer.native_shape = tuple(out.shape[2:])
            # Registered now, before any later in-place change, so the hook receives the
            # gradient with respect to this layer's own output.
            out.register_hook(self._grad_hook(layer, ctx))
            layer.anchor = get_gradient_edge(out)
            if layer.strategy == "recompute" and inp and isinstance(inp[0], torch.Tensor):
                layer.inputs = tuple(inp)
                layer.input_version = inp[0]._version
                return None
            layer.value = out
            return out.clone() if layer.strategy != "hold" else None

        return hook

    def _source_hook(self, source: _BiasSource, ctx: _LayerContext):
        from torch.autograd.graph import get_gradient_edge

        def hook(_m, _inp, out):
            source.calls += 1
            if not isinstance(out, torch.Tensor) or not out.requires_grad or source.calls > 1:
                return None
            out.register_hook(self._bias_hook(source, ctx))
            source.anchor = get_gradient_edge(out)
            return None

        return hook

    def _grad_hook(self, layer: _HookedLayer, ctx: _LayerContext):
        def hook(grad: torch.Tensor) -> None:
            if ctx.stashing:
                ctx.stash.setdefault(layer.name, []).append(grad.detach().float())
                return
            with torch.no_grad():
                a = layer.activation(self.amp_dtype).float()
                g = grad.detach().float()
                ctx.current = layer.name
                ctx.maps[layer.name] = self.activation_map(a, g, ctx)
                ctx.stash.pop(layer.name, None)
                ctx.relevance[layer.name] = self._relevance(a, g)
                del a, g

        return hook

    def _bias_hook(self, source: _BiasSource, ctx: _LayerContext):
        def hook(grad: torch.Tensor) -> None:
            if ctx.stashing:
                return
            with torch.no_grad():
                m = self._bias_map(grad.detach().float(), source.bias.to(grad.device))
                for name in source.layers:
                    if name in ctx.bias:
                        ctx.bias[name] = ctx.bias[name] + m
                    else:
                        ctx.bias[name] = m

        return hook

    def _relevance(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """``s_l`` of one layer per sample (see :data:`LAYER_WEIGHTINGS`). The ``uniform``
        and ``counterfactual`` weightings do not use it: they report the net contribution
        ``max(sum(G*A), 0)``, which needs no full-size temporary."""
        n = a.shape[0]
        if self.layer_weighting in ("score", "softmax"):
            ga = g * a
            return torch.relu_(ga).flatten(1).sum(1)
        if self.layer_weighting == "per_position":
            return torch.relu_((g * a).sum(1)).flatten(1).mean(1)
        net = torch.bmm(g.reshape(n, 1, -1), a.reshape(n, -1, 1)).view(n)
        return net.clamp_min_(0)

    def _bias_map(self, g: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``sum_k G_k b_k`` (signed, ReLU applied once all sources are summed) or
        ``sum_k |G_k b_k|`` (abs), ``(N, 1, *s)``."""
        n, k, *spatial = g.shape
        if self.bias_mode == "signed":
            summed = torch.matmul(bias.view(1, 1, k), g.flatten(2))  # (N, 1, P)
            return summed.view(n, 1, *spatial)
        extra = (1,) * len(spatial)
        return (g * bias.view(1, k, *extra)).abs_().sum(1, keepdim=True)
