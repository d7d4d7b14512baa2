"""Building models from a config and loading their weights safely.

* Architectures are named: a MONAI network (``"DenseNet121"``, any class in
  :mod:`monai.networks.nets`) or an import path ``"package.module:ClassName"`` inside an
  allowed namespace (``icam_med.networks``, or one registered with
  :func:`icam_med.config.register_architecture`), checked before anything is imported.
* Weights are ``.safetensors`` by default. A ``.pt``/``.pth`` state dict is read
  only with ``torch.load(weights_only=True)``; there is never a fallback to full
  unpickling.
* The weights' SHA-256 is computed on every load and, where the config gives one,
  checked before anything is imported, built or parsed: a mismatch is refused.
* Checkpoints in the common wrappings load: a state dict under ``state_dict``, ``model``
  or ``network`` (MONAI's ``CheckpointSaver``, Lightning, training scripts), with the
  ``module.`` (DataParallel/DDP), ``model.`` (Lightning) or ``_orig_mod.``
  (``torch.compile``) prefix stripped when the architecture's own keys lack it. What was
  unwrapped is recorded (:attr:`ModelInfo.weights_unwrapped`).
* TorchScript archives are refused with the reason (CAM hooks need the eager module) and
  the fix (the architecture plus a state dict).
"""

from __future__ import annotations

import importlib
import logging
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from icam_med.audit.hashing import sha256_file
from icam_med.config import ModelConfig, check_architecture_allowed

__all__ = ["ModelInfo", "build_architecture", "check_input_contract", "load_model",
           "unwrap_state_dict"]

log = logging.getLogger(__name__)

_SAFE_SUFFIXES = {".safetensors"}
_STATE_DICT_SUFFIXES = {".pt", ".pth"}


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model, as recorded in audit records."""

    name: str
    architecture: str
    args: dict[str, Any]
    weights_file: str | None
    weights_sha256: str | None
    weights_format: str | None
    labels: tuple[str, ...]
    in_channels: int
    spatial_size: tuple[int, ...] | None
    dtype: str
    n_parameters: int
    #: How the state dict was found in the file, in order: ``"key:state_dict"`` (taken from
    #: that key of a checkpoint mapping), ``"prefix:module."`` (prefix stripped). Empty
    #: for a bare state dict.
    weights_unwrapped: tuple[str, ...] = ()
    #: For a MONAI bundle: name, version, config name, SHA-256 of the inference config and
    #: metadata, the network_def's target, the dropped transforms, descriptive metadata.
    bundle: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["spatial_size"] = list(self.spatial_size) if self.spatial_size else None
        d["weights_unwrapped"] = list(self.weights_unwrapped)
        return d


def build_architecture(architecture: str, args: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a network by name.

    Args:
        architecture: a class of :mod:`monai.networks.nets` (e.g. ``"DenseNet121"``) or
            an import path ``"package.module:ClassName"`` inside an allowed namespace
            (:data:`icam_med.config.ALLOWED_ARCHITECTURE_NAMESPACES` or one registered with
            :func:`icam_med.config.register_architecture`). The allow-list is checked from
            the string before anything is imported.
        args: keyword arguments for the constructor.

    Raises:
        ValueError: the name is not allowed, resolves to nothing, or to something that is
            not an ``nn.Module``; or the constructor refuses ``args``.
    """
    if not isinstance(architecture, str):
        raise ValueError(f"architecture must be a string, got {type(architecture).__name__}.")
    if args is not None and not isinstance(args, Mapping):
        raise ValueError(f"architecture '{architecture}': args must be a mapping, got {args!r}.")
    args = dict(args or {})
    module_name, attr = check_architecture_allowed(architecture)
    if module_name == "monai.networks.nets" and ":" not in architecture:
        from monai.networks import nets

        cls = getattr(nets, attr, None)
        if cls is None:
            import difflib

            names = [n for n in dir(nets) if n[:1].isupper()]
            close = difflib.get_close_matches(architecture, names, n=5)
            raise ValueError(
                f"architecture '{architecture}' is not a MONAI network"
                + (f"; did you mean {close}?" if close else "")
                + " Use a class name from monai.networks.nets or 'package.module:ClassName'."
            )
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(
                f"architecture '{architecture}': cannot import module '{module_name}' ({exc}); "
                "give 'package.module:ClassName' of an installed package."
            ) from exc
        cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"architecture '{architecture}' does not name a torch.nn.Module class.")
    try:
        return cls(**args)
    except (TypeError, ValueError, AssertionError, KeyError, IndexError) as exc:
        raise ValueError(
            f"architecture '{architecture}' rejected its args {args}: "
            f"{type(exc).__name__}: {exc}. Check 'model.args' against the class's constructor."
        ) from exc


