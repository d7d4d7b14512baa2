"""The one CAM engine every method shares (ICAM_SPEC section 5).

A call is one forward pass and one backward pass, whatever the number of hooked layers:

1. forward hooks (removed in ``finally``) keep a reference to each hooked layer's output;
2. tensor hooks on those outputs receive ``G = dS/dA`` during a single
   ``torch.autograd.grad(score, outputs)`` that computes no parameter gradients and stops
   at the shallowest hooked layer;
3. inside each tensor hook the layer is reduced at once to its native-resolution map and
   its relevance score, its weighted map is added to one accumulator per native
   resolution, and its activation is dropped. Upsampling is linear, so each resolution is
   upsampled once, at the end, into the input-sized fused map (never L full-size copies).

Subclasses differ only in :meth:`BaseCAM.activation_map` (channel weights or per-position
weighting); the bias term and the adaptive layer weights are options of the base.
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
    effective_bias,
    first_conv,
    probe_layers,
    select_layers,
    validate_layer_names,
)
from icam_med.cam.targets import ClassTarget, resolve_targets

__all__ = ["BIAS_MODES", "LAYER_WEIGHTINGS", "BaseCAM", "CAMResult", "minmax_normalize"]

log = logging.getLogger(__name__)

LAYER_WEIGHTINGS = ("score", "softmax", "uniform")
BIAS_MODES = ("signed", "abs")
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
            over layers, all zero when the score has no gradient at all).
        layer_scores: layer name -> ``(N,)`` relevance ``s_l = sum(relu(G * A))``.
        scores: ``(N,)`` target scores.
        logits: the model output (detached).
        target_classes: ``(N,)`` class indices explained, or ``None`` for callable targets.
        method: method name.
        options: every option of the method, JSON-serialisable (for audit records).
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
    # weighted sums of layer maps, one per native resolution (upsampling is linear, so
    # each resolution is upsampled once at the end instead of once per layer)
    buffers: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)
    log_max: torch.Tensor | None = None
    denom: torch.Tensor | None = None
    log_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    relevance: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _HookedLayer:
    """One hooked layer during a call: how its activation is kept, and its gradient anchor."""

    name: str
    module: nn.Module
    strategy: str  # "hold" | "recompute" | "clone"
    bias: torch.Tensor | None
    value: torch.Tensor | None = None
    inputs: tuple[Any, ...] | None = None
    input_version: int = 0
    anchor: torch.Tensor | None = None
    output_node: Any = None  # autograd node that produced the (pre-in-place) output
    native_shape: tuple[int, ...] = ()
    error: str | None = None

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


def _covering_anchors(scores: torch.Tensor, layers: list[_HookedLayer]) -> list[torch.Tensor]:
    """The fewest gradient anchors whose backward pass runs through every hooked layer.

    ``autograd.grad`` returns one gradient per input and holds them all until it returns;
    asking only for anchors that are not already upstream of another one (usually just the
    shallowest layer) keeps that memory to one layer's size. A layer is covered when the
    backward to a chosen anchor has to run the node that produced its output, which fires
    its tensor hook. One memoised walk of the graph finds, for every node, the anchors
    reachable through it.
    """
    from torch.autograd.graph import get_gradient_edge

    edges = {}
    for i, layer in enumerate(layers):
        edge = get_gradient_edge(layer.anchor)
        edges.setdefault((edge.node, edge.output_nr), 0)
        edges[(edge.node, edge.output_nr)] |= 1 << i
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
            bits |= edges.get((child, nr), 0) | reach.get(child, 0)
        reach[node] = bits
    chosen = 0
    anchors: list[torch.Tensor] = []
    for i, layer in enumerate(layers):
        covered = reach.get(layer.output_node, 0) & chosen
        if not covered and not (chosen >> i) & 1:
            chosen |= 1 << i
            anchors.append(layer.anchor)
    return anchors


class BaseCAM:
    """Shared engine. Subclasses override :meth:`activation_map` only.

    Args:
        model: a CNN with 2D or 3D convolutions. It is left exactly as it was after every
            call (training flags, hooks, ``requires_grad``, ``.grad``).
        target_layers: ``"stages"`` (default: the last layer before each change of spatial
            size, plus the last spatial layer), ``"all"`` (every convolution, or the
            normalisation layer right after it), ``"last"`` (the last spatial layer), a
            dotted module name, or a list of them.
        layer_weighting: how layers are weighted in the fusion: ``"score"``
            (``s_l / sum(s)``), ``"softmax"`` (``softmax(log(s_l) / tau)``) or ``"uniform"``.
            Default per method.
        tau: temperature of ``"softmax"`` layer weighting.
        bias_weight: ``lambda_b``, weight of the bias term in each layer's map
            (0 disables it). Default per method.
        bias_mode: ``"signed"`` (``relu(sum_k G_k b_k)``, class-discriminative) or ``"abs"``
            (``sum_k |G_k b_k|``, FullGrad style).
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

    def __init__(
        self,
        model: nn.Module,
        target_layers: str | Sequence[str] = "stages",
        *,
        layer_weighting: str | None = None,
        tau: float = 1.0,
        bias_weight: float | None = None,
        bias_mode: str = "signed",
        device: str | torch.device | None = None,
        amp_dtype: torch.dtype | str | None = None,
        eval_mode: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
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
        bw = self.default_bias_weight if bias_weight is None else float(bias_weight)
        if not (math.isfinite(bw) and bw >= 0):
            raise ValueError(f"bias_weight={bias_weight!r} must be a non-negative number.")
        if bias_mode not in BIAS_MODES:
            raise ValueError(f"bias_mode='{bias_mode}' is not supported; use one of {list(BIAS_MODES)}.")
        self.layer_weighting = weighting
        self.tau = float(tau)
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
        key = tuple(int(s) for s in spatial_shape)
        if key not in self._layer_cache:
            example = torch.zeros((1, self.in_channels, *key), device=self.device,
                                  dtype=self._param_dtype())
            self._probe(example)
        return list(self._layer_cache[key])

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
        x = self._check_input(x)
        n = x.shape[0]
        target_fn = resolve_targets(targets, n)
        layers, out_shape = self._resolve(x)
        self._check_targets(target_fn, out_shape)
        modules = dict(self.model.named_modules())
        training = {m: m.training for m in self.model.modules()}
        records = {r.name: r for r in self._probe_cache[tuple(x.shape[2:])][0]}
        ctx = _LayerContext(input_size=tuple(x.shape[2:]),
                            mode="bilinear" if self.spatial_dims == 2 else "trilinear")
        hooked = {name: _HookedLayer(name, modules[name], self._strategy(records.get(name), modules[name]),
                                     effective_bias(modules[name]) if self.bias_weight > 0 else None)
                  for name in layers}
        handles = []
        try:
            if self.eval_mode:
                self.model.eval()
            for layer in hooked.values():
                handles.append(layer.module.register_forward_hook(self._forward_hook(layer, ctx)))
            x_in = x.detach().requires_grad_(True)
            with torch.enable_grad():
                if self.amp_dtype is not None:
                    with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                        output = self.model(x_in)
                else:
                    output = self.model(x_in)
                for h in handles:
                    h.remove()
                handles.clear()
                return self._backward(x, output, target_fn, hooked, ctx)
        finally:
            for h in handles:
                h.remove()
            for m, flag in training.items():
                m.training = flag
            for layer in hooked.values():
                layer.release()

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

    def _backward(self, x: torch.Tensor, output: torch.Tensor, target_fn: object,
                  hooked: dict[str, _HookedLayer], ctx: _LayerContext) -> CAMResult:
        n = x.shape[0]
        classes: torch.Tensor | None
        if target_fn is None:
            classes = output.detach().argmax(1)
            scores = output.gather(1, classes.view(-1, 1)).squeeze(1)
        elif isinstance(target_fn, ClassTarget):
            classes = target_fn.indices(n, output.device)
            scores = target_fn(output)
        else:
            classes = None
            scores = target_fn(output)  # type: ignore[operator]
            if not isinstance(scores, torch.Tensor) or scores.shape != (n,):
                got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
                raise ValueError(
                    f"target callable returned {got}; it must return one score per sample, shape ({n},)."
                )
        for layer in hooked.values():
            if layer.error:
                raise ValueError(layer.error)
            if layer.anchor is None:
                raise ValueError(f"target layer '{layer.name}' did not run in the forward pass.")

        self._prepare_context(ctx, scores.detach().float(), output.detach().float(), classes)
        ctx.log_max = torch.full((n,), -math.inf, device=x.device)
        ctx.denom = torch.zeros((n,), device=x.device)

        # One backward pass, to the hooked layers only: no parameter gradients, and the
        # pass stops at the shallowest hooked layer. Each layer's tensor hook reduces it as
        # soon as its gradient arrives; the returned gradients themselves are not used.
        anchors = _covering_anchors(scores, list(hooked.values()))
        grads = torch.autograd.grad(scores.sum(), anchors, allow_unused=True)
        del grads, anchors

        for layer in hooked.values():
            if layer.name not in ctx.maps:  # no gradient reached this layer
                log.warning("no gradient reached target layer '%s'; its map is zero", layer.name)
                ctx.maps[layer.name] = torch.zeros((n, 1, *layer.native_shape), device=x.device)
                ctx.relevance[layer.name] = torch.zeros((n,), device=x.device)
                ctx.log_weights[layer.name] = torch.full((n,), -math.inf, device=x.device)
            layer.release()

        fused = torch.zeros((n, 1, *ctx.input_size), device=x.device, dtype=torch.float32)
        for buf in ctx.buffers.values():
            fused.add_(F.interpolate(buf, size=ctx.input_size, mode=ctx.mode, align_corners=False))
        ctx.buffers.clear()
        fused = minmax_normalize(fused)
        total = ctx.denom
        weights = {}
        for name in hooked:
            w = torch.exp(ctx.log_weights[name] - ctx.log_max)
            w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.zeros_like(w))
            weights[name] = torch.nan_to_num(w, nan=0.0)
        layers = list(hooked)
        options = self.options
        return CAMResult(
            fused=fused,
            layer_maps={k: ctx.maps[k] for k in layers},
            layer_weights=weights,
            layer_scores={k: ctx.relevance[k] for k in layers},
            scores=scores.detach().float(),
            logits=output.detach(),
            target_classes=classes,
            method=self.method_name,
            options={**options, "target_layers": layers,
                     "target_layers_spec": options["target_layers"], "device": str(x.device)},
        )

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
        if record.input_mutated or module.training:
            return "clone"
        return "recompute"

    def _forward_hook(self, layer: _HookedLayer, ctx: _LayerContext):
        def hook(_m, inp, out):
            if not isinstance(out, torch.Tensor):
                layer.error = (f"target layer '{layer.name}' returns {type(out).__name__}, not a "
                               "tensor; choose a layer whose output is a feature map.")
                return None
            if not out.requires_grad:
                layer.error = (f"target layer '{layer.name}' output does not depend on the input "
                               "through autograd (it is detached inside the model); choose another layer.")
                return None
            if layer.anchor is not None:
                layer.error = (f"target layer '{layer.name}' runs more than once in a forward pass "
                               "(a shared module); hook a module that runs once.")
                return None
            layer.native_shape = tuple(out.shape[2:])
            layer.output_node = out.grad_fn
            # Registered now, before any later in-place change, so the hook receives the
            # gradient with respect to this layer's own output.
            out.register_hook(self._grad_hook(layer, ctx))
            if layer.strategy == "recompute" and inp and isinstance(inp[0], torch.Tensor) \
                    and inp[0].requires_grad:
                layer.inputs = tuple(inp)
                layer.input_version = inp[0]._version
                layer.anchor = inp[0]  # the backward must pass through this module
                return None
            layer.value = out
            layer.anchor = out
            return out.clone() if layer.strategy != "hold" else None

        return hook

    def _grad_hook(self, layer: _HookedLayer, ctx: _LayerContext):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                a = layer.activation(self.amp_dtype).float()
                g = grad.detach().float()
                m = self.activation_map(a, g, ctx)
                if layer.bias is not None:
                    m = minmax_normalize(m) + self.bias_weight * minmax_normalize(
                        self._bias_map(g, layer.bias.to(g.device)))
                m = minmax_normalize(m)
                rel = torch.relu_(g * a).flatten(1).sum(1)
                del a, g
                self._accumulate(layer.name, m, rel, ctx)

        return hook

    def _bias_map(self, g: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Bias term ``relu(sum_k G_k b_k)`` (signed) or ``sum_k |G_k b_k|`` (abs), ``(N, 1, *s)``."""
        n, k, *spatial = g.shape
        if self.bias_mode == "signed":
            summed = torch.matmul(bias.view(1, 1, k), g.flatten(2))  # (N, 1, P)
            return F.relu(summed.view(n, 1, *spatial))
        extra = (1,) * len(spatial)
        return (g * bias.view(1, k, *extra)).abs_().sum(1, keepdim=True)

    def _accumulate(self, name: str, m: torch.Tensor, rel: torch.Tensor,
                    ctx: _LayerContext) -> None:
        ctx.maps[name] = m
        ctx.relevance[name] = rel
        if self.layer_weighting == "uniform":
            logw = torch.zeros_like(rel)
        else:
            tau = self.tau if self.layer_weighting == "softmax" else 1.0
            logw = torch.log(rel) / tau  # log(0) = -inf: weight 0
        ctx.log_weights[name] = logw
        assert ctx.log_max is not None and ctx.denom is not None
        # streaming log-sum-exp: every buffer is kept scaled by exp(-log_max) per sample
        new_max = torch.maximum(ctx.log_max, logw)
        finite = torch.isfinite(new_max)
        zero = torch.zeros_like(new_max)
        scale_old = torch.where(finite, torch.exp(ctx.log_max - new_max), zero)
        scale_new = torch.where(finite, torch.exp(logw - new_max), zero)
        extra = (1,) * (m.ndim - 1)
        for buf in ctx.buffers.values():
            buf.mul_(scale_old.view(-1, *extra))
        key = tuple(m.shape[2:])
        contribution = m * scale_new.view(-1, *extra)
        if key in ctx.buffers:
            ctx.buffers[key].add_(contribution)
        else:
            ctx.buffers[key] = contribution
        ctx.denom = ctx.denom * scale_old + scale_new
        ctx.log_max = new_max
