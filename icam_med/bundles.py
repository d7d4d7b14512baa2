"""MONAI bundles as models: ``model: {bundle: PATH, bundle_config: inference.json}``.

A bundle folder (the MONAI Model Zoo format) holds ``configs/metadata.json``, an inference
config (``configs/inference.json`` or ``.yaml``) and ``models/model.pt`` (or
``model.safetensors``). :func:`read_bundle` reads it with :class:`monai.bundle.ConfigParser`
(never by hand) and turns it into what a config's ``model`` and ``preprocessing`` sections
say, so the bundle's network is built, hash-checked and recorded exactly like a named
architecture:

* **Network**: the ``network_def`` item. Its ``_target_`` is resolved with MONAI's own
  :class:`~monai.bundle.ComponentLocator` (a bare name such as ``"SegResNet"`` means the
  MONAI class MONAI would pick) and must lie in an allowed namespace (checked by the
  caller, :func:`icam_med.config.parse_config`, before anything is built); its arguments are
  resolved by the parser (``@`` references followed). The bundle decides nothing else.
* **Weights**: ``models/model.safetensors`` or ``models/model.pt`` (a TorchScript
  ``model.ts`` alone is refused with the fix); ``weights_sha256`` pins them as for any model.
* **Preprocessing**: the ``transforms`` of the bundle's ``preprocessing`` Compose, each
  turned into a config step (``name`` + resolved arguments). Loaders and savers are dropped
  (icam-med's validated reader takes their place), as are ``EnsureChannelFirstd`` (the
  reader's volumes are channel-first already) and ``EnsureTyped`` (the engine moves the
  input to the model's device and dtype). Transforms that cannot be taken are refused with
  the item's id: a non-dictionary transform, one on keys other than ``image``, a nested
  component.
* **Labels and input contract**: from the metadata's ``network_data_format``
  (``outputs.pred.channel_def``, ``inputs.image.num_channels``/``spatial_shape``), unless the
  config gives them.
* **Identity**: name, version, the config's name, the SHA-256 of the inference config and of
  the metadata, and the metadata's descriptive fields, for the audit record.

Expressions (``"$..."`` strings, which the parser would ``eval``) are never evaluated: a
``network_def`` or a kept transform that needs one is refused, naming the item and the fix
(a literal value in the bundle's config). Items that are not needed (``imports``, the
evaluator, handlers...) are never parsed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BundleSpec", "read_bundle"]

IMAGE_KEY = "image"
# Dropped transforms: what icam-med's reader or engine does in their place.
_DROPPED = {
    "LoadImaged": "icam-med's validated reader loads the scan",
    "LoadImage": "icam-med's validated reader loads the scan",
    "SaveImaged": "icam-med writes the outputs",
    "SaveImage": "icam-med writes the outputs",
    "EnsureChannelFirstd": "icam-med's reader returns channel-first volumes",
    "EnsureChannelFirst": "icam-med's reader returns channel-first volumes",
    "EnsureTyped": "the engine moves the input to the model's device and dtype",
    "EnsureType": "the engine moves the input to the model's device and dtype",
}
_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
_DESCRIPTIVE = ("monai_version", "pytorch_version", "task", "description", "authors",
                "copyright", "data_source", "intended_use")


class BundleError(ValueError):
    """A bundle icam-med cannot take; the message names the bundle, the item and the fix."""


@dataclass(frozen=True)
class BundleSpec:
    """What a bundle says, in the terms of a config's ``model`` and ``preprocessing``.

    Attributes:
        architecture: the network class as ``"module:ClassName"`` (not yet allow-listed).
        args: the network's constructor arguments (``@`` references resolved).
        weights: the weights file in ``models/``.
        labels: class labels from the metadata's ``channel_def`` (may be empty).
        in_channels, spatial_size: input contract from the metadata, where it states them.
        preprocessing: the kept transforms as config steps (``name`` + arguments).
        dropped: the dropped transforms and why.
        info: name, version, config, hashes and descriptive metadata, for the record.
    """

    architecture: str
    args: dict[str, Any]
    weights: Path | None
    labels: tuple[str, ...]
    in_channels: int | None
    spatial_size: tuple[int, ...] | None
    preprocessing: tuple[dict[str, Any], ...]
    dropped: tuple[str, ...]
    info: dict[str, Any] = field(default_factory=dict)


def _config_file(root: Path, name: str, where: str) -> Path:
    configs = root / "configs"
    candidates = [configs / name] if Path(name).suffix else [configs / f"{name}{s}"
                                                              for s in _CONFIG_SUFFIXES]
    for c in candidates:
        if c.is_file():
            return c
    present = sorted(p.name for p in configs.glob("*")) if configs.is_dir() else []
    raise BundleError(
        f"{where}: bundle {root} has no config '{name}' in configs/ (it holds {present}); "
        "set 'model.bundle_config' to one of them, e.g. inference.json."
    )


def _weights_file(root: Path, where: str) -> Path:
    models = root / "models"
    for name in ("model.safetensors", "model.pt", "model.pth"):
        if (models / name).is_file():
            return models / name
    present = sorted(p.name for p in models.glob("*")) if models.is_dir() else []
    if any(n.endswith(".ts") for n in present):
        raise BundleError(
            f"{where}: bundle {root} has only a TorchScript model ({present}); CAM hooks need "
            "the eager network. Add its state dict as models/model.pt (torch.save(torch.jit."
            "load(path).state_dict(), 'models/model.pt')), or name one with 'model.weights'."
        )
    raise BundleError(
        f"{where}: bundle {root} has no weights in models/ (expected model.safetensors or "
        f"model.pt; it holds {present}); add them or name a file with 'model.weights'."
    )


def _ref_id(text: str) -> str:
    from monai.bundle.utils import ID_REF_KEY, ID_SEP_KEY

    return text[len(ID_REF_KEY):].replace("#", ID_SEP_KEY)


def _check_literal(parser: Any, value: Any, item: str, where: str, seen: set[str]) -> None:
    """Refuse expressions, macros left over and nested components under an item, following
    ``@`` references (whose targets must be literal too)."""
    from monai.bundle.utils import EXPR_KEY, ID_REF_KEY

    if isinstance(value, dict):
        if "_target_" in value:
            raise BundleError(
                f"{where}: bundle item '{item}' is a nested component "
                f"({value['_target_']!r}); icam-med takes literal arguments only. Give the "
                "value itself in the bundle's config."
            )
        for k, v in value.items():
            _check_literal(parser, v, f"{item}#{k}", where, seen)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_literal(parser, v, f"{item}#{i}", where, seen)
    elif isinstance(value, str):
        if value.startswith(EXPR_KEY):
            raise BundleError(
                f"{where}: bundle item '{item}' is an expression ({value!r}); icam-med never "
                "evaluates code from a bundle. Replace it with a literal value in a copy of "
                "the bundle's config."
            )
        if value.startswith(ID_REF_KEY):
            ref = _ref_id(value)
            if ref in seen:
                return
            seen.add(ref)
            try:
                target = parser.get(ref)
            except KeyError:
                target = None
            if target is None and ref not in parser:
                raise BundleError(f"{where}: bundle item '{item}' refers to {value!r}, which "
                                  "the bundle's config does not define.")
            _check_literal(parser, target, ref, where, seen)


def _resolve_args(parser: Any, item: str, raw: dict[str, Any], where: str) -> dict[str, Any]:
    from monai.bundle.config_item import ConfigComponent
    from monai.bundle.utils import ID_SEP_KEY

    args: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ConfigComponent.non_arg_keys:
            if key in ("_target_", "_desc_") or (key == "_disabled_" and value is False):
                continue
            raise BundleError(
                f"{where}: bundle item '{item}' sets {key}={value!r}; icam-med takes plain "
                "components only (no _mode_, _requires_ or _disabled_ expressions)."
            )
        _check_literal(parser, value, f"{item}#{key}", where, set())
        args[key] = parser.get_parsed_content(f"{item}{ID_SEP_KEY}{key}", instantiate=False,
                                              eval_expr=False)
    return args


def _target_module(target: Any, item: str, where: str) -> tuple[str, str]:
    """``(module, class name)`` of a ``_target_``, as MONAI's locator resolves it."""
    from monai.bundle import ComponentLocator

    if not isinstance(target, str) or not target or target.startswith(("$", "@", "%")):
        raise BundleError(f"{where}: bundle item '{item}' has _target_ {target!r}; expected a "
                          "class name or a dotted path.")
    if "." in target:
        module, _, cls = target.rpartition(".")
        return module, cls
    module = ComponentLocator().get_component_module_name(target)
    if isinstance(module, list):
        module = module[0] if module else None
    if not module:
        raise BundleError(f"{where}: bundle item '{item}': MONAI knows no component "
                          f"{target!r}; give a dotted path.")
    return str(module), target


