"""Choosing the layers a CAM hooks, and the bias each of them carries (ICAM_SPEC 2 and 4).

Layers are named by dotted strings from ``model.named_modules()`` (containers included:
a block's output is its ``forward`` output), never evaluated. The presets need to know
what each module's output *is*: a post-activation map, a residual sum, a norm output that
an activation reads next, a shortcut branch. One probe forward pass per input spatial
shape (batch of one, with autograd on) records every module's output and the autograd
node that produced it; the graph then says who consumes each tensor. Every CAM call after
that is one forward and one backward pass.

A *block output*, the only thing a preset chooses, is a module output that

* is produced by an activation, a residual add, or a container (a block) whose output is
  not a bare convolution;
* is not read by an activation (a norm or conv output before its activation), nor by a norm
  that an activation reads (a pre-activation network's concatenation), unless it is a
  residual sum;
* is not read only by residual adds (a shortcut ``downsample`` branch, a block's last norm
  before its ``+ residual``, a squeeze-excitation gate);
* comes from a module that runs once per forward pass (a shared activation is reached
  through its parent block), is not padding, identity or dropout, and is not the network's
  output (nor inside the container that produces a segmentation output).

When several modules return the same tensor (``layer4``, its last block, that block's
activation) the outermost one names it.
"""

from __future__ import annotations

import difflib
import logging
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LAYER_PRESETS",
    "LayerRecord",
    "check_supported_model",
    "effective_bias",
    "first_conv",
    "own_bias",
    "probe_layers",
    "record_bias",
    "select_layers",
    "validate_layer_names",
]

log = logging.getLogger(__name__)

LAYER_PRESETS = ("stages", "all", "last")

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORM = (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCENORM = (nn.InstanceNorm2d, nn.InstanceNorm3d)
_NORM = (*_BATCHNORM, *_INSTANCENORM, nn.GroupNorm)
_ACTIVATION = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardtanh, nn.Softplus,
)
# Parameter-free modules that pass a tensor on (or pad it): never a hook point of a preset.
_PASS = (nn.Dropout, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten)
_POINTWISE = (*_ACTIVATION, *_PASS)
_ACT_NODE = re.compile(
    r"^(Relu|Threshold|Prelu\w*|LeakyRelu|Elu|Gelu|Silu|Mish|Hardswish|Hardsigmoid|Sigmoid|Tanh|"
    r"Softplus|Hardtanh|Celu|Selu|Rrelu\w*|SwishImplementation|MemoryEfficientSwish)Backward"
)
_ADD_NODE = re.compile(r"^AddBackward")
_CAT_NODE = re.compile(r"^CatBackward")
_NORM_NODE = re.compile(r"^(Native|Cudnn|Miopen)?\w*(Batch|Group|Instance|Layer)NormBackward")
_CONV_NODE = re.compile(r"^(Convolution|\w*Conv\w*)Backward")
# Self-attention over tokens: its outputs are no convolutional feature maps.
_ATTENTION_TYPES = ("MultiheadAttention", "SABlock", "CrossAttentionBlock", "TransformerBlock",
                    "TransformerEncoderLayer", "TransformerDecoderLayer", "ViT", "VisionTransformer")


@dataclass(frozen=True)
class LayerRecord:
    """A module seen in the probe pass (its last run), in execution order.

    Attributes:
        name: dotted module name.
        module_type: class name.
        spatial_shape: spatial size of its output.
        is_conv / is_norm / is_pointwise: leaf type tests.
        mutated_inplace: a later in-place operation changed its output.
        input_mutated: ...and its input too (it cannot be recomputed).
        is_container: the module has children.
        calls: how many times it ran in one forward pass (shared modules run more than once).
        kind: what produced its output: ``activation``, ``add``, ``cat``, ``norm``, ``conv``
            or ``other``.
        block_output: a preset may choose it (see the module docstring).
        same_as: the name that represents the same tensor (the outermost module returning it).
        bias_sources: modules whose output carries the bias of this hook point (the norm or
            conv feeding its activation, both branches of a residual add).
        fold_from: for a norm, the convolution feeding it (its bias is folded in).
    """

    name: str
    module_type: str
    spatial_shape: tuple[int, ...]
    is_conv: bool
    is_norm: bool
    is_pointwise: bool
    mutated_inplace: bool = False
    input_mutated: bool = False
    is_container: bool = False
    calls: int = 1
    kind: str = "other"
    block_output: bool = False
    same_as: str = ""
    bias_sources: tuple[str, ...] = ()
    fold_from: str | None = None


