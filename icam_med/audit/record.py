"""Building audit records from plain inputs.

A record is a JSON object (see ``icam_med/schemas/audit-record-v1.schema.json`` and
docs/audit.md) written as ``<map-name>.icam.json`` next to the map it describes. This module
builds each section from plain values (arrays, dicts, :class:`~icam_med.models.ModelInfo`),
so it needs neither the engine nor the I/O layer; :func:`seal_record` adds the integrity
section once the record's place in the ledger is known.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from icam_med.audit.hashing import sha256_file, sha256_json, voxel_sha256
from icam_med.audit.phi import SiteKey, hash_uid, scrub_paths
from icam_med.audit.schema import RECORD_SCHEMA_VERSION, RecordError, validate_record
from icam_med.paths import RECORD_SUFFIX

if TYPE_CHECKING:  # audit never imports the model loader at run time
    from icam_med.models import ModelInfo

__all__ = [
    "RECORD_SUFFIX",
    "AuditRecord",
    "ClassRef",
    "OutputRef",
    "RecordAnalysis",
    "RecordError",
    "RecordInput",
    "RecordMethod",
    "activity_section",
    "build_record",
    "file_ref",
    "geometry_summary",
    "input_from_scan",
    "input_section",
    "method_section",
    "model_section",
    "parse_json_bytes",
    "preprocessing_section",
    "record_sha256",
    "resolve_inside",
    "runtime_section",
    "safe_name",
    "seal_record",
    "utc_now",
    "voxel_digest",
]


#: Distributions whose versions every record carries (``python`` is added separately).
VERSIONED_PACKAGES = ("torch", "monai", "numpy", "pydicom", "nibabel", "SimpleITK",
                      "highdicom", "icam-med")

_NAME_RE = re.compile(r"[^A-Za-z0-9._+-]+")


def utc_now() -> str:
    """The current UTC time as ISO 8601 with a ``Z`` (millisecond precision)."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def safe_name(text: str, fallback: str = "scan") -> str:
    """A file-system- and schema-safe name: letters, digits and ``._+-``, at most 128 chars."""
    name = _NAME_RE.sub("_", str(text)).strip("._-") or fallback
    if not name[0].isalnum():
        name = f"{fallback}_{name}"
    return name[:128]


