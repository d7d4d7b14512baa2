"""Run configuration: model, preprocessing pipeline and CAM method, from YAML.

A config file has four top-level sections::

    model:            # see ModelConfig
      name: demo-lesion-cnn
      architecture: icam_med.networks:LesionNet   # MONAI network name or "module:Class"
      args: {spatial_dims: 3, in_channels: 1, out_channels: 2}
      weights: ../sample_data/demo_model.safetensors   # relative to this file
      weights_sha256: "..."                            # optional; refused on mismatch
      labels: [absent, present]
      input: {channels: 1, spatial_size: [64, 64, 64]}
    preprocessing:    # MONAI dictionary transforms, in order (see icam_med.io)
      - {name: Orientationd, axcodes: RAS}
    method:           # CAM method and its options (see icam_med.cam)
      name: integrative
      target_layers: stages
    geometry:         # geometry validation options (see icam_med.io)
      slice_tolerance: 0.0

Every path in a config is resolved relative to the config file's folder.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ICAMConfig", "MethodConfig", "ModelConfig", "load_config", "parse_config"]

_TOP_LEVEL = {"model", "preprocessing", "method", "geometry", "audit"}


@dataclass(frozen=True)
class ModelConfig:
    """What model to build and how to load its weights."""

    name: str
    architecture: str
    args: dict[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    weights_sha256: str | None = None
    labels: tuple[str, ...] = ()
    in_channels: int = 1
    spatial_size: tuple[int, ...] | None = None
    dtype: str = "float32"


@dataclass(frozen=True)
class MethodConfig:
    """CAM method name and its options, passed unchanged to :func:`icam_med.cam.make_cam`."""

    name: str = "integrative"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ICAMConfig:
    """A whole run configuration."""

    model: ModelConfig
    preprocessing: tuple[dict[str, Any], ...] = ()
    method: MethodConfig = field(default_factory=MethodConfig)
    geometry: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _where(path: Path | None) -> str:
    return f"config {path}" if path else "config"


def _require(mapping: Mapping[str, Any], key: str, where: str, kind: type | tuple) -> Any:
    if key not in mapping:
        raise ValueError(f"{where}: missing required key '{key}'.")
    value = mapping[key]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ValueError(
            f"{where}: '{key}' must be a {expected}, got {type(value).__name__} ({value!r})."
        )
    return value


def parse_config(data: Mapping[str, Any], base_dir: Path | None = None,
                 path: Path | None = None) -> ICAMConfig:
    """Build an :class:`ICAMConfig` from an already-parsed mapping.

    Args:
        data: the parsed YAML (or an equivalent dict).
        base_dir: folder relative paths are resolved against (default: current folder).
        path: the file the mapping came from, for error messages.

    Raises:
        ValueError: a key is missing, unknown or of the wrong type; the message names it.
    """
    where = _where(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping at the top level, got {type(data).__name__}.")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ValueError(
            f"{where}: unknown top-level key(s) {sorted(unknown)}; expected some of {sorted(_TOP_LEVEL)}."
        )
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    m = _require(data, "model", where, Mapping)
    mwhere = f"{where}, section 'model'"
    weights = m.get("weights")
    weights_path = None
    if weights is not None:
        weights_path = Path(weights)
        if not weights_path.is_absolute():
            weights_path = (base / weights_path).resolve()
    input_spec = m.get("input") or {}
    if not isinstance(input_spec, Mapping):
        raise ValueError(f"{mwhere}: 'input' must be a mapping with 'channels' and 'spatial_size'.")
    spatial = input_spec.get("spatial_size")
    sha = m.get("weights_sha256")
    if sha is not None and (not isinstance(sha, str) or len(sha) != 64):
        raise ValueError(f"{mwhere}: 'weights_sha256' must be a 64-character hex string, got {sha!r}.")
    model = ModelConfig(
        name=str(_require(m, "name", mwhere, str)),
        architecture=str(_require(m, "architecture", mwhere, str)),
        args=dict(m.get("args") or {}),
        weights=weights_path,
        weights_sha256=sha.lower() if sha else None,
        labels=tuple(str(x) for x in (m.get("labels") or ())),
        in_channels=int(input_spec.get("channels", m.get("args", {}).get("in_channels", 1))),
        spatial_size=tuple(int(s) for s in spatial) if spatial else None,
        dtype=str(input_spec.get("dtype", "float32")),
    )

    pre = data.get("preprocessing") or []
    if not isinstance(pre, list) or not all(isinstance(t, Mapping) and "name" in t for t in pre):
        raise ValueError(
            f"{where}: 'preprocessing' must be a list of mappings, each with a 'name' "
            "(a MONAI dictionary transform such as Orientationd)."
        )

    meth = data.get("method") or {}
    if not isinstance(meth, Mapping):
        raise ValueError(f"{where}: 'method' must be a mapping with a 'name' and options.")
    meth = dict(meth)
    method = MethodConfig(name=str(meth.pop("name", "integrative")), options=meth)

    geometry = dict(data.get("geometry") or {})
    audit = dict(data.get("audit") or {})
    return ICAMConfig(
        model=model,
        preprocessing=tuple(copy.deepcopy(dict(t)) for t in pre),
        method=method,
        geometry=geometry,
        audit=audit,
        path=path,
        raw=copy.deepcopy(dict(data)),
    )


def load_config(path: str | Path) -> ICAMConfig:
    """Read a YAML config file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: it is not valid YAML or not a valid config; the message says where.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"config file {p} does not exist; pass a YAML file such as configs/demo.yaml."
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ValueError(f"config {p} is not valid YAML: {exc}") from exc
    return parse_config(data, base_dir=p.parent.resolve(), path=p)
