"""Layer-wise relevance propagation (LRP) on the engine: Captum's ``LRP`` with a composite.

Library: Captum (``captum.attr.LRP`` and its propagation rules). zennit, the other
well-kept LRP library, needs torchvision, which cannot live beside this project's CPU
torch; Captum needs torch alone. Captum is imported only when an :class:`LRP` is built.

Captum propagates relevance through leaf modules that carry a rule, as a modified gradient
(``R_in = a * W^T (R_out / z)``), and lets every other operation pass the gradient. That
conserves relevance only where the network is a chain of ruled layers, so the composite is
built on a *deep copy* of the model (the user's model is never touched):

* **BatchNorm after a convolution** (the conv's only reader) is folded into it
  (``W' = W * s``, ``b' = (b - mean) * s + beta``, ``s = gamma / sqrt(var + eps)``); any other
  BatchNorm (a pre-activation network's ``norm -> relu -> conv``) takes Captum's epsilon rule
  with its shift in ``z`` (passing relevance unchanged would put the shift's share on inputs
  near zero, and the next ratio diverges), so that shift absorbs its share (tallied).
* **Convolutions and linear layers** take the chosen rule: ``epsilon``
  (``R_i = sum_j a_i w_ij / (z_j + eps * sign(z_j)) R_j``) or ``alpha-beta``
  (``R_i = sum_j (alpha z_ij^+ / z_j^+ - beta z_ij^- / z_j^-) R_j`` with the contributions
  ``z_ij = a_i w_ij`` split by sign, so signed inputs such as a normalised scan are handled).
  The epsilon rule keeps each bias in ``z`` (Captum's rule): the biases absorb their share,
  which is tallied, so input relevance + bias relevance = score. Leaving the bias out of
  ``z`` diverges for conv+BN networks (``z`` changes sign where the folded bias dominates).
  The alpha-beta rule leaves conv/linear biases out (``zero_bias=True``, default; its ratios
  are of same-signed sums, so they stay in [0, 1]): where every BatchNorm folds (ResNet) the
  input relevance alone sums to the score; unfolded BatchNorm shifts absorb theirs (tallied).
* **Pooling** takes Captum's epsilon rule (proportional to the pooled values), **ReLU** and
  dropout pass relevance (Captum's rule for them), identity/flatten pass it unchanged.
* **Residual additions** of MONAI's ``ResNetBlock`` / ``ResNetBottleneck`` become Captum's
  ``Addition_Module`` with the epsilon rule: each branch receives relevance in proportion to
  what it adds (a plain ``+`` would give both branches the whole relevance).
* **Concatenations** (DenseNet) route relevance as they route gradients: conserving. Every
  ruled layer reads a private clone of its input, so a tensor read by a ruled layer *and* a
  concatenation receives relevance from both, never a gradient mixed with a relevance.

Anything else between layers that would not conserve relevance (an addition or product of
two feature maps in forward code, a mean, an interpolation) is refused before the explained
pass, naming the operation; so are layer types without a rule (GroupNorm, PReLU...).

The map is ``relu`` of the input relevance summed over channels, min-max normalised like
every method's; the signed relevance is :meth:`LRP.relevance`. With ``target_layers`` the
relevance reaching each of those layers is returned as its layer map (nothing is fused).
"""

from __future__ import annotations

import copy
import logging
import math
import re
import types
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from icam_med.cam.base import BaseCAM, CAMResult, minmax_normalize
from icam_med.cam.layers import _BATCHNORM, _consumers, own_bias
from icam_med.cam.targets import ClassTarget, resolve_targets

__all__ = ["LRP", "LRP_RULES"]

log = logging.getLogger(__name__)

#: The rule of the convolution and linear layers (option ``rule``), name -> meaning.
LRP_RULES: dict[str, str] = {
    "epsilon": "R_i = sum_j a_i w_ij / (z_j + epsilon * sign(z_j)) * R_j (Captum's EpsilonRule)",
    "alpha-beta": "R_i = sum_j (alpha * z_ij+ / z_j+ - beta * z_ij- / z_j-) * R_j with "
                  "z_ij = a_i w_ij split by sign; alpha - beta = 1 (alpha=1, beta=0: Captum's "
                  "Alpha1_Beta0_Rule)",
}
_STABILISER = 1e-9  # Captum's default: pooling, additions, alpha-beta denominators
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
         nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_PASS = (nn.Identity, nn.Flatten, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, *_BATCHNORM)