def _jsonable(value: Any) -> Any:
    """Plain JSON values from numpy/torch scalars, tuples, paths (file names only)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.name
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def geometry_summary(shape: Sequence[int], spacing: Sequence[float] | None = None,
                     orientation: str | None = None, affine: Any = None) -> dict[str, Any]:
    """The geometry part of the input section."""
    aff = None
    if affine is not None:
        a = affine.detach().cpu().numpy() if hasattr(affine, "detach") else np.asarray(affine)
        aff = [[float(v) for v in row] for row in np.asarray(a, dtype=float)]
    return {
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing] if spacing is not None else None,
        "orientation": str(orientation) if orientation else None,
        "affine": aff,
    }


def voxel_digest(voxels: Any) -> tuple[str, str]:
    """``(voxel_sha256, dtype string)`` of a decoded volume (array or tensor)."""
    arr = voxels.detach().cpu() if hasattr(voxels, "detach") else np.asarray(voxels)
    dtype = np.dtype(str(arr.dtype).replace("torch.", "")).str
    return voxel_sha256(voxels), dtype


def input_section(voxels: Any = None, *, fmt: str, geometry: Mapping[str, Any],
                  modality: str | None = None,
                  checks: Iterable[Mapping[str, Any]] = (),
                  uids: Mapping[str, Any] | None = None,
                  site_key: SiteKey | None = None,
                  voxel_hash: str | None = None, voxel_dtype: str | None = None,
                  ) -> dict[str, Any]:
    """The ``input`` section.

    Args:
        voxels: the decoded volume as loaded, before preprocessing (array or tensor); or
            give ``voxel_hash`` and ``voxel_dtype`` computed earlier (see :func:`voxel_digest`).
        fmt: ``"dicom"``, ``"nifti"``, ...
        geometry: from :func:`geometry_summary`.
        modality: DICOM modality, if known.
        checks: geometry checks, each ``{"name", "status": "passed"|"warned", "detail"}``.
        uids: raw DICOM UIDs: any of ``study``, ``series``, ``frame_of_reference`` (strings)
            and ``instances`` (a list of SOP Instance UIDs). They are kept only as HMACs
            under ``site_key``, and dropped entirely without one.
        site_key: the site key (see :func:`icam_med.audit.phi.load_site_key`).
    """
    if voxel_hash is None:
        voxel_hash, voxel_dtype = voxel_digest(voxels)
    hashed = None
    if uids and site_key is not None:
        hashed = {"algorithm": "HMAC-SHA256", "key_id": site_key.key_id}
        for key in ("study", "series", "frame_of_reference"):
            if uids.get(key):
                hashed[key] = hash_uid(str(uids[key]), site_key)
        instances = [str(u) for u in (uids.get("instances") or ()) if u]
        if instances:
            hashed["instances"] = hash_uid("\n".join(sorted(instances)), site_key)
            hashed["n_instances"] = len(instances)
    return {
        "modality": str(modality) if modality else None,
        "format": fmt,
        "voxel_sha256": voxel_hash,
        "voxel_dtype": voxel_dtype or "",
        "geometry": dict(geometry),
        "checks": [
            {"name": str(c["name"]), "status": str(c["status"]),
             **({"detail": scrub_paths(str(c["detail"]))} if c.get("detail") else {})}
            for c in checks
        ],
        "uid_hashes": hashed,
    }


def input_from_scan(info: Any, *, voxel_hash: str, voxel_dtype: str,
                    site_key: SiteKey | None = None) -> dict[str, Any]:
    """The ``input`` section of a scan loaded by :func:`icam_med.io.load_volume`.

    Args:
        info: its :class:`icam_med.io.ScanInfo`.
        voxel_hash, voxel_dtype: from :func:`voxel_digest` of the loaded volume.
        site_key: the site key for UID hashes, or ``None`` (no UIDs recorded).
    """
    uids = {
        "study": getattr(info, "study_instance_uid", None),
        "series": getattr(info, "series_instance_uid", None),
        "frame_of_reference": getattr(info, "frame_of_reference_uid", None),
        "instances": list(getattr(info, "sop_instance_uids", ()) or ()),
    }
    checks = [c.to_dict() if hasattr(c, "to_dict") else dict(c) for c in info.checks]
    return input_section(
        fmt=info.format, modality=info.modality, voxel_hash=voxel_hash, voxel_dtype=voxel_dtype,
        geometry=geometry_summary(info.shape, info.spacing, info.orientation, info.affine),
        checks=checks, uids=uids, site_key=site_key,
    )


def preprocessing_section(transforms: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The ``preprocessing`` section: each transform with its parameters.

    Accepts the config's steps (``{"name", **args}``) or ``Preprocessor.describe()``.
    """
    out = []
    for t in transforms:
        if "args" in t and "monai_class" in t:  # icam_med.io.Preprocessor.describe()
            item = {"name": str(t["name"]), "params": _scrub(_jsonable(t["args"])),
                    "monai_class": str(t["monai_class"]), "invertible": bool(t["invertible"])}
        else:  # a config step: {"name": ..., **arguments}
            params = {k: v for k, v in t.items() if k != "name"}
            item = {"name": str(t["name"]), "params": _scrub(_jsonable(params))}
        out.append(item)
    return out


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    return scrub_paths(value) if isinstance(value, str) else value