def _channel_labels(pred: Any) -> tuple[str, ...]:
    defs = pred.get("channel_def") if isinstance(pred, dict) else None
    if not isinstance(defs, dict):
        return ()
    try:
        ordered = sorted(defs.items(), key=lambda kv: int(kv[0]))
    except (TypeError, ValueError):
        return ()
    return tuple(str(v) for _, v in ordered)


def _contract(inputs: Any) -> tuple[int | None, tuple[int, ...] | None]:
    image = inputs.get(IMAGE_KEY) if isinstance(inputs, dict) else None
    if not isinstance(image, dict):
        return None, None
    ch = image.get("num_channels")
    channels = ch if isinstance(ch, int) and not isinstance(ch, bool) and ch > 0 else None
    shape = image.get("spatial_shape")
    size = (tuple(shape) if isinstance(shape, list) and shape
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
            else None)
    return channels, size


def read_bundle(bundle: str | Path, config_name: str = "inference.json", *,
                where: str = "config") -> BundleSpec:
    """Read a MONAI bundle folder into a :class:`BundleSpec` (nothing is built or imported
    from the bundle's own code; no expression is evaluated).

    Args:
        bundle: the bundle's folder (holding ``configs/`` and ``models/``).
        config_name: the inference config in ``configs/`` (with or without suffix).
        where: the config naming the bundle, for messages.

    Raises:
        BundleError (a ValueError): the folder is not a bundle, an item cannot be taken, or
            the network_def is missing; the message names the bundle, the item and the fix.
    """
    from monai.bundle import ConfigParser

    from icam_med.audit.hashing import sha256_file

    root = Path(bundle).expanduser()
    if not root.is_dir() or not (root / "configs").is_dir():
        raise BundleError(
            f"{where}: 'model.bundle' {root} is not a MONAI bundle folder (expected a folder "
            "with configs/ and models/, e.g. one unpacked from the MONAI Model Zoo)."
        )
    cfg_file = _config_file(root, config_name, where)
    meta_file = root / "configs" / "metadata.json"
    parser = ConfigParser()
    try:
        parser.read_config(str(cfg_file))
        if meta_file.is_file():
            parser.read_meta(str(meta_file))
        parser["bundle_root"] = str(root)
        parser.resolve_macro_and_relative_ids()
    except Exception as exc:  # JSON/YAML syntax, duplicate keys, a macro to a missing file
        raise BundleError(f"{where}: bundle config {cfg_file} could not be read "
                          f"({type(exc).__name__}: {exc}).") from None
    meta = parser.get("_meta_") or {}
    if "network_def" not in parser:
        raise BundleError(f"{where}: bundle config {cfg_file} has no 'network_def' item; "
                          "icam-med builds the network from it.")
    net_raw = parser.get("network_def")
    if not isinstance(net_raw, dict) or "_target_" not in net_raw:
        raise BundleError(f"{where}: bundle item 'network_def' in {cfg_file} is not a "
                          "component with a _target_ (an expression or a reference cannot be "
                          "checked against the allowed architectures).")
    module, cls = _target_module(net_raw["_target_"], "network_def", where)
    args = _resolve_args(parser, "network_def", net_raw, where)

    steps: list[dict[str, Any]] = []
    dropped: list[str] = []
    if "preprocessing" in parser:
        pre = parser.get("preprocessing")
        transforms = pre.get("transforms") if isinstance(pre, dict) else None
        if not isinstance(transforms, list):
            raise BundleError(f"{where}: bundle item 'preprocessing' in {cfg_file} is not a "
                              "Compose with a 'transforms' list; give the preprocessing in "
                              "the config's 'preprocessing' section instead.")
        for i, t in enumerate(transforms):
            item = f"preprocessing::transforms::{i}"
            if not isinstance(t, dict) or "_target_" not in t:
                raise BundleError(f"{where}: bundle item '{item}' is not a transform component "
                                  f"({t!r}).")
            t_module, t_cls = _target_module(t["_target_"], item, where)
            if t_cls in _DROPPED:
                dropped.append(f"{t_cls}: {_DROPPED[t_cls]}")
                continue
            if not (t_module == "monai.transforms" or t_module.startswith("monai.transforms.")):
                raise BundleError(
                    f"{where}: bundle item '{item}' is {t['_target_']!r}, not a MONAI "
                    "transform; icam-med runs only monai.transforms from a bundle. Give the "
                    "preprocessing in the config's 'preprocessing' section instead."
                )
            targs = _resolve_args(parser, item, t, where)
            keys = targs.get("keys")
            keys = [keys] if isinstance(keys, str) else keys
            if not t_cls.endswith("d") or not keys:
                raise BundleError(
                    f"{where}: bundle item '{item}' ({t_cls}) is not a dictionary transform "
                    "on 'image'; icam-med's pipeline is a list of dictionary transforms."
                )
            if list(keys) != [IMAGE_KEY]:
                raise BundleError(
                    f"{where}: bundle item '{item}' ({t_cls}) works on keys {list(keys)}; "
                    f"icam-med passes the scan as '{IMAGE_KEY}' only. Use keys: {IMAGE_KEY} "
                    "in the bundle's inference config."
                )
            steps.append({"name": t_cls, **targs})

    nd = meta.get("network_data_format", {}) if isinstance(meta, dict) else {}
    outputs = nd.get("outputs", {}) if isinstance(nd, dict) else {}
    pred = outputs.get("pred") if isinstance(outputs, dict) else None
    channels, size = _contract(nd.get("inputs") if isinstance(nd, dict) else None)
    name = meta.get("name") if isinstance(meta, dict) else None
    info = {
        "name": str(name or root.name),
        "version": str(meta.get("version", "")) if isinstance(meta, dict) else "",
        "config": cfg_file.name,
        "config_sha256": sha256_file(cfg_file),
        "metadata_sha256": sha256_file(meta_file) if meta_file.is_file() else None,
        "network_def_target": str(net_raw["_target_"]),
        "dropped_transforms": list(dropped),
        "metadata": {k: str(meta[k])[:512] for k in _DESCRIPTIVE
                     if isinstance(meta, dict) and meta.get(k) not in (None, "")},
    }
    weights = None
    try:
        weights = _weights_file(root, where)
    except BundleError as exc:
        info["weights_error"] = str(exc)
    return BundleSpec(
        architecture=f"{module}:{cls}",
        args=args,
        weights=weights,
        labels=_channel_labels(pred),
        in_channels=channels,
        spatial_size=size,
        preprocessing=tuple(steps),
        dropped=tuple(dropped),
        info=info,
    )