def first_conv(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first convolution in ``named_modules()`` order (gives channels and dimensionality)."""
    for name, mod in model.named_modules():
        if isinstance(mod, _CONV):
            return name, mod
    return None


def check_supported_model(model: object, presets: bool) -> None:
    """Refuse models a CAM cannot hook, with the reason and the fix.

    Args:
        model: the model given to a CAM.
        presets: the layers are chosen by a preset (explicit names of a hybrid network's
            convolutional part are allowed).
    """
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise ValueError(
            f"the model is a TorchScript {type(model).__name__}: a CAM needs forward hooks, which "
            "TorchScript does not run. Give the eager model (rebuild the architecture in Python "
            "and load its state_dict)."
        )
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    if presets:
        attention = [n or type(model).__name__ for n, m in model.named_modules()
                     if type(m).__name__ in _ATTENTION_TYPES]
        if attention:
            raise ValueError(
                f"{type(model).__name__} contains self-attention ('{attention[0]}'): its tokens "
                "mix every position, so they are no convolutional feature maps and a CAM preset "
                "has no spatial layer to hook. Use an attention-attribution method for "
                "transformers, or name convolutional layers of a hybrid network explicitly in "
                "target_layers."
            )


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


def _node_name(node: Any) -> str:
    return type(node).__name__ if node is not None else ""


def _is_activation_node(node: Any) -> bool:
    name = _node_name(node)
    if _ACT_NODE.match(name):
        return True
    if name.startswith("MulBackward"):  # x * sigmoid(x) written out (Swish)
        return any(_node_name(c).startswith("SigmoidBackward") for c, _ in node.next_functions)
    return False


@dataclass
class _Call:
    name: str
    module: nn.Module
    order: int
    shape: tuple[int, ...]
    node: Any
    ref: Any
    version: int
    input_ref: Any
    input_version: int
    input_node: Any
    entry_node: Any
    group: int


def probe_layers(model: nn.Module, example: torch.Tensor) -> tuple[list[LayerRecord], object]:
    """Run one forward pass on a batch of one and describe every module with a spatial output.

    Every module (containers included) is hooked; its last run is recorded, in the order
    the outputs were produced. See the module docstring for how block outputs are found.

    Returns:
        the records and the model's output for the example (detached).
    """
    spatial_ndim = example.ndim - 2
    calls: dict[str, int] = {}
    last: dict[str, _Call] = {}
    groups: dict[int, list[tuple[Any, int, int]]] = {}  # id(tensor) -> [(ref, version, group)]
    group_count = [0]
    order = [0]
    handles = []
    root = model

    def group_of(out: torch.Tensor) -> int:
        for ref, version, gid in groups.get(id(out), []):
            if ref() is out and version == out._version:
                return gid
        group_count[0] += 1
        groups.setdefault(id(out), []).append((weakref.ref(out), out._version, group_count[0]))
        return group_count[0]

    entry: dict[str, Any] = {}

    def make_pre_hook(name: str):
        def pre_hook(_m, inp):
            # the input's node before the module runs (an in-place module changes it)
            first = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            entry[name] = None if first is None else first.grad_fn

        return pre_hook

    def make_hook(name: str, mod: nn.Module):
        def hook(_m, inp, out):
            calls[name] = calls.get(name, 0) + 1
            if not isinstance(out, torch.Tensor) or out.ndim != spatial_ndim + 2:
                return
            if all(d == 1 for d in out.shape[2:]):
                return  # no spatial extent (global pooling): not a map
            first = inp[0] if inp and isinstance(inp[0], torch.Tensor) else None
            order[0] += 1
            last[name] = _Call(
                name=name, module=mod, order=order[0], shape=tuple(out.shape[2:]),
                node=out.grad_fn, ref=weakref.ref(out), version=out._version,
                input_ref=None if first is None else weakref.ref(first),
                input_version=-1 if first is None else first._version,
                input_node=None if first is None else first.grad_fn,
                entry_node=entry.pop(name, None), group=group_of(out),
            )

        return hook

    x = example[:1].detach().requires_grad_(True)
    try:
        for name, mod in model.named_modules():
            if name:
                handles.append(mod.register_forward_pre_hook(make_pre_hook(name)))
                handles.append(mod.register_forward_hook(make_hook(name, mod)))
        with torch.enable_grad():
            output = root(x)
    finally:
        for h in handles:
            h.remove()
    try:
        records = _describe(model, last, calls, output, spatial_ndim)
    finally:
        groups.clear()
        last.clear()
    out = output.detach() if isinstance(output, torch.Tensor) else output
    return records, out


def _consumers(output: object) -> dict[Any, list[Any]]:
    """Map every autograd node of the probe graph to the nodes that read its output."""
    consumers: dict[Any, list[Any]] = {}
    roots = [output.grad_fn] if isinstance(output, torch.Tensor) and output.grad_fn is not None else []
    seen = set(roots)
    stack = list(roots)
    while stack:
        node = stack.pop()
        for child, _nr in node.next_functions:
            if child is None:
                continue
            consumers.setdefault(child, []).append(node)
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return consumers


def _describe(model: nn.Module, last: dict[str, _Call], calls: dict[str, int], output: object,
              spatial_ndim: int) -> list[LayerRecord]:
    consumers = _consumers(output)
    by_group: dict[int, list[_Call]] = {}
    for c in last.values():
        by_group.setdefault(c.group, []).append(c)
    leaf_of_node: dict[Any, _Call] = {}
    for c in last.values():
        if not any(True for _ in c.module.children()) and c.node is not None:
            leaf_of_node.setdefault(c.node, c)

    def kind_of(node: Any) -> str:
        leaf = leaf_of_node.get(node)
        if leaf is not None:
            if isinstance(leaf.module, _ACTIVATION):
                return "activation"
            if isinstance(leaf.module, _NORM):
                return "norm"
            if isinstance(leaf.module, _CONV):
                return "conv"
        name = _node_name(node)
        if _is_activation_node(node):
            return "activation"
        if _ADD_NODE.match(name):
            return "add"
        if _CAT_NODE.match(name):
            return "cat"
        if _NORM_NODE.match(name):
            return "norm"
        if _CONV_NODE.match(name):
            return "conv"
        return "other"

    def reads(node: Any) -> list[Any]:
        return consumers.get(node, [])

    # The network's own output (a segmentation map) and the output block producing it: the
    # outermost container returning the output that does not hold the first convolution
    # (UNet's top up-layer, SegResNet's conv_final). Compared by identity: a module
    # registered twice (SegResNet's act_mod inside conv_final) has one name only.
    head_modules: set[int] = set()
    if isinstance(output, torch.Tensor) and output.ndim == spatial_ndim + 2 and \
            not all(d == 1 for d in output.shape[2:]):
        stem = first_conv(model)
        stem_module = stem[1] if stem else None
        for members in by_group.values():
            if not any(m.ref() is output and m.version == output._version for m in members):
                continue
            heads = [m for m in members
                     if not any(sub is stem_module for sub in m.module.modules())]
            top = min(heads, key=lambda m: m.name.count("."), default=None)
            if top is not None:
                head_modules |= {id(sub) for sub in top.module.modules()}
            head_modules |= {id(m.module) for m in members}  # the output tensor itself

    def in_head(name: str) -> bool:
        return id(last[name].module) in head_modules

    def bias_sources(node: Any, stops: set[Any], act_leaf: _Call | None) -> tuple[str, ...]:
        if act_leaf is not None:  # start from what the activation module read
            node = act_leaf.entry_node
        elif _is_activation_node(node):
            inputs = [c for c, _ in node.next_functions if c is not None
                      and not _node_name(c).startswith("SigmoidBackward")]
            node = inputs[0] if inputs else None
        found: list[str] = []
        stack = [node]
        while stack:
            cur = stack.pop()
            if cur is None or cur in stops:
                continue  # a block's own input: the shortcut carries earlier layers' biases
            leaf = leaf_of_node.get(cur)
            if leaf is not None and effective_bias(leaf.module) is not None:
                found.append(leaf.name)
            elif _ADD_NODE.match(_node_name(cur)) or _node_name(cur).startswith("MulBackward"):
                stack.extend(c for c, _ in cur.next_functions)
        return tuple(sorted(set(found)))

    def fold_from(call: _Call) -> str | None:
        if not isinstance(call.module, _BATCHNORM) or call.node is None:
            return None
        for child, _ in call.node.next_functions:
            leaf = leaf_of_node.get(child)
            if leaf is not None and isinstance(leaf.module, _CONV):
                return leaf.name
        return None

    records: dict[str, LayerRecord] = {}
    for members in by_group.values():
        members.sort(key=lambda m: m.order)
        node = members[0].node
        kind = kind_of(node)
        readers = reads(node)
        pre_activation = any(_is_activation_node(r) for r in readers) or (
            kind != "add" and any(
                _NORM_NODE.match(_node_name(r)) or (
                    leaf_of_node.get(r) is not None and isinstance(leaf_of_node[r].module, _NORM))
                for r in readers if any(_is_activation_node(rr) for rr in reads(r))))
        branch = bool(readers) and all(_ADD_NODE.match(_node_name(r)) for r in readers)

        def eligible(m: _Call) -> bool:
            return calls.get(m.name, 0) == 1 and not isinstance(m.module, _PASS) \
                and "Pad" not in type(m.module).__name__ and not in_head(m.name)

        names = [m for m in members if eligible(m)]
        has_container = any(any(True for _ in m.module.children()) for m in names)
        has_activation_leaf = any(isinstance(m.module, _ACTIVATION) for m in names)
        # a concatenation adds nothing its (hooked) inputs do not have: UNet skips, DenseNet
        ok_kind = kind in ("activation", "add") or has_activation_leaf or (
            has_container and kind not in ("conv", "cat"))
        block = bool(names) and ok_kind and not pre_activation and not branch
        outer = min(names, key=lambda m: (m.name.count("."), -m.order)).name if names else ""
        stops = {m.input_node for m in members if m.input_node is not None
                 and any(True for _ in m.module.children())}
        act_leaf = next((m for m in members if isinstance(m.module, _ACTIVATION)
                         and not any(True for _ in m.module.children())), None)
        sources = bias_sources(node, stops, act_leaf)
        for m in members:
            inp = m.input_ref() if m.input_ref is not None else None
            ref = m.ref()
            mutated = ref is not None and ref._version != m.version
            records[m.name] = LayerRecord(
                name=m.name,
                module_type=type(m.module).__name__,
                spatial_shape=m.shape,
                is_conv=isinstance(m.module, _CONV),
                is_norm=isinstance(m.module, _NORM),
                is_pointwise=isinstance(m.module, _POINTWISE),
                mutated_inplace=mutated,
                input_mutated=mutated and (inp is None or inp._version != m.input_version),
                is_container=any(True for _ in m.module.children()),
                calls=calls.get(m.name, 1),
                kind=kind,
                block_output=block and m.name == outer,
                same_as=outer or m.name,
                bias_sources=sources,
                fold_from=fold_from(m),
            )
    order = {name: c.order for name, c in last.items()}
    group_order = {gid: min(m.order for m in members) for gid, members in by_group.items()}
    return sorted(records.values(),
                  key=lambda r: (group_order[last[r.name].group], order[r.name]))


def select_layers(records: list[LayerRecord], preset: str) -> list[str]:
    """Pick layer names from probe records.

    * ``stages``: the last block output before each change of spatial size (encoder and
      decoder stages of a segmentation network alike), which includes the last one.
    * ``all``: every block output.
    * ``last``: the last block output (single-layer CAM).

    A network with no block output at all (every activation applied functionally inside one
    flat module) falls back to its leaf convolution and norm outputs, with a warning.
    """
    if preset not in LAYER_PRESETS:
        raise ValueError(f"unknown layer preset '{preset}'; expected one of {list(LAYER_PRESETS)}.")
    blocks = [r for r in records if r.block_output]
    if not blocks:
        blocks = [r for r in records if (r.is_conv or r.is_norm) and r.calls == 1]
        if blocks:
            log.warning("no block output (activation, residual sum or block) found; the preset "
                        "'%s' falls back to convolution and norm outputs", preset)
    if not blocks:
        return []
    if preset == "last":
        return [blocks[-1].name]
    if preset == "all":
        return [r.name for r in blocks]
    chosen: list[str] = []
    for i, rec in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else None
        if nxt is None or nxt.spatial_shape != rec.spatial_shape:
            chosen.append(rec.name)
    return chosen


def _batchnorm_stats(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """``(gamma, beta, mean, var)`` of a BatchNorm, with the defaults of missing ones."""
    n = module.num_features
    dev = module.weight.device if module.weight is not None else None
    mean = module.running_mean if module.running_mean is not None else torch.zeros(n, device=dev)
    var = module.running_var if module.running_var is not None else torch.ones(n, device=dev)
    gamma = module.weight if module.weight is not None else torch.ones_like(mean)
    beta = module.bias if module.bias is not None else torch.zeros_like(mean)
    return gamma, beta, mean, var


def effective_bias(module: nn.Module, conv: nn.Module | None = None) -> torch.Tensor | None:
    """The per-channel bias a module adds (ICAM_SPEC 2), or ``None`` for none.

    * convolution: its ``bias``;
    * BatchNorm (eval), folded with the convolution ``conv`` that feeds it:
      ``beta + gamma * (b_conv - running_mean) / sqrt(running_var + eps)``;
    * GroupNorm / InstanceNorm with affine parameters: ``beta`` (a conv bias before it cancels);
    * anything else: ``None`` (the bias term vanishes).
    """
    with torch.no_grad():
        if isinstance(module, _CONV):
            return None if module.bias is None else module.bias.detach().float()
        if isinstance(module, _BATCHNORM):
            gamma, beta, mean, var = _batchnorm_stats(module)
            b_conv = torch.zeros_like(mean)
            if conv is not None and getattr(conv, "bias", None) is not None \
                    and conv.bias.shape == mean.shape:
                b_conv = conv.bias
            return (beta + gamma * (b_conv - mean) / torch.sqrt(var + module.eps)).detach().float()
        if isinstance(module, (*_INSTANCENORM, nn.GroupNorm)):
            return None if getattr(module, "bias", None) is None else module.bias.detach().float()
    return None


def own_bias(module: nn.Module) -> torch.Tensor | None:
    """The bias a module adds by itself, not folded (FullGrad's per-layer bias), or ``None``.

    Convolutions and linear layers: their ``bias``; BatchNorm (eval):
    ``beta - gamma * running_mean / sqrt(running_var + eps)``; GroupNorm / InstanceNorm with
    affine parameters: ``beta``.
    """
    if isinstance(module, nn.Linear):
        return None if module.bias is None else module.bias.detach().float()
    return effective_bias(module)  # no conv to fold: a BatchNorm's own shift


def record_bias(record: LayerRecord, modules: dict[str, nn.Module]) -> torch.Tensor | None:
    """The folded bias of a probed bias source (a BatchNorm folds the conv feeding it)."""
    module = modules[record.name]
    conv = modules.get(record.fold_from) if record.fold_from else None
    return effective_bias(module, conv)