_WRAPPER_KEYS = ("state_dict", "model", "network")
_PREFIXES = ("module.", "model.", "_orig_mod.")
_TORCHSCRIPT_FIX = (
    "CAM methods hook the layers of the eager nn.Module, and a TorchScript archive has none "
    "to hook. Give the architecture instead ('model.architecture' + 'model.args', or a MONAI "
    "bundle's network_def) and a state dict of the same network: in Python, "
    "torch.save(torch.jit.load(path).state_dict(), 'weights.pt') or "
    "safetensors.torch.save_file(...) writes one."
)


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip with ``constants.pkl`` and a ``code/`` folder)."""
    if path.suffix.lower() in {".ts", ".torchscript", ".jit"}:
        return True
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read_state_dict(path: Path) -> tuple[Any, str]:
    """The file's content (a state dict or a checkpoint mapping holding one) and its format."""
    suffix = path.suffix.lower()
    if suffix in _SAFE_SUFFIXES:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu"), "safetensors"
    if _is_torchscript(path):
        raise ValueError(f"weights file {path} is a TorchScript archive. {_TORCHSCRIPT_FIX}")
    if suffix in _STATE_DICT_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # an unpickling error: never retry without weights_only
            raise ValueError(
                f"weights file {path} could not be read as a plain state dict with "
                f"weights_only=True ({exc}). Convert it to .safetensors; full unpickling "
                "of untrusted files is never done."
            ) from exc
        return state, "torch-state-dict"
    raise ValueError(
        f"weights file {path} has suffix '{suffix}'; expected .safetensors (preferred) or a "
        ".pt/.pth state dict (a bare one, or a checkpoint holding it under 'state_dict', "
        "'model' or 'network')."
    )


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def unwrap_state_dict(obj: Any, expected_keys: set[str] | list[str],
                      source: str = "weights") -> tuple[dict[str, torch.Tensor], tuple[str, ...]]:
    """Find the state dict in a checkpoint and strip wrapper prefixes from its keys.

    A checkpoint mapping is entered through its ``state_dict``, ``model`` or ``network``
    key (repeatedly: ``{"model": {"state_dict": ...}}``). A key prefix ``module.``,
    ``model.`` or ``_orig_mod.`` is removed (with torch's
    ``consume_prefix_in_state_dict_if_present``) only when every key carries it and
    removing it makes more keys match the architecture's own (``expected_keys``), so a
    network whose attribute is itself called ``model`` (MONAI's UNet) keeps its keys.

    Returns:
        The state dict and the steps taken (``"key:<name>"``, ``"prefix:<prefix>"``).

    Raises:
        ValueError: no state dict of tensors is found; the message lists the keys seen.
    """
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    steps: list[str] = []
    state = obj
    for _ in range(4):
        if _is_state_dict(state):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(state, Mapping)
                    and isinstance(state.get(k), Mapping)), None)
        if key is None:
            break
        steps.append(f"key:{key}")
        state = state[key]
    if not _is_state_dict(state):
        seen = (sorted(str(k) for k in state)[:12] if isinstance(state, Mapping)
                else type(state).__name__)
        raise ValueError(
            f"{source} does not hold a state dict of tensors (found {seen}"
            + (f" after unwrapping {steps}" if steps else "") + "). Expected a bare state dict "
            "or a checkpoint with it under 'state_dict', 'model' or 'network'; save "
            "model.state_dict() instead."
        )
    state = dict(state)
    expected = set(expected_keys)

    def fit(keys: Any) -> int:
        return len(set(keys) & expected)

    # The shortest sequence of wrapper prefixes whose removal fits the architecture best
    # (with no architecture keys given: every prefix all keys carry).
    best: tuple[int, tuple[str, ...]] = (fit(state), ())
    frontier: list[tuple[list[str], tuple[str, ...]]] = [(list(state), ())]
    for _ in range(4):
        nxt = []
        for keys, seq in frontier:
            for prefix in _PREFIXES:
                if keys and all(k.startswith(prefix) for k in keys):
                    stripped = [k[len(prefix):] for k in keys]
                    nxt.append((stripped, (*seq, prefix)))
                    score = fit(stripped) if expected else len(seq) + 1
                    if score > best[0]:
                        best = (score, (*seq, prefix))
        frontier = nxt
    for prefix in best[1]:
        consume_prefix_in_state_dict_if_present(state, prefix)
        steps.append(f"prefix:{prefix}")
    return state, tuple(steps)


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Build the configured architecture, load and verify its weights, and return it in eval mode.

    Raises:
        FileNotFoundError: the weights file is missing.
        ValueError: the architecture is unknown, the hash does not match, or the weights
            do not fit the architecture.
    """
    # Order matters: the allow-list (a string check), then the weights' hash, then import,
    # build and parse. Nothing is imported or built for weights that are not the pinned ones.
    check_architecture_allowed(cfg.architecture)
    sha = fmt = wfile = None
    unwrapped: tuple[str, ...] = ()
    path = None
    if cfg.weights is not None:
        path = Path(cfg.weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file {path} for model '{cfg.name}' does not exist; check 'model.weights' "
                "in the config (relative paths are resolved from the config's folder)."
            )
        sha = sha256_file(path)
        if cfg.weights_sha256 is not None and sha != cfg.weights_sha256:
            raise ValueError(
                f"weights file {path} has SHA-256 {sha}, but the config expects "
                f"{cfg.weights_sha256}: refusing to load weights that are not the audited ones."
            )
    model = build_architecture(cfg.architecture, cfg.args)
    if path is not None:
        raw, fmt = _read_state_dict(path)
        state, unwrapped = unwrap_state_dict(raw, model.state_dict().keys(),
                                             source=f"weights file {path}")
        if unwrapped:
            log.info("weights file %s: state dict unwrapped (%s)", path.name, ", ".join(unwrapped))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                f"weights file {path} does not fit architecture '{cfg.architecture}' "
                f"with args {cfg.args}: {exc}"
            ) from exc
        wfile = path.name
    else:
        log.warning("model '%s' has no weights file: using the architecture's initial weights",
                    cfg.name)
    model.eval().to(device)
    info = ModelInfo(
        name=cfg.name,
        architecture=cfg.architecture,
        args=dict(cfg.args),
        weights_file=wfile,
        weights_sha256=sha,
        weights_format=fmt,
        labels=tuple(cfg.labels),
        in_channels=cfg.in_channels,
        spatial_size=cfg.spatial_size,
        dtype=cfg.dtype,
        n_parameters=sum(p.numel() for p in model.parameters()),
        weights_unwrapped=unwrapped,
        bundle=dict(cfg.bundle) if getattr(cfg, "bundle", None) else None,
    )
    return model, info


def check_input_contract(info: ModelInfo, shape: tuple[int, ...], source: str = "input") -> None:
    """Check a preprocessed image of shape ``(C, *spatial)`` against the model's input contract.

    Raises:
        ValueError: wrong channel count or spatial size, naming both and the fix.
    """
    if len(shape) < 3:
        raise ValueError(f"{source}: expected a (C, *spatial) image, got shape {tuple(shape)}.")
    if shape[0] != info.in_channels:
        raise ValueError(
            f"{source}: has {shape[0]} channel(s) after preprocessing, but model '{info.name}' "
            f"expects {info.in_channels}. Select the right volume/channel or use a config "
            "whose model matches this scan."
        )
    if info.spatial_size is not None and tuple(shape[1:]) != tuple(info.spatial_size):
        raise ValueError(
            f"{source}: spatial size after preprocessing is {tuple(shape[1:])}, but model "
            f"'{info.name}' expects {tuple(info.spatial_size)}. Add a resize or crop/pad step "
            "to the config's preprocessing."
        )