def model_section(info: ModelInfo) -> dict[str, Any]:
    """The ``model`` section from :class:`~icam_med.models.ModelInfo`."""
    return {
        "name": info.name,
        "architecture": info.architecture,
        "args": _scrub(_jsonable(info.args)),
        "weights_file": Path(info.weights_file).name if info.weights_file else None,
        "weights_sha256": info.weights_sha256,
        "weights_format": info.weights_format,
        "weights_unwrapped": list(getattr(info, "weights_unwrapped", ())),
        "bundle": _scrub(_jsonable(getattr(info, "bundle", None))),
        "labels": list(info.labels),
        "n_parameters": int(info.n_parameters),
        "input_contract": {
            "channels": int(info.in_channels),
            "spatial_size": list(info.spatial_size) if info.spatial_size else None,
            "dtype": info.dtype,
        },
    }


def _label(labels: Sequence[str], index: int | None) -> str | None:
    if index is None or not labels or not 0 <= index < len(labels):
        return None
    return str(labels[index])


def method_section(name: str, options: Mapping[str, Any], *,
                   layer_weights: Mapping[str, Any],
                   target_class: int | None, score: float | None,
                   predicted_class: int | None, map_range: Sequence[float],
                   labels: Sequence[str] = (), logits: Sequence[float] | None = None,
                   region: Mapping[str, Any] | None = None,
                   sliding_window: Mapping[str, Any] | None = None,
                   ) -> dict[str, Any]:
    """The ``method`` section.

    Args:
        name: the CAM method (``res.method``).
        options: every option as resolved by the engine (``res.options``).
        layer_weights: per-layer weight for this sample (floats or 0-d/1-element tensors).
        target_class: the explained class, or ``None`` for a custom target.
        score: the target score.
        predicted_class: the model's arg-max class.
        map_range: ``(min, max)`` of the written map.
        labels: the model's class labels, to name the classes.
        logits: the model's output for this sample.
        region: for a segmentation target, the region explained (``source``, labels,
            ``sha256`` of the uint8 region on the scan's grid, ``voxels``...; see
            :func:`icam_med.explain.region_summary`); recorded as ``target.region``.
        sliding_window: the sliding-window settings and window counts, if the model ran
            by sliding window.
    """
    opts = _scrub(_jsonable(dict(options)))
    weights = {str(k): float(np.asarray(_jsonable(v)).reshape(-1)[0])
               for k, v in layer_weights.items()}
    layers = opts.get("target_layers") if isinstance(opts.get("target_layers"), list) else None
    section: dict[str, Any] = {
        "name": str(name),
        "options": opts,
        "layers": [str(x) for x in (layers or list(weights))],
        "layer_weights": weights,
        "target": {"class_index": None if target_class is None else int(target_class),
                   "label": _label(labels, target_class)},
        "score": None if score is None else float(score),
        "predicted": {"class_index": None if predicted_class is None else int(predicted_class),
                      "label": _label(labels, predicted_class)},
        "map_range": [float(map_range[0]), float(map_range[1])],
    }
    if logits is not None:
        section["logits"] = [float(v) for v in np.asarray(_jsonable(logits), dtype=float).reshape(-1)]
    if region is not None:
        section["target"]["region"] = _scrub(_jsonable(dict(region)))
    if sliding_window is not None:
        section["sliding_window"] = _jsonable(dict(sliding_window))
    return section