_CAPTUM_PASS = (nn.ReLU, nn.Dropout)  # Captum's SUPPORTED_NON_LINEAR_LAYERS (exact types)
# Autograd nodes between ruled layers that route relevance unchanged (reshapes, copies,
# concatenation, the target's selection).
_ROUTING_NODE = re.compile(
    r"^(View|Reshape\w*|Unsafe\w*View|Cat|Clone|Alias|Squeeze\w*|Unsqueeze\w*|Permute|"
    r"Transpose|T|Split\w*|Slice|Select|Gather|Index|Flatten\w*|Contiguous)Backward\d*$"
)


def _rules() -> Any:
    """Captum's LRP and rule classes, plus this composite's rules (imported on first use)."""
    try:
        from captum.attr import LRP as CaptumLRP
        from captum.attr._utils.custom_modules import Addition_Module
        from captum.attr._utils.lrp_rules import EpsilonRule, PropagationRule
    except ImportError as exc:  # pragma: no cover - captum is a dependency
        raise ImportError("LRP needs Captum: pip install captum==0.9.0") from exc

    class TallyEpsilonRule(EpsilonRule):
        """Captum's epsilon rule (the bias stays in ``z``), tallying what the bias absorbs:
        ``sum_j b_j R_j / (z_j + eps sign(z_j))`` per sample."""

        def __init__(self, epsilon: float, tally: dict[str, torch.Tensor]) -> None:
            super().__init__(epsilon=epsilon)
            self.tally = tally
            self.bias: torch.Tensor | None = None

        def _manipulate_weights(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            self.bias = own_bias(module)  # a BatchNorm's: beta - gamma * mean / sqrt(var + eps)

        def _create_backward_hook_output(self, outputs: torch.Tensor) -> Any:
            divide = super()._create_backward_hook_output(outputs)

            def hook(grad: torch.Tensor) -> torch.Tensor:
                g = divide(grad)
                if self.bias is not None:
                    b = self.bias.view(1, -1, *(1,) * (g.ndim - 2))
                    _add(self.tally, (g.detach() * b.to(g)).flatten(1).sum(1))
                return g

            return hook

    class PassRule(PropagationRule):
        """Relevance passes unchanged (identity, flatten, dropout3d...)."""

        def _manipulate_weights(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            return None

        def forward_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> Any:
            self._handle_input_hooks = []
            inp = inputs[0] if isinstance(inputs, tuple) else inputs
            if outputs is inp or not outputs.requires_grad:
                return None  # the same tensor (identity): autograd passes it already
            held: dict[str, torch.Tensor] = {}

            def keep(grad: torch.Tensor) -> None:
                held["r"] = grad

            def give(grad: torch.Tensor) -> torch.Tensor:
                return held.pop("r").reshape(grad.shape)

            self._handle_output_hook = outputs.register_hook(keep)
            self._handle_input_hooks.append(inp.register_hook(give))
            return outputs.clone()

    class AlphaBetaRule(PropagationRule):
        """``alpha * z+ / z+ - beta * z- / z-`` on the signed contributions ``a_i w_ij``."""

        def __init__(self, alpha: float, beta: float, zero_bias: bool,
                     tally: dict[str, torch.Tensor]) -> None:
            self.alpha, self.beta, self.zero_bias, self.tally = alpha, beta, zero_bias, tally

        def _manipulate_weights(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
            return None

        def forward_hook(self, module: nn.Module, inputs: Any, outputs: Any) -> Any:
            inp = inputs[0] if isinstance(inputs, tuple) else inputs
            a = inp.detach()  # the original activation (Captum's pre-hook restored it)
            held: dict[str, torch.Tensor] = {}

            def keep(grad: torch.Tensor) -> None:
                held["r"] = grad.detach()

            def give(grad: torch.Tensor) -> torch.Tensor:
                return self.relevance(module, a, held.pop("r")).to(grad.dtype)

            self._handle_output_hook = outputs.register_hook(keep)
            self._handle_input_hooks = [inp.register_hook(give)]
            return outputs.clone()

        def relevance(self, module: nn.Module, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            w = module.weight.detach()
            parts = [(a.clamp(min=0), w.clamp(min=0), w.clamp(max=0))]  # (inputs, w for z+, z-)
            if bool((a < 0).any()):
                parts.append((a.clamp(max=0), w.clamp(max=0), w.clamp(min=0)))
            leaves = [p[0].requires_grad_(True) for p in parts]
            with torch.enable_grad():
                z_pos = sum(_apply(module, x, wp) for x, (_, wp, _) in zip(leaves, parts, strict=True))
                z_neg = sum(_apply(module, x, wn) for x, (_, _, wn) in zip(leaves, parts, strict=True))
                bias = getattr(module, "bias", None)
                b_pos = b_neg = None
                if bias is not None and not self.zero_bias:
                    shape = (1, -1, *(1,) * (z_pos.ndim - 2))
                    b_pos = bias.detach().clamp(min=0).view(shape)
                    b_neg = bias.detach().clamp(max=0).view(shape)
                    z_pos = z_pos + b_pos
                    z_neg = z_neg + b_neg
                s_pos = r / (z_pos.detach() + _STABILISER)
                s_neg = r / (z_neg.detach() - _STABILISER)
                if b_pos is not None and b_neg is not None:
                    _add(self.tally, (self.alpha * s_pos * b_pos
                                      - self.beta * s_neg * b_neg).flatten(1).sum(1))
                g_pos = torch.autograd.grad(z_pos, leaves, s_pos, retain_graph=True)
                g_neg = torch.autograd.grad(z_neg, leaves, s_neg)
            out = torch.zeros_like(a)
            for x, gp, gn in zip(leaves, g_pos, g_neg, strict=True):
                out += x.detach() * (self.alpha * gp - self.beta * gn)
            return out

    return types.SimpleNamespace(LRP=CaptumLRP, Addition_Module=Addition_Module,
                                 EpsilonRule=EpsilonRule, TallyEpsilonRule=TallyEpsilonRule,
                                 PassRule=PassRule, AlphaBetaRule=AlphaBetaRule)


def _add(tally: dict[str, torch.Tensor], value: torch.Tensor) -> None:
    tally["bias"] = tally["bias"] + value.float() if "bias" in tally else value.float()


def _apply(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The module's linear map with ``weight`` and no bias."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight)
    return module._conv_forward(x, weight, None)  # type: ignore[operator]


def _resnet_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI ``ResNetBlock.forward`` with the residual sum as a module (same arithmetic)."""
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(self.lrp_add(out, residual))


def _resnet_bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MONAI ``ResNetBottleneck.forward`` with the residual sum as a module."""
    residual = x
    out = self.act(self.bn1(self.conv1(x)))
    out = self.act(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    if self.downsample is not None:
        residual = self.downsample(x)
    return self.act(self.lrp_add(out, residual))


def _residual_forwards() -> dict[type, Any]:
    from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck

    return {ResNetBlock: _resnet_block_forward, ResNetBottleneck: _resnet_bottleneck_forward}


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _clone_inputs(_module: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A ruled layer reads a private copy, so its relevance hook sees its own gradient only."""
    return tuple(i.clone() if isinstance(i, torch.Tensor) else i for i in inputs)


class _TargetHead(nn.Module):
    """The copy, returning the explained score per sample (Captum's advice: the forward
    returns the attribution target). The first pass (original weights) fixes the classes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.classes: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.logits is None:
            self.logits = out.detach()
            if self.classes is None:
                self.classes = self.logits.argmax(1)
        return out.gather(1, self.classes.view(-1, 1).to(out.device)).squeeze(1)


@dataclass
class _Composite:
    """The rule-ready copy of the model for one input spatial shape."""

    head: _TargetHead
    rules: dict[str, str]  # leaf module name -> "rule" | "pool" | "add" | "pass" | "captum"
    folded: list[str] = field(default_factory=list)  # BatchNorms folded into their conv
    out_shape: tuple[int, ...] = ()


@dataclass
class LRPRelevance:
    """What :meth:`LRP.relevance` returns (tensors on the model's device).

    Attributes:
        input: ``(N, C, *spatial)`` signed relevance of every input value; ``input.sum()``
            per sample equals ``scores`` up to what the stabiliser (and kept biases) absorb.
        layers: layer name -> ``(N, 1, *s_l)`` signed relevance reaching that layer's
            output, summed over channels (``target_layers`` only).
        scores: ``(N,)`` explained scores.
        logits: the model output.
        classes: ``(N,)`` explained classes.
        bias: ``(N,)`` relevance the biases absorbed (epsilon rule; alpha-beta with
            ``zero_bias=False``), 0 otherwise; ``input`` summed plus ``bias`` equals
            ``scores`` up to what the stabiliser absorbs.
    """

    input: torch.Tensor
    layers: dict[str, torch.Tensor]
    scores: torch.Tensor
    logits: torch.Tensor
    classes: torch.Tensor
    bias: torch.Tensor


class LRP:
    """Layer-wise relevance propagation with Captum's ``LRP`` and a conv+BN composite.

    Args:
        model: a 2D or 3D CNN classifier (MONAI DenseNet, ResNet, a ``Sequential`` of
            convolutions, BatchNorm, ReLU, pooling and linear layers). It is never modified:
            the composite is built on a deep copy, rebuilt when the model's weights change.
        target_layers: ``None`` (default: no layer maps), a preset (``"stages"``...) or
            module names: the relevance reaching each of those layers is returned as its
            layer map (not fused; the map is the input relevance).
        rule: the rule of every convolution and linear layer, a name of :data:`LRP_RULES`.
        epsilon: the stabiliser of the ``epsilon`` rule (> 0; Captum's default 1e-9);
            a larger value absorbs relevance of weak activations (less noise, less
            conservation).
        alpha, beta: the ``alpha-beta`` rule's weights, ``alpha - beta = 1``, ``beta >= 0``.
        zero_bias: alpha-beta only: leave conv/linear biases (folded BatchNorms included) out
            of ``z`` (default ``True``), so they absorb nothing; ``False`` splits each bias by sign into
            ``z+``/``z-`` and lets it absorb its share. The epsilon rule always keeps the bias
            (``True`` is refused: it diverges on conv+BN networks).
        device: where it runs; default the model's device (the model is never moved).

    Raises:
        ValueError: an unknown rule, bad alpha/beta/epsilon, or a model with a layer type
            that has no rule here (named), before any work.
    """

    method_name = "lrp"

    def __init__(self, model: nn.Module, target_layers: str | Sequence[str] | None = None, *,
                 rule: str = "epsilon", epsilon: float = 1e-9, alpha: float = 1.0,
                 beta: float = 0.0, zero_bias: bool | None = None,
                 device: str | torch.device | None = None) -> None:
        if rule not in LRP_RULES:
            raise ValueError(f"rule='{rule}' is not an LRP rule; use one of {list(LRP_RULES)}.")
        for name, value in (("epsilon", epsilon), ("alpha", alpha), ("beta", beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ValueError(f"{name}={value!r} must be a finite number.")
        if not epsilon > 0:
            raise ValueError(f"epsilon={epsilon!r} must be > 0 (the stabiliser of z; e.g. 1e-9, "
                             "or 0.25 to absorb the relevance of weak activations).")
        if rule == "alpha-beta":
            if beta < 0 or abs((alpha - beta) - 1.0) > 1e-9:
                raise ValueError(
                    f"alpha={alpha!r}, beta={beta!r}: the alpha-beta rule needs alpha - beta = 1 "
                    "and beta >= 0 so that relevance is conserved (e.g. alpha=1, beta=0 or "
                    "alpha=2, beta=1).")
            if epsilon != 1e-9:
                raise ValueError(f"epsilon={epsilon!r} applies to rule='epsilon' only.")
        elif (alpha, beta) != (1.0, 0.0):
            raise ValueError(f"alpha={alpha!r}, beta={beta!r} apply to rule='alpha-beta' only "
                             "(got rule='epsilon').")
        elif zero_bias:
            raise ValueError(
                "zero_bias=True applies to rule='alpha-beta' only: with the epsilon rule, z "
                "without the bias of a conv+BatchNorm network changes sign where the bias "
                "dominates, and the relevance diverges (its sum was 5e9 times the score on a "
                "MONAI ResNet18). The epsilon rule keeps the bias in z; what it absorbs is "
                "reported in result.bias_contributions['bias'].")
        # the engine's checks: a convolutional 2D/3D eager model, layer names, the device
        self._engine = BaseCAM(model, target_layers if target_layers is not None else "last",
                               device=device)
        _check_leaf_types(model)
        self.model = model
        self.target_layers = target_layers
        self.rule, self.epsilon = rule, float(epsilon)
        self.alpha, self.beta = float(alpha), float(beta)
        self.zero_bias = rule == "alpha-beta" if zero_bias is None else bool(zero_bias)
        self.device = self._engine.device
        self.spatial_dims = self._engine.spatial_dims
        self._composites: dict[tuple[int, ...], _Composite] = {}
        self._weights_key: tuple[Any, ...] | None = None

    @property
    def options(self) -> dict[str, Any]:
        """Every option, JSON-serialisable."""
        spec = self.target_layers
        opts: dict[str, Any] = {
            "method": self.method_name,
            "library": "captum",
            "rule": self.rule,
            "target_layers": spec if spec is None or isinstance(spec, str) else list(spec),
            "composite": "conv/linear: rule; BatchNorm after a conv: folded into it, else "
                         "epsilon with its shift; pooling and residual sums: epsilon "
                         "(proportional); ReLU, dropout, identity, flatten, concatenation: pass",
            "map": "relu(sum over input channels of the input relevance), min-max normalised",
            "upsampling": "none (input resolution)",
        }
        if self.rule == "epsilon":
            opts["epsilon"] = self.epsilon
        else:
            opts["alpha"], opts["beta"] = self.alpha, self.beta
            opts["zero_bias"] = self.zero_bias
        return opts

    # ------------------------------------------------------------------ public API
    def relevance(self, x: torch.Tensor, targets: object = None) -> LRPRelevance:
        """The signed relevance of every input value (and of the target layers).

        Args:
            x: ``(N, C, *spatial)`` batch.
            targets: ``None`` (each sample's predicted class), a class index or one per
                sample. Other targets (segmentation, callables) are refused: LRP here
                starts from one logit of a classifier.

        Raises:
            ValueError: bad input, targets or an unsupported model, before the explained pass.
        """
        x = self._engine._check_input(x)
        n = x.shape[0]
        target_fn = resolve_targets(targets, n)
        if target_fn is not None and not isinstance(target_fn, ClassTarget):
            raise ValueError(
                f"LRP explains one class of a classifier output (N, K): targets must be None, a "
                f"class index or one per sample, not {type(target_fn).__name__}.")
        comp = self._composite(x)
        self._engine._check_targets(target_fn, comp.out_shape)
        names = self._engine.layer_names(tuple(x.shape[2:])) \
            if self.target_layers is not None else []
        lib = _rules()
        head = comp.head
        head.logits = None
        head.classes = None if target_fn is None else target_fn.indices(n, x.device)
        tally: dict[str, torch.Tensor] = {}
        self._attach_rules(comp, lib, tally)
        modules = dict(head.net.named_modules())
        layer_rel: dict[str, torch.Tensor] = {}
        handles = [modules[name].register_forward_hook(self._layer_hook(name, layer_rel))
                   for name in names]
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # Captum's first pass needs no graph; its second enables it (and warns that
                # the input "did not already require gradients" on every call: noise here).
                warnings.filterwarnings("ignore", message="Input Tensor .* did not already "
                                        "require gradients")
                rel = lib.LRP(head).attribute(x.detach().clone().requires_grad_(True))
        finally:
            for h in handles:
                h.remove()
        assert head.logits is not None and head.classes is not None
        scores = head.logits.gather(1, head.classes.view(-1, 1)).squeeze(1).float()
        layers = {k: layer_rel[k] * scores.view(-1, *(1,) * (layer_rel[k].ndim - 1))
                  for k in names if k in layer_rel}
        bias = tally.get("bias", torch.zeros_like(scores)) * scores
        return LRPRelevance(input=rel.detach().float(), layers=layers, scores=scores,
                            logits=head.logits, classes=head.classes, bias=bias)

    def __call__(self, x: torch.Tensor, targets: object = None) -> CAMResult:
        """Explain ``x`` (``(N, C, *spatial)``): the engine's :class:`CAMResult`.

        ``fused`` is the positive input relevance summed over channels, min-max normalised
        at input resolution; ``layer_maps`` the same at each target layer (if any),
        ``layer_scores`` each target layer's total relevance, ``layer_weights`` empty
        (nothing is fused); ``bias_contributions`` holds ``"input"`` (the input relevance's
        sum per sample), ``"bias"`` (what the biases absorbed) and ``"lost"`` (the
        rest: what the stabiliser and one-sided alpha-beta terms took); the three sum to
        ``scores``.
        """
        r = self.relevance(x, targets)
        fused = minmax_normalize(F.relu(r.input.sum(1, keepdim=True)))
        total = r.input.flatten(1).sum(1)
        return CAMResult(
            fused=fused,
            layer_maps={k: minmax_normalize(F.relu(v)) for k, v in r.layers.items()},
            layer_weights={},
            layer_scores={k: v.flatten(1).sum(1) for k, v in r.layers.items()},
            scores=r.scores,
            logits=r.logits,
            target_classes=r.classes,
            method=self.method_name,
            options={**self.options, "target_layers": list(r.layers),
                     "target_layers_spec": self.options["target_layers"],
                     "device": str(r.input.device)},
            cost={"forward_passes": 2, "backward_passes": 1, "extra_forward_samples": 0},
            bias_contributions={"input": total, "bias": r.bias,
                                "lost": r.scores - total - r.bias},
        )

    # ------------------------------------------------------------------ internals
    def _layer_hook(self, name: str, store: dict[str, torch.Tensor]):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                return  # Captum's first (gradient-free) pass

            def grad_hook(grad: torch.Tensor) -> None:
                store[name] = grad.detach().float().sum(1, keepdim=True)

            out.register_hook(grad_hook)

        return hook

    def _current_key(self) -> tuple[Any, ...]:
        """Identity and version of every parameter and buffer: a change rebuilds the copy."""
        return tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))

    def _composite(self, x: torch.Tensor) -> _Composite:
        key = self._current_key()
        if key != self._weights_key:
            self._composites.clear()
            self._weights_key = key
        shape = tuple(x.shape[2:])
        if shape not in self._composites:
            self._composites[shape] = self._build(x[:1].detach())
        return self._composites[shape]

    def _build(self, example: torch.Tensor) -> _Composite:
        """Deep-copy the model and make every layer's relevance rule explicit (module doc)."""
        lib = _rules()
        try:
            net = copy.deepcopy(self.model)
        except Exception as exc:  # any failure: say LRP needs a copy
            raise ValueError(f"LRP works on a copy of the model, but {type(self.model).__name__} "
                             f"cannot be deep-copied: {exc}") from exc
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
            p.grad = None
        for m in net.modules():
            if getattr(m, "inplace", False):
                m.inplace = False  # Captum's hooks need the outputs they saw
        residual = _residual_forwards()
        for m in net.modules():
            forward = residual.get(type(m))
            if forward is not None:
                m.lrp_add = lib.Addition_Module()
                m.forward = types.MethodType(forward, m)
        out_shape, folds = _probe(net, example, lib.Addition_Module)
        if len(out_shape) != 1:
            raise ValueError(
                f"LRP explains a classifier output (N, K); {type(self.model).__name__} returns "
                f"per-sample shape {out_shape}.")
        for bn_name, conv_name in folds:
            _fold(net.get_submodule(conv_name), net.get_submodule(bn_name))
            _set_module(net, bn_name, nn.Identity())
        rules: dict[str, str] = {}
        for name, m in net.named_modules():
            if next(m.children(), None) is not None:
                continue
            if isinstance(m, _LINEAR):
                rules[name] = "rule"
            elif isinstance(m, lib.Addition_Module):
                rules[name] = "add"
            elif isinstance(m, _POOL):
                rules[name] = "pool"
            elif isinstance(m, _BATCHNORM):
                rules[name] = "norm"
            elif type(m) in _CAPTUM_PASS:
                rules[name] = "captum"
                continue  # Captum clones and hooks it itself
            else:
                rules[name] = "pass"
            m.register_forward_pre_hook(_clone_inputs)
        return _Composite(_TargetHead(net), rules, [b for b, _ in folds], out_shape)

    def _attach_rules(self, comp: _Composite, lib: Any, tally: dict[str, torch.Tensor]) -> None:
        """Fresh rule objects on the copy's leaves (Captum deletes them after each call)."""
        modules = dict(comp.head.net.named_modules())
        for name, kind in comp.rules.items():
            m = modules[name]
            if kind == "rule":
                m.rule = (lib.TallyEpsilonRule(self.epsilon, tally) if self.rule == "epsilon"
                          else lib.AlphaBetaRule(self.alpha, self.beta, self.zero_bias, tally))
            elif kind in ("pool", "add", "norm"):
                m.rule = lib.TallyEpsilonRule(_STABILISER, tally)
            elif kind == "pass":
                m.rule = lib.PassRule()


def _fold(conv: nn.Module, bn: nn.Module) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it (in place, on the copy)."""
    with torch.no_grad():
        mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
        var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        s = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        conv.weight.copy_(conv.weight * s.view(-1, *(1,) * (conv.weight.ndim - 1)))
        new_bias = (bias - mean) * s + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.clone(), requires_grad=False)
        else:
            conv.bias.copy_(new_bias)


def _check_leaf_types(model: nn.Module) -> None:
    """Refuse layer types with no rule here, naming the first one."""
    from captum.attr._utils.custom_modules import Addition_Module  # noqa: F401 - captum present

    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue
        if isinstance(m, (*_LINEAR, *_POOL, *_PASS)) or type(m) in _CAPTUM_PASS:
            continue
        raise ValueError(
            f"LRP has no relevance rule for layer '{name}' ({type(m).__name__}); it supports "
            "convolutions, linear layers, BatchNorm, ReLU, pooling, dropout, identity and "
            "flatten (MONAI DenseNet and ResNet). Use a gradient CAM for this model.")


def _probe(net: nn.Module, example: torch.Tensor, addition: type
           ) -> tuple[tuple[int, ...], list[tuple[str, str]]]:
    """One forward pass on the copy: its output shape, the foldable BatchNorms, and a check
    that nothing between layers breaks conservation."""
    leaves = {name: m for name, m in net.named_modules() if next(m.children(), None) is None}
    calls: dict[str, int] = {}
    out_node: dict[str, list[Any]] = {}
    in_nodes: dict[str, list[Any]] = {}

    def make(name: str):
        def hook(_m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            in_nodes.setdefault(name, []).extend(
                i.grad_fn for i in inp if isinstance(i, torch.Tensor))
            if isinstance(out, torch.Tensor) and out.grad_fn is not None \
                    and out.grad_fn not in [i.grad_fn for i in inp if isinstance(i, torch.Tensor)]:
                out_node.setdefault(name, []).append(out.grad_fn)

        return hook

    handles = [m.register_forward_hook(make(name)) for name, m in leaves.items()]
    try:
        with torch.enable_grad():
            out = net(example.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"LRP needs a tensor output; the model returns {type(out).__name__}.")
    for name, count in calls.items():
        if count > 1 and type(leaves[name]) not in _CAPTUM_PASS:
            raise ValueError(f"layer '{name}' runs {count} times in one forward pass; LRP needs "
                             "every layer with weights or pooling to run once.")
    consumers = _consumers(out)
    # nodes made inside a leaf layer: from its output node down to (not into) its inputs
    inside: set[Any] = set()
    for name, nodes in out_node.items():
        stop = set(in_nodes.get(name, []))
        stack = list(nodes)
        while stack:
            cur = stack.pop()
            if cur is None or cur in inside or cur in stop:
                continue
            inside.add(cur)
            stack.extend(c for c, _ in cur.next_functions)
    for node in [out.grad_fn, *consumers]:
        if node is None or node in inside:
            continue
        kind = type(node).__name__
        if kind == "AccumulateGrad" or _ROUTING_NODE.match(kind):
            continue
        raise ValueError(
            f"the model computes '{kind.removesuffix('Backward0')}' on feature maps outside any "
            "layer (in forward code, e.g. a residual sum, a gate or a mean); LRP cannot pass "
            "relevance through it without losing or duplicating some. Supported: MONAI "
            "DenseNet and ResNet (their residual sums are handled), and chains of layers.")
    folds = []
    node_owner = {node: name for name, nodes in out_node.items() for node in nodes}
    for name, m in leaves.items():
        if not isinstance(m, _BATCHNORM) or calls.get(name) != 1 or not in_nodes.get(name):
            continue
        src = in_nodes[name][0]
        conv = node_owner.get(src)
        if conv is None or not isinstance(leaves[conv], (nn.Conv1d, nn.Conv2d, nn.Conv3d)) \
                or calls.get(conv) != 1 or leaves[conv].out_channels != m.num_features:
            continue
        if len(consumers.get(src, [])) == 1:  # the BatchNorm is the conv output's only reader
            folds.append((name, conv))
    return tuple(out.shape[1:]), folds
