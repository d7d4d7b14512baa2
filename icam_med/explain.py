"""Where I/O, model, engine and audit meet: explain one scan.

Three steps, so callers can reuse the expensive parts:

* :func:`prepare` - load the model and build the preprocessing once (reuse over many scans);
* :func:`explain_volume` - in memory: preprocess a loaded scan, run the CAM engine, carry
  the map(s) back onto the scan's own grid; returns an :class:`Explanation` (used by the
  batch runner and the napari widget);
* :func:`write_explanation` - write the NIfTI map (+ DICOM Parametric Map for DICOM input,
  + layer maps on request) and a JSON summary, atomically and without overwriting, then
  seal them with an audit record and a ledger entry. It is two steps a batch splits over
  processes: :func:`write_outputs` (a worker writes the files into the scan's folder) and
  :func:`seal_outputs` (the coordinator re-hashes them, writes the record, appends the
  ledger).

:func:`explain_scan` does all three for one scan path (the ``icam-med explain`` command).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from icam_med._version import __version__
from icam_med.audit.hashing import sha256_file
from icam_med.audit.ledger import FolderLock
from icam_med.audit.signing import check_key_outside, load_signing_key, sign_head
from icam_med.audit.trail import (
    AuditContext,
    Provenance,
    audit_root,
    check_before_writing,
    provenance,
    record_explanation,
)
from icam_med.cam.summary import CAMSummary, MapStatistics, map_statistics
from icam_med.config import ICAMConfig, load_config
from icam_med.io.loading import ScanInfo, load_volume
from icam_med.io.preprocessing import Preprocessor
from icam_med.io.validation import GeometryOptions
from icam_med.models import ModelInfo, check_input_contract, load_model
from icam_med.paths import MAP_STEM, is_nifti, output_paths

__all__ = [
    "SUMMARY_SCHEMA_VERSION",
    "Explanation",
    "Prepared",
    "WrittenFile",
    "explain_scan",
    "explain_volume",
    "output_paths",
    "prepare",
    "seal_outputs",
    "write_explanation",
    "write_outputs",
]

log = logging.getLogger(__name__)

SUMMARY_SCHEMA_VERSION = 1


@dataclass
class Prepared:
    """A loaded model, its preprocessing and its default CAM, reusable over many scans."""

    config: ICAMConfig
    model: torch.nn.Module
    model_info: ModelInfo
    preprocessor: Preprocessor
    device: torch.device
    _cams: dict[str, Any] = field(default_factory=dict, repr=False)

    def cam(self, method: str | None = None, options: Mapping[str, Any] | None = None) -> Any:
        """The CAM object for ``method`` (default: the config's) with the config's options
        overridden by ``options``; built once per distinct (method, options)."""
        from icam_med.cam import make_cam

        name = method or self.config.method.name
        opts = dict(self.config.method.options) if name == self.config.method.name else {}
        opts.update(options or {})
        key = json.dumps([name, opts], sort_keys=True, default=str)
        if key not in self._cams:
            self._cams[key] = make_cam(name, self.model, **opts)
        return self._cams[key]


def prepare(config: ICAMConfig | str | Path, device: str | torch.device = "cpu") -> Prepared:
    """Load the configured model (hash-checked) and build its preprocessing.

    Args:
        config: an :class:`~icam_med.config.ICAMConfig` or a path to a YAML config.
        device: where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).

    Raises:
        FileNotFoundError, ValueError: bad config, weights or preprocessing (named).
    """
    cfg = config if isinstance(config, ICAMConfig) else load_config(config)
    dev = torch.device(device)
    where = f"config {cfg.path}" if cfg.path else "config"
    GeometryOptions.from_mapping(cfg.geometry)  # refuse unknown geometry options up front
    preprocessor = Preprocessor(cfg.preprocessing, source=where)
    model, info = load_model(cfg.model, dev)
    prepared = Prepared(cfg, model, info, preprocessor, dev)
    prepared.cam()  # validate the method and its options now, before any scan is read
    return prepared


@dataclass
class Explanation:
    """An explanation of one scan, in memory.

    Attributes:
        fused: the fused map on the scan's grid, a float32 MetaTensor ``(1, X, Y, Z)`` in
            [0, 1] with exactly the scan's affine.
        layer_maps: layer name -> map on the scan's grid (only when requested).
        scan_info: the scan's :class:`~icam_med.io.ScanInfo`.
        result: the engine's :class:`~icam_med.cam.summary.CAMSummary` (method, options,
            target/predicted class, scores, logits, probabilities, per-layer weights and
            relevance).
        preprocessing: each preprocessing transform with its parameters.
        model_info: identity of the model (architecture, weights hash...).
        timing: seconds spent in ``preprocess``, ``cam``, ``invert`` and ``total``.
        labels: class labels from the config (may be empty).
        config_path: the config file, if any.
        cam_result: the engine's :class:`~icam_med.cam.CAMResult` on the CPU (maps at the
            model's input / layer resolution), for viewers that want them.
        preprocessed: the preprocessed image (model input grid), a MetaTensor.
        provenance: what the audit record needs (voxel hash, start time, device); ``None``
            for an explanation built by hand, which cannot be audited.
        map_range: the fused map's ``(min, max)``, kept when the map itself was dropped
            (a batch worker wrote it and sends the rest back to be sealed).
    """

    fused: Any
    layer_maps: dict[str, Any]
    scan_info: ScanInfo
    result: CAMSummary
    preprocessing: list[dict[str, Any]]
    model_info: ModelInfo
    timing: dict[str, float]
    labels: tuple[str, ...] = ()
    config_path: Path | None = None
    cam_result: Any = field(default=None, repr=False)
    preprocessed: Any = field(default=None, repr=False)
    provenance: Provenance | None = field(default=None, repr=False)
    map_range: tuple[float, float] | None = None

    def value_range(self) -> tuple[float, float]:
        """The fused map's ``(min, max)`` (from the map, or :attr:`map_range` once dropped).

        Raises:
            ValueError: neither the map nor its range is held.
        """
        if self.fused is not None:
            return float(self.fused.min()), float(self.fused.max())
        if self.map_range is None:
            raise ValueError("this explanation holds neither its fused map nor its range.")
        return self.map_range

    def drop_maps(self) -> None:
        """Free the maps once written, keeping what the record needs (their range)."""
        self.map_range = self.value_range()
        self.fused, self.layer_maps = None, {}
        self.cam_result = self.preprocessed = None

    @property
    def target_label(self) -> str | None:
        return self.result.label(self.labels, self.result.target_class)

    @property
    def predicted_label(self) -> str | None:
        return self.result.label(self.labels, self.result.predicted_class)

    def map_statistics(self) -> MapStatistics:
        """Peak (voxel index and RAS world mm), range, mean and centroid of the fused map
        (:func:`icam_med.cam.summary.map_statistics`)."""
        return map_statistics(self.fused, self.scan_info.affine)

    def to_dict(self) -> dict[str, Any]:
        """The JSON summary (no patient identifiers, no raw UIDs or paths)."""
        result = self.result.to_dict()
        result["target_label"] = self.target_label
        result["predicted_label"] = self.predicted_label
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "tool": {"name": "icam-med", "version": __version__},
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "scan": self.scan_info.to_dict(),
            "model": self.model_info.to_dict(),
            "config_sha256": (sha256_file(self.config_path)
                              if self.config_path and Path(self.config_path).is_file() else None),
            "preprocessing": self.preprocessing,
            "result": result,
            "map": self.map_statistics().summary_dict(),
            "layer_maps_on_scan_grid": sorted(self.layer_maps),
            "timing_s": {k: round(v, 4) for k, v in self.timing.items()},
        }


def _resolve_targets(targets: Any, labels: Sequence[str]) -> Any:
    """Let users name a class by its label (``"present"``) as well as by its index."""
    if isinstance(targets, str):
        if targets.lstrip("-").isdigit():
            return int(targets)
        if targets in labels:
            return list(labels).index(targets)
        raise ValueError(
            f"target '{targets}' is not a class label of this model; labels are {list(labels)} "
            "(or give a class index)."
        )
    return targets


def explain_volume(
    image: Any,
    scan_info: ScanInfo,
    prepared: Prepared,
    *,
    method: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    targets: Any = None,
    layer_maps: bool = False,
) -> Explanation:
    """Explain one loaded scan, in memory.

    Args:
        image: the MetaTensor from :func:`icam_med.io.load_volume`.
        scan_info: its :class:`~icam_med.io.ScanInfo`.
        prepared: from :func:`prepare`.
        method: CAM method (default: the config's); ``method_options`` override options.
        targets: ``None`` (predicted class), a class index or label, or a callable.
        layer_maps: also carry each layer's map back onto the scan's grid.

    Returns:
        The :class:`Explanation`; the fused map has the scan's shape and affine exactly.

    Raises:
        ValueError: the preprocessed image does not fit the model, or the preprocessing
            cannot be inverted.
    """
    prov = provenance(image, device=prepared.device, audit_config=prepared.config.audit,
                      config_path=prepared.config.path)  # for the audit record
    t0 = time.perf_counter()
    pre = prepared.preprocessor
    x = pre(image)
    check_input_contract(prepared.model_info, tuple(x.shape), source=str(scan_info.path))
    t1 = time.perf_counter()
    cam = prepared.cam(method, method_options)
    dtype = getattr(torch, prepared.model_info.dtype, torch.float32)
    batch = x.as_tensor().unsqueeze(0).to(device=prepared.device, dtype=dtype)
    result = cam(batch, targets=_resolve_targets(targets, prepared.model_info.labels)).cpu()
    t2 = time.perf_counter()
    fused = pre.invert(result.fused[0], x, source_shape=scan_info.shape,
                       source_affine=scan_info.affine).clamp_(0.0, 1.0)
    back_layers = {}
    if layer_maps:
        size = tuple(x.shape[1:])
        for name, m in result.layer_maps.items():
            mode = "trilinear" if m.ndim == 5 else "bilinear"
            up = torch.nn.functional.interpolate(m.float(), size=size, mode=mode,
                                                 align_corners=False)[0]
            back_layers[name] = pre.invert(up, x, source_shape=scan_info.shape,
                                           source_affine=scan_info.affine).clamp_(0.0, 1.0)
    t3 = time.perf_counter()
    return Explanation(
        fused=fused,
        layer_maps=back_layers,
        scan_info=scan_info,
        result=CAMSummary.from_result(result),
        preprocessing=pre.describe(),
        model_info=prepared.model_info,
        timing={"preprocess": t1 - t0, "cam": t2 - t1, "invert": t3 - t2, "total": t3 - t0},
        labels=tuple(prepared.model_info.labels),
        config_path=prepared.config.path,
        cam_result=result,
        preprocessed=x,
        provenance=prov,
    )


@dataclass(frozen=True)
class WrittenFile:
    """One output file: where, what it is, and its fingerprint."""

    path: Path
    role: str      # "cam_nifti", "parametric_map", "layer_map:<name>", "summary"
    sha256: str
    size: int

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "role": self.role, "sha256": self.sha256,
                "size": self.size}


def _refuse_existing(paths: Mapping[str, Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [p for p in paths.values() if p.exists()]
    if existing:
        raise FileExistsError(
            f"output file {existing[0]} already exists ({len(existing)} of this run's outputs "
            "do); choose another --out folder or pass --overwrite to replace them."
        )


def write_explanation(explanation: Explanation, out_dir: str | Path, *, overwrite: bool = False,
                      stem: str = MAP_STEM, audit: AuditContext | None = None) -> list[WrittenFile]:
    """Write an explanation's maps and JSON summary into ``out_dir``, and seal them.

    Writes ``{stem}.nii.gz`` (fused map, source affine), ``{stem}_parametric_map.dcm`` for
    DICOM input (when the source has plane positions), ``{stem}_layer_<layer>.nii.gz`` per
    layer map present, and ``{stem}_summary.json`` listing every output with its SHA-256.
    Each file is written atomically; if any write fails, the files this call already wrote
    are removed again, so a failed run leaves nothing behind.

    Last, the audit record ``{stem}.icam.json`` is written and logged in the output
    folder's ``ledger.jsonl`` (see :mod:`icam_med.audit.trail`; ``audit`` picks the ledger
    folder, run and scan names). This is :func:`write_outputs` then :func:`seal_outputs`
    under the folder's lock.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is False (checked before writing),
            the map already has an audit record, an output is a file the ledger pins (never
            replaced), or another icam-med process is writing into the folder.
    """
    info = explanation.scan_info
    paths = output_paths(out_dir, is_dicom=info.format == "dicom",
                         layer_names=list(explanation.layer_maps), stem=stem)
    check_before_writing(paths["cam_nifti"], audit, list(paths.values()))
    _refuse_existing(paths, overwrite)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    root = audit_root(paths["cam_nifti"], audit)
    # The folder's lock (the one `audit` holds for a whole run), from the last check to the
    # ledger entry: two writers into one folder cannot both pass the checks, and the one
    # refused has written nothing, so its clean-up can never remove the other's outputs.
    held = audit is not None and audit.lock is not None and audit.lock.covers(root)
    # A write on its own is a run: its head is signed with the site's key, if one is
    # configured (a batch signs once, at the end of its run).
    signing_key = None if held else _signing_key(explanation, root)
    with contextlib.nullcontext() if held else FolderLock(root):
        check_before_writing(paths["cam_nifti"], audit, list(paths.values()))
        written = _write_files(explanation, paths, overwrite)
        try:
            entry, record_path = _seal(explanation, written, paths["cam_nifti"], audit)
        except BaseException:
            for w in written:
                w.path.unlink(missing_ok=True)
            raise
        if signing_key is not None:
            sign_head(root, signing_key, entry.run_id, entry.seq, entry.sha256)
        return [*written, _written(record_path, "audit_record")]


def write_outputs(explanation: Explanation, out_dir: str | Path, *, stem: str = MAP_STEM,
                  audit: AuditContext | None = None) -> list[WrittenFile]:
    """Write an explanation's maps and JSON summary into ``out_dir``; no record, no ledger.

    What a batch worker does (in this process, a local process or on a Dask worker, onto
    the shared file system): every file is written atomically (a temporary file in
    ``out_dir``, fsynced, renamed), never over an existing one, and a failure removes what
    this call wrote. The files are not evidence until :func:`seal_outputs` has re-hashed
    them and logged them: a worker killed here leaves at most unlogged files, which
    ``verify`` reports and the next run removes.

    Args:
        explanation: from :func:`explain_volume`.
        out_dir: the scan's output folder.
        stem: the outputs' stem.
        audit: the audit context the files will be sealed under (its ``root`` holds the
            ledger, read here only to refuse outputs it already records).

    Returns:
        The files written (name, role, SHA-256, size) for :func:`seal_outputs`.

    Raises:
        FileExistsError: the map already has a record, or an output exists already (both
            checked before writing).
    """
    paths = output_paths(out_dir, is_dicom=explanation.scan_info.format == "dicom",
                         layer_names=list(explanation.layer_maps), stem=stem)
    check_before_writing(paths["cam_nifti"], audit, list(paths.values()))
    _refuse_existing(paths, overwrite=False)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return _write_files(explanation, paths, overwrite=False)


def seal_outputs(explanation: Explanation, written: Sequence[WrittenFile], out_dir: str | Path,
                 *, audit: AuditContext | None = None) -> tuple[list[WrittenFile], Any]:
    """Check files another process wrote into ``out_dir``, then record and log them.

    The coordinator's part of a batch: each file in ``written`` must still be in
    ``out_dir`` (a plain file, no link) with the size and SHA-256 its writer reported;
    only then is the audit record written and the ledger appended. The caller holds the
    folder's lock (``audit.lock``), else it is taken here.

    Args:
        explanation: the explanation (its maps may have been dropped: see
            :meth:`Explanation.drop_maps`).
        written: what :func:`write_outputs` returned (only file names are used: the files
            are looked up in ``out_dir``).
        out_dir: the scan's output folder.
        audit: the audit context.

    Returns:
        ``(every file including the record, ledger entry)``.

    Raises:
        ValueError: a file is missing, a link, or differs from what its writer reported
            (nothing is recorded then).
        FileExistsError: the map already has a record.
    """
    folder = Path(out_dir)
    files = [replace(w, path=folder / Path(w.path).name) for w in written]
    by_role = {w.role: w for w in files}
    if "cam_nifti" not in by_role:
        raise ValueError(f"no fused map among the outputs to seal in {folder}.")
    map_path = by_role["cam_nifti"].path
    root = audit_root(map_path, audit)
    held = audit is not None and audit.lock is not None and audit.lock.covers(root)
    with contextlib.nullcontext() if held else FolderLock(root):
        check_before_writing(map_path, audit)
        for w in files:
            _check_written(w)
        entry, record_path = _seal(explanation, files, map_path, audit)
    return [*files, _written(record_path, "audit_record")], entry


def _check_written(w: WrittenFile) -> None:
    """Refuse a file that is not, byte for byte, what its writer reported."""
    p = w.path
    if p.is_symlink() or not p.is_file():
        raise ValueError(f"output {p} ({w.role}) is missing or not a plain file; its writer "
                         "reported it written. Nothing was recorded for this scan.")
    size = p.stat().st_size
    if size != w.size or sha256_file(p) != w.sha256:
        raise ValueError(
            f"output {p} ({w.role}) changed between its write and the seal (size {size}, "
            f"reported {w.size}; or its SHA-256 differs from the writer's): refusing to record "
            "it. Nothing was recorded for this scan; audit it again.")


def _written(path: Path, role: str) -> WrittenFile:
    return WrittenFile(path, role, sha256_file(path), path.stat().st_size)


def _signing_key(explanation: Explanation, root: Path) -> Any:
    """The configured signing key (checked before anything is written), or ``None``."""
    prov = explanation.provenance
    if prov is None:
        return None
    key = load_signing_key(dict(prov.audit_config), base_dir=prov.config_dir)
    check_key_outside(key, root)
    return key


def _write_files(explanation: Explanation, paths: Mapping[str, Path],
                 overwrite: bool) -> list[WrittenFile]:
    """Write the maps and the JSON summary (each atomically); on failure remove them."""
    from icam_med.io.atomic import atomic_write_text
    from icam_med.io.writers import write_nifti, write_parametric_map

    info = explanation.scan_info
    written: list[WrittenFile] = []
    notes: list[str] = []

    def record(path: Path, role: str) -> None:
        written.append(_written(path, role))

    method = explanation.result.method
    desc = f"icam-med {__version__} {method} CAM"
    try:
        write_nifti(explanation.fused, paths["cam_nifti"], reference=info, description=desc,
                    overwrite=overwrite)
        record(paths["cam_nifti"], "cam_nifti")
        if "parametric_map" in paths:
            try:
                write_parametric_map(
                    explanation.fused, info, paths["parametric_map"], method=method,
                    parameters=dict(explanation.result.options),
                    target_label=explanation.target_label, overwrite=overwrite)
                record(paths["parametric_map"], "parametric_map")
            except ValueError as exc:  # e.g. a multi-frame source without plane positions
                log.warning("no Parametric Map written: %s", exc)
                notes.append(f"no Parametric Map written: {exc}")
        for name, layer_map in explanation.layer_maps.items():
            role = f"layer_map:{name}"
            write_nifti(layer_map, paths[role], reference=info,
                        description=f"{desc} layer {name}", overwrite=overwrite)
            record(paths[role], role)
        summary = explanation.to_dict()
        summary["outputs"] = [w.to_dict() for w in written]
        summary["notes"] = notes
        atomic_write_text(paths["summary"], json.dumps(summary, indent=2, sort_keys=False) + "\n",
                          overwrite=overwrite)
        record(paths["summary"], "summary")
    except BaseException:
        for w in written:
            w.path.unlink(missing_ok=True)
        raise
    return written


def _seal(explanation: Explanation, written: Sequence[WrittenFile], map_path: Path,
          audit: AuditContext | None) -> tuple[Any, Path]:
    """The audit seam: the record (listing every file written) and its ledger entry."""
    _, entry, record_path = record_explanation(explanation, written, map_path, audit)
    return entry, record_path


def explain_scan(
    scan_path: str | Path,
    config: ICAMConfig | str | Path | Prepared,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    series_uid: str | None = None,
    volume_index: int | None = None,
    method: str | None = None,
    method_options: Mapping[str, Any] | None = None,
    targets: Any = None,
    layer_maps: bool = False,
    overwrite: bool = False,
) -> tuple[Explanation, list[WrittenFile]]:
    """Load, validate, explain and write one scan.

    Everything that can be checked is checked before any output is written: the config,
    the model weights, the scan's geometry, and that no output would be overwritten.

    Returns:
        The :class:`Explanation` and the files written.
    """
    is_dicom_guess = Path(scan_path).is_dir() or not is_nifti(scan_path)
    planned = output_paths(out_dir, is_dicom=is_dicom_guess)
    _refuse_existing(planned, overwrite)
    check_before_writing(planned["cam_nifti"], None)  # audited outputs: refused even now
    prepared = config if isinstance(config, Prepared) else prepare(config, device)
    image, info = load_volume(scan_path, series_uid=series_uid, volume_index=volume_index,
                              geometry=prepared.config.geometry)
    explanation = explain_volume(image, info, prepared, method=method,
                                 method_options=method_options, targets=targets,
                                 layer_maps=layer_maps)
    written = write_explanation(explanation, out_dir, overwrite=overwrite)
    return explanation, written