@functools.cache
def _version(dist: str) -> str | None:
    """An installed distribution's version (read once per process: ~4 ms a read)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def runtime_section(device: Any = "cpu", seed: int | None = None) -> dict[str, Any]:
    """The ``runtime`` section: package versions, device and determinism settings."""
    import torch

    versions = {"python": platform.python_version()}
    versions.update({d: _version(d) for d in VERSIONED_PACKAGES})
    dev = torch.device(device)
    device_name = None
    if dev.type == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name(dev)
    return {
        "versions": versions,
        "platform": f"{platform.system()}-{platform.machine()}",
        "device": str(dev),
        "device_name": device_name,
        "determinism": {
            "seed": seed,
            "torch_initial_seed": int(torch.initial_seed()) % (2**63),
            "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        },
    }


def activity_section(run_id: str, started_utc: str, ended_utc: str | None = None, *,
                     operator: str | None = None, warnings: Iterable[str] = (),
                     command: str | None = None) -> dict[str, Any]:
    """The ``activity`` section (``ended_utc`` defaults to now)."""
    if operator is not None and (len(operator) > 64 or not operator.strip()):
        raise ValueError(
            f"operator id {operator!r} must be a short pseudonymous id (1-64 characters), "
            "not a person's name."
        )
    section = {
        "run_id": safe_name(run_id, "run"),
        "started_utc": started_utc,
        "ended_utc": ended_utc or utc_now(),
        "operator": operator,
        "warnings": [scrub_paths(str(w)) for w in warnings],
    }
    if command:
        section["command"] = command
    return section


def file_ref(root: str | Path, path: str | Path, role: str) -> dict[str, Any]:
    """``{"path", "role", "sha256", "size"}`` of a file, its path relative to ``root``.

    Raises:
        ValueError: the file is not inside ``root`` (records never name outside paths).
    """
    root = Path(root).resolve()
    p = Path(path)
    p = (root / p) if not p.is_absolute() else p
    p = p.resolve()
    try:
        rel = p.relative_to(root)
    except ValueError:
        raise ValueError(
            f"output {p} is not inside the output folder {root}; audit records name only "
            "files inside it."
        ) from None
    return {"path": rel.as_posix(), "role": role, "sha256": sha256_file(p),
            "size": p.stat().st_size}


def build_record(*, scan_id: str, input: Mapping[str, Any], preprocessing: list[dict[str, Any]],
                 model: Mapping[str, Any], method: Mapping[str, Any],
                 runtime: Mapping[str, Any], activity: Mapping[str, Any],
                 outputs: list[dict[str, Any]],
                 analysis: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Assemble an (unsealed) record from its sections; see :func:`seal_record`."""
    record = {
        "schema_version": RECORD_SCHEMA_VERSION,
        "record_type": "icam-med.audit-record",
        "scan_id": safe_name(scan_id),
        "input": dict(input),
        "preprocessing": list(preprocessing),
        "model": dict(model),
        "method": dict(method),
        "runtime": dict(runtime),
        "activity": dict(activity),
        "outputs": list(outputs),
    }
    if analysis is not None:
        record["analysis"] = _jsonable(dict(analysis))
    return record


