"""Choosing the layers a CAM hooks, and the bias each of them carries (ICAM_SPEC 2 and 4).

Layers are named by dotted strings from ``model.named_modules()``, never evaluated.
``"stages"`` and ``"all"`` need to know each layer's output size and execution order,
which a single probe forward pass (no gradients, batch of one) records once per input
spatial shape; every CAM call after that is one forward and one backward pass.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

__all__ = [
    "LAYER_PRESETS",
    "LayerRecord",
    "effective_bias",
    "first_conv",
    "probe_layers",
    "select_layers",
    "validate_layer_names",
]

LAYER_PRESETS = ("stages", "all", "last")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORM = (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORM = (nn.InstanceNorm2d, nn.InstanceNorm3d)
_NORM = (*_BATCHNORM, *_INSTANCENORM, nn.GroupNorm)
# Parameter-free point-wise modules: a stage ends at the layer before them, which carries
# the bias (an activation's own output has no bias term of its own).
_POINTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Dropout, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.Identity,
)


@dataclass(frozen=True)
class LayerRecord:
    """A leaf module seen in the probe pass, in execution order."""

    name: str
    module_type: str
    spatial_shape: tuple[int, ...]
    is_conv: bool
    is_norm: bool
    is_pointwise: bool
    mutated_inplace: bool = False
    input_mutated: bool = False


def first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution in ``named_modules()`` order (gives channels and dimensionality)."""
    for name, mod in model.named_modules():
        if isinstance(mod, _CONV):
            return name, mod
    return None


def validate_layer_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise a clear error for names that are not modules of ``model``, with close matches."""
    known = {n for n, _ in model.named_modules() if n}
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"target_layers entry {name!r} is not a string; use dotted module names.")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=5, cutoff=0.5)
            hint = f" Close matches: {close}." if close else ""
            raise ValueError(
                f"target layer '{name}' is not a module of {type(model).__name__}.{hint} "
                f"Use a name from model.named_modules(), or one of {list(LAYER_PRESETS)}."
            )


@torch.no_grad()
def probe_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[LayerRecord], object]:
    """Run one gradient-free forward pass on a batch of one and record every leaf module
    with a spatial tensor output, in execution order (a module run twice keeps its last run),
    and whether a later in-place operation modified that output.

    Returns:
        the records and the model's output for the example.
    """
    spatial_ndim = example.ndim - 2
    records: dict[str, LayerRecord] = {}
    order: list[str] = []
    outputs: dict[str, tuple[torch.Tensor, int]] = {}
    inputs: dict[str, tuple[torch.Tensor, int]] = {}
    handles = []

    def make_hook(name: str, mod: nn.Module):
        def hook(_m, _inp, out):
            if not isinstance(out, torch.Tensor) or out.ndim != spatial_ndim + 2:
                return
            if all(d == 1 for d in out.shape[2:]):
                return  # no spatial extent (global pooling): not a map
            rec = LayerRecord(
                name=name,
                module_type=type(mod).__name__,
                spatial_shape=tuple(out.shape[2:]),
                is_conv=isinstance(mod, _CONV),
                is_norm=isinstance(mod, _NORM),
                is_pointwise=isinstance(mod, _POINTWISE),
            )
            if name in records:
                order.remove(name)
            records[name] = rec
            order.append(name)
            outputs[name] = (out, out._version)
            if _inp and isinstance(_inp[0], torch.Tensor):
                inputs[name] = (_inp[0], _inp[0]._version)

        return hook

    try:
        for name, mod in model.named_modules():
            if name and not any(True for _ in mod.children()):
                handles.append(mod.register_forward_hook(make_hook(name, mod)))
        output = model(example[:1])
    finally:
        for h in handles:
            h.remove()
    # An output changed later by an in-place op (e.g. ReLU(inplace=True) after a norm layer)
    # must be cloned by the CAM's forward hook, or it would see the activation's values.
    for name, (out, version) in outputs.items():
        if out._version != version:
            inp = inputs.get(name)
            records[name] = replace(records[name], mutated_inplace=True,
                                    input_mutated=inp is None or inp[0]._version != inp[1])
    outputs.clear()
    inputs.clear()
    return [records[n] for n in order], output


def select_layers(records: list[LayerRecord], preset: str) -> list[str]:
    """Pick layer names from probe records.

    * ``stages``: for each run of equal spatial size, its last non-point-wise module
      (the layer before a change of spatial size), plus the last spatial layer.
    * ``all``: every convolution, replaced by the normalisation layer that follows it
      directly (same size), which carries the effective bias.
    * ``last``: the last spatial, non-point-wise layer (single-layer CAM).
    """
    feature = [r for r in records if not r.is_pointwise] or list(records)
    if not feature:
        return []
    if preset == "last":
        return [feature[-1].name]
    if preset == "stages":
        chosen: list[str] = []
        for i, rec in enumerate(feature):
            nxt = feature[i + 1] if i + 1 < len(feature) else None
            if nxt is None or nxt.spatial_shape != rec.spatial_shape:
                chosen.append(rec.name)
        return chosen
    if preset == "all":
        chosen = []
        for i, rec in enumerate(records):
            if not rec.is_conv:
                continue
            nxt = records[i + 1] if i + 1 < len(records) else None
            if nxt is not None and nxt.is_norm and nxt.spatial_shape == rec.spatial_shape:
                chosen.append(nxt.name)
            else:
                chosen.append(rec.name)
        return chosen
    raise ValueError(f"unknown layer preset '{preset}'; expected one of {list(LAYER_PRESETS)}.")


def effective_bias(module: nn.Module) -> torch.Tensor | None:
    """The per-channel bias a module adds (ICAM_SPEC 2), or ``None`` for none.

    * convolution: its ``bias``;
    * BatchNorm (eval): ``beta - gamma * running_mean / sqrt(running_var + eps)``;
    * GroupNorm / InstanceNorm: ``beta``;
    * anything else: ``None`` (the bias term vanishes).
    """
    with torch.no_grad():
        if isinstance(module, _CONV):
            return None if module.bias is None else module.bias.detach().float()
        if isinstance(module, _BATCHNORM):
            n = module.num_features
            dev = module.running_mean.device if module.running_mean is not None else None
            mean = module.running_mean if module.running_mean is not None else torch.zeros(n, device=dev)
            var = module.running_var if module.running_var is not None else torch.ones(n, device=dev)
            gamma = module.weight if module.weight is not None else torch.ones_like(mean)
            beta = module.bias if module.bias is not None else torch.zeros_like(mean)
            return (beta - gamma * mean / torch.sqrt(var + module.eps)).detach().float()
        if isinstance(module, (*_INSTANCENORM, nn.GroupNorm)):
            return None if module.bias is None else module.bias.detach().float()
    return None