def record_sha256(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON without ``integrity.record_sha256``."""
    body = dict(record)
    integrity = dict(body.get("integrity") or {})
    integrity.pop("record_sha256", None)
    if "integrity" in body:
        body["integrity"] = integrity
    return sha256_json(body)


def seal_record(record: Mapping[str, Any], sequence: int,
                previous_entry_sha256: str) -> dict[str, Any]:
    """A copy of ``record`` with its ``integrity`` section (ledger position and self-hash)."""
    sealed = dict(record)
    sealed["integrity"] = {
        "algorithm": "SHA-256",
        "sequence": int(sequence),
        "previous_entry_sha256": previous_entry_sha256,
    }
    sealed["integrity"]["record_sha256"] = record_sha256(sealed)
    return sealed


# ---------------------------------------------------------------------------------------
# Reading records: the one typed reader every consumer uses
# ---------------------------------------------------------------------------------------
_KEEP_EVIDENCE = "keep the folder as evidence and run `icam-med verify` on it"
#: A record is a few kilobytes; anything far larger is not one (and is not read whole).
MAX_RECORD_BYTES = 16 * 1024 * 1024


def parse_json_bytes(raw: bytes, *, what: str) -> Any:
    """``json.loads`` that fails with a ``ValueError`` on every bad input (deep nesting too).

    Args:
        raw: the bytes.
        what: how to name the document in the error (``"record x.icam.json"``).
    """
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be JSON written by icam-med") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what} is not valid JSON ({exc})") from None


def resolve_inside(root: str | Path, rel: Any) -> Path | None:
    """``root / rel`` for a relative POSIX path that stays inside ``root``, else ``None``.

    Absolute paths, ``..``, backslashes and NUL in a record or ledger are never followed,
    and neither is a symbolic link (of the file or of any folder on the way) that leads
    outside ``root``: the path is resolved and must still lie inside the resolved root.
    """
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        return None
    if rel.startswith("/") or "\\" in rel or ".." in rel.split("/"):
        return None
    # os.path on strings: verify calls this for every file of a folder, and pathlib's
    # parsing cost as much as the file system look-ups themselves
    try:
        base = os.path.realpath(root)
        joined = os.path.join(base, rel)
        try:
            target = os.path.realpath(joined, strict=True)
        except FileNotFoundError:  # a missing file: the caller says so
            target = os.path.realpath(joined)
    except OSError:  # a symlink loop, a folder that cannot be searched
        return None
    if target != base and not target.startswith(base.rstrip("/") + "/"):
        return None
    return Path(base) / rel


@dataclass(frozen=True)
class OutputRef:
    """One file a record (or ledger entry) names: a path relative to the audit folder,
    what it is, and its fingerprint."""

    path: str
    role: str
    sha256: str
    size: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputRef:
        return cls(str(d["path"]), str(d.get("role", "")), str(d["sha256"]), int(d["size"]))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "role": self.role, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ClassRef:
    """A class by index and label (either may be unknown)."""

    class_index: int | None
    label: str | None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ClassRef:
        d = d or {}
        return cls(d.get("class_index"), d.get("label"))

    @property
    def name(self) -> str | None:
        """The label, else the index as text, else ``None``."""
        if self.label:
            return self.label
        return None if self.class_index is None else str(self.class_index)


@dataclass(frozen=True)
class RecordInput:
    """The record's ``input`` section: what was explained, by content."""

    format: str
    modality: str | None
    voxel_sha256: str
    voxel_dtype: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    orientation: str | None


@dataclass(frozen=True)
class RecordMethod:
    """The record's ``method`` section: how the map was computed and what the model said."""

    name: str
    options: Mapping[str, Any]
    layers: tuple[str, ...]
    layer_weights: Mapping[str, float]
    target: ClassRef
    predicted: ClassRef
    score: float | None
    logits: tuple[float, ...] | None
    map_range: tuple[float, float]
    #: A segmentation target's region (``source``, ``sha256``, ``voxels``...), else ``None``
    #: (records written before regions were recorded have none).
    region: Mapping[str, Any] | None = None
    #: Sliding-window settings and window counts, else ``None``.
    sliding_window: Mapping[str, Any] | None = None

    def ordered_layer_weights(self) -> dict[str, float]:
        """Layer weights in the network's order (records store sorted JSON)."""
        order = [n for n in self.layers if n in self.layer_weights]
        rest = [k for k in self.layer_weights if k not in order]
        return {n: float(self.layer_weights[n]) for n in [*order, *rest]}


@dataclass(frozen=True)
class RecordAnalysis:
    """The record's ``analysis`` section (batch audits only)."""

    expected_label: str | None = None
    disagrees: bool | None = None
    map_stats: Mapping[str, Any] = field(default_factory=dict)
    mask_fraction: float | None = None
    mask_sha256: str | None = None
    mask_volume_fraction: float | None = None
    peak_in_mask: bool | None = None
    intended_use: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class AuditRecord:
    """A sealed audit record, read and validated: the one way to read a ``*.icam.json``.

    Attributes:
        scan_id: the scan's name in the audit folder.
        input: what was explained (voxel hash, format, geometry summary).
        model_name, model_architecture, weights_sha256, labels: the model's identity.
        method: the CAM method, its options, the classes and per-layer weights.
        run_id: the run that wrote it.
        outputs: every file it pins, with its role (``cam_nifti``, ``parametric_map``,
            ``layer_map:<layer>``, ``summary``).
        analysis: batch figures, or ``None``.
        sequence, previous_entry_sha256, record_sha256: its place in the ledger.
        data: the validated JSON object itself (for hashing and for showing whole sections).
        path: the file it was read from, or ``None``.
        root: the folder its paths are relative to (the one holding ``ledger.jsonl``), or
            ``None`` when unknown.
    """

    scan_id: str
    input: RecordInput
    model_name: str
    model_architecture: str
    weights_sha256: str | None
    labels: tuple[str, ...]
    method: RecordMethod
    run_id: str
    outputs: tuple[OutputRef, ...]
    analysis: RecordAnalysis | None
    sequence: int
    previous_entry_sha256: str
    record_sha256: str
    data: Mapping[str, Any] = field(repr=False)
    path: Path | None = None
    root: Path | None = None

    # -- reading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, *, path: str | Path | None = None,
                  root: str | Path | None = None) -> AuditRecord:
        """Validate a parsed record against the schema and type it.

        Raises:
            RecordError: the object is not a record of the schema (names the field).
        """
        if not isinstance(data, dict):
            raise RecordError(
                f"must be a JSON object, found a JSON {type(data).__name__}: the file was "
                f"replaced or damaged; {_KEEP_EVIDENCE}", path=path, field="<record>")
        if not data:
            raise RecordError(f"is empty ({{}}): the file was emptied or replaced; "
                              f"{_KEEP_EVIDENCE}", path=path, field="<record>")
        validate_record(data, path=path)
        inp, geo, model = data["input"], data["input"]["geometry"], data["model"]
        meth, integ = data["method"], data["integrity"]
        analysis = data.get("analysis")
        return cls(
            scan_id=data["scan_id"],
            input=RecordInput(
                format=inp["format"], modality=inp["modality"],
                voxel_sha256=inp["voxel_sha256"], voxel_dtype=inp["voxel_dtype"],
                shape=tuple(int(s) for s in geo["shape"]),
                spacing=None if geo["spacing"] is None else tuple(float(s) for s in geo["spacing"]),
                orientation=geo["orientation"]),
            model_name=model["name"], model_architecture=model["architecture"],
            weights_sha256=model["weights_sha256"], labels=tuple(model["labels"]),
            method=RecordMethod(
                name=meth["name"], options=dict(meth["options"]), layers=tuple(meth["layers"]),
                layer_weights={str(k): float(v) for k, v in meth["layer_weights"].items()},
                target=ClassRef.from_dict(meth["target"]),
                predicted=ClassRef.from_dict(meth["predicted"]),
                score=None if meth["score"] is None else float(meth["score"]),
                logits=tuple(float(v) for v in meth["logits"]) if "logits" in meth else None,
                map_range=(float(meth["map_range"][0]), float(meth["map_range"][1])),
                region=(dict(meth["target"]["region"])
                        if isinstance(meth["target"].get("region"), dict) else None),
                sliding_window=(dict(meth["sliding_window"])
                                if isinstance(meth.get("sliding_window"), dict) else None)),
            run_id=data["activity"]["run_id"],
            outputs=tuple(OutputRef.from_dict(o) for o in data["outputs"]),
            analysis=None if analysis is None else RecordAnalysis(
                expected_label=analysis.get("expected_label"),
                disagrees=analysis.get("disagrees"),
                map_stats=dict(analysis.get("map_stats") or {}),
                mask_fraction=analysis.get("mask_fraction"),
                mask_sha256=analysis.get("mask_sha256"),
                mask_volume_fraction=analysis.get("mask_volume_fraction"),
                peak_in_mask=analysis.get("peak_in_mask"),
                intended_use=analysis.get("intended_use")),
            sequence=integ["sequence"], previous_entry_sha256=integ["previous_entry_sha256"],
            record_sha256=integ["record_sha256"],
            data=data, path=Path(path) if path is not None else None,
            root=Path(root) if root is not None else None,
        )

    @classmethod
    def from_bytes(cls, raw: bytes, *, path: str | Path | None = None,
                   root: str | Path | None = None) -> AuditRecord:
        """Parse and validate a record's bytes (see :meth:`load`)."""
        if len(raw) > MAX_RECORD_BYTES:
            raise RecordError(f"is over {MAX_RECORD_BYTES} bytes, far too large for an audit "
                              f"record: it was replaced or damaged; {_KEEP_EVIDENCE}",
                              path=path, field="<record>")
        try:
            data = parse_json_bytes(raw, what="the file")
        except ValueError as exc:
            raise RecordError(f"{exc}; {_KEEP_EVIDENCE}", path=path, field="<record>") from None
        return cls.from_dict(data, path=path, root=root)

    @classmethod
    def load(cls, path: str | Path, *, root: str | Path | None = None) -> AuditRecord:
        """Read, validate against the JSON Schema and type one record file.

        Args:
            path: the ``*.icam.json`` file.
            root: the audit folder its paths are relative to; by default it is inferred
                from where the record lies and where its map says it lies (the map and its
                record are always side by side).

        Raises:
            RecordError: the file is missing, unreadable, not JSON, not an object, empty or
                not a record of the schema; the message names the file and the field.
        """
        p = Path(path)
        try:
            with open(p, "rb") as fh:
                raw = fh.read(MAX_RECORD_BYTES + 1)
        except OSError as exc:
            raise RecordError(f"cannot be read ({exc.strerror or exc})", path=p,
                              field="<record>") from None
        record = cls.from_bytes(raw, path=p, root=root)
        if root is None:
            record = replace(record, root=record._infer_root())
        return record

    @classmethod
    def load_inside(cls, root: str | Path, rel: Any) -> AuditRecord:
        """:meth:`load` the record a ledger names by ``rel``, inside ``root`` only (see
        :func:`resolve_inside`).

        Raises:
            RecordError: the path leaves ``root``, or the file is not a valid record.
        """
        path = resolve_inside(root, rel)
        if path is None:
            raise RecordError(f"path {rel!r} leaves the audit folder (not a relative path "
                              "inside it)",
                              path=rel, field="record.path")
        return cls.load(path, root=root)

    def _infer_root(self) -> Path | None:
        """The folder the record's paths are relative to: its own folder, less as many
        levels as its outputs' relative paths have folders (``scans/x/cam.nii.gz`` -> two;
        a record always lies beside its outputs)."""
        if self.path is None or not self.outputs:
            return None
        parents = PurePosixPath(self.outputs[0].path).parts[:-1]
        folder = self.path.absolute().parent
        for name in reversed(parents):
            if folder.name != name:
                return None  # the record was moved away from the layout it names
            folder = folder.parent
        return folder

    # -- using -----------------------------------------------------------------------------
    def output(self, role: str) -> OutputRef | None:
        """The output with this role (``cam_nifti``, ``parametric_map``, ``summary``...)."""
        return next((o for o in self.outputs if o.role == role), None)

    @property
    def map_ref(self) -> OutputRef | None:
        """The fused map (role ``cam_nifti``)."""
        return self.output("cam_nifti")

    @property
    def layer_refs(self) -> dict[str, OutputRef]:
        """Layer name -> its map (roles ``layer_map:<layer>``), in the record's order."""
        return {o.role.split(":", 1)[1]: o for o in self.outputs
                if o.role.startswith("layer_map:")}

    def file(self, ref: OutputRef | str | None) -> Path | None:
        """Where an output lies on disk, resolved inside :attr:`root` (symlinks included);
        ``None`` when the root is unknown or the path would leave it."""
        if ref is None or self.root is None:
            return None
        rel = ref.path if isinstance(ref, OutputRef) else ref
        return resolve_inside(self.root, rel)

    @property
    def map_path(self) -> Path | None:
        """The fused map's file (see :meth:`file`)."""
        return self.file(self.map_ref)

    def self_hash_ok(self) -> bool:
        """Whether the record still hashes to its own ``integrity.record_sha256``."""
        return record_sha256(self.data) == self.record_sha256
