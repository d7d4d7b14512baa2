"""The audit seam of :mod:`icam_med.explain`: one record and one ledger entry per map.

:func:`icam_med.explain.write_explanation` calls :func:`check_before_writing` before it
writes anything and :func:`record_explanation` after the last output is written, so the
``explain`` command, the batch runner and any other caller of ``write_explanation`` leave
the same audit trail. Callers choose the ledger folder, run, scan name and extra analysis
with an :class:`AuditContext`; the default logs into the map's own folder.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icam_med.audit.ledger import FolderLock, Ledger, LedgerEntry
from icam_med.audit.phi import SiteKey, identifiers_from_scan, load_site_key
from icam_med.audit.record import (
    activity_section,
    build_record,
    input_from_scan,
    method_section,
    model_section,
    preprocessing_section,
    runtime_section,
    safe_name,
    utc_now,
    voxel_digest,
)
from icam_med.paths import record_path_for

__all__ = ["AuditContext", "Provenance", "audit_root", "check_before_writing", "provenance",
           "record_explanation", "record_path_for"]

_UNSET: Any = object()


@dataclass(frozen=True)
class AuditContext:
    """Who, where and why, for the records of one run.

    Attributes:
        root: the output folder holding ``ledger.jsonl``; record and output paths are
            relative to it. Default: the folder the map is written to.
        run_id: the run's id (default: a new random id per record).
        scan_id: the scan's name in the folder (default: the map folder's name).
        operator: a pseudonymous operator id, if the user gave one.
        command: the command producing the record (``explain``, ``audit``...).
        site_key: the key for UID hashes; by default it is read from the config's ``audit``
            section or the environment (see :func:`icam_med.audit.phi.load_site_key`).
        seed: the random seed in effect, if one was set.
        analysis: the record's ``analysis`` section (batch audits).
        warnings: warnings to record beside the scan's own.
        lock: the folder's :class:`~icam_med.audit.FolderLock`, when the caller holds it
            already (the batch runner, for its whole run); otherwise the writer takes it.
        identifiers: the scan's identifying header values, when the caller has them
            already (a batch worker reads them as it loads the scan and sends them back):
            the record is screened for them. ``None``: read them from the scan's headers
            again (:func:`~icam_med.audit.phi.identifiers_from_scan`: 20 ms a 91-slice series
            on the loaded VM, more than any other step of a seal but the fsyncs).
    """

    root: Path | None = None
    run_id: str | None = None
    scan_id: str | None = None
    operator: str | None = None
    command: str = "explain"
    site_key: SiteKey | None = _UNSET
    seed: int | None = None
    analysis: Mapping[str, Any] | None = None
    warnings: Sequence[str] = field(default_factory=tuple)
    lock: FolderLock | None = field(default=None, repr=False, compare=False)
    identifiers: tuple[str, ...] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Provenance:
    """What the record needs from the moment a scan is explained.

    Attributes:
        voxel_sha256, voxel_dtype: the loaded volume's voxel hash (before preprocessing).
        started_utc: when explaining started.
        device: where the model ran.
        audit_config: the config's ``audit`` section (site key location...).
        config_dir: the config file's folder (relative key paths start there).
    """

    voxel_sha256: str
    voxel_dtype: str
    started_utc: str
    device: str
    audit_config: Mapping[str, Any] = field(default_factory=dict)
    config_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"voxel_sha256": self.voxel_sha256, "voxel_dtype": self.voxel_dtype,
                "started_utc": self.started_utc, "device": self.device,
                "audit_config": dict(self.audit_config), "config_dir": self.config_dir}


def provenance(image: Any, *, device: Any, audit_config: Mapping[str, Any] | None,
               config_path: Path | None) -> Provenance:
    """The :class:`Provenance` of a scan being explained now: the voxel hash of the loaded
    volume (before preprocessing), the start time, the device and audit settings."""
    digest, dtype = voxel_digest(image)
    return Provenance(
        voxel_sha256=digest, voxel_dtype=dtype, started_utc=utc_now(), device=str(device),
        audit_config=dict(audit_config or {}),
        config_dir=str(Path(config_path).parent) if config_path else None,
    )


def _root(ctx: AuditContext, map_path: Path) -> Path:
    return Path(ctx.root) if ctx.root is not None else map_path.parent


def audit_root(map_path: str | Path, ctx: AuditContext | None = None) -> Path:
    """The folder whose ledger logs ``map_path`` (``ctx.root``, else the map's folder)."""
    return _root(ctx or AuditContext(), Path(map_path))


def check_before_writing(map_path: str | Path, ctx: AuditContext | None = None,
                         outputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any output is written, what would end in a broken audit trail.

    Args:
        map_path: the fused map about to be written.
        ctx: the audit context (its ``root`` holds the ledger).
        outputs: every file about to be written (or overwritten); none may be a file the
            ledger pins.

    Raises:
        FileExistsError: the map already has a record, or an output is a file a ledger
            entry pins: audited outputs are never replaced (not even with ``overwrite``),
            since the ledger pins their hashes.
        ValueError: the map would lie outside the ledger's folder.
    """
    ctx = ctx or AuditContext()
    map_path = Path(map_path)
    root = _root(ctx, map_path).resolve()
    record = record_path_for(map_path)
    if not map_path.resolve().is_relative_to(root):
        raise ValueError(f"map {map_path} is outside the audit folder {root}.")
    if record.exists():
        raise FileExistsError(
            f"{record} exists: these outputs are already recorded in {root / 'ledger.jsonl'}, "
            "and replacing them would break the audit trail. Write to a new output folder."
        )
    planned = [Path(p).resolve() for p in (map_path, *outputs)]
    planned = [p for p in planned if p.exists() and p.is_relative_to(root)]
    if planned:
        pinned = Ledger(root).referenced_paths()
        hit = next((p for p in planned if p.relative_to(root).as_posix() in pinned), None)
        if hit is not None:
            raise FileExistsError(
                f"{hit} is pinned by an entry of {root / 'ledger.jsonl'}: audited outputs are "
                "never replaced, not even with --overwrite. Write to a new output folder."
            )


def record_explanation(explanation: Any, written: Sequence[Any], map_path: str | Path,
                       ctx: AuditContext | None = None) -> tuple[dict[str, Any], LedgerEntry, Path]:
    """Build, check and write the record of one explanation and log it in the ledger.

    Args:
        explanation: an :class:`icam_med.explain.Explanation` (with ``provenance``).
        written: the files written for it (``WrittenFile``: path, role, sha256, size).
        map_path: the fused map; the record goes beside it (:func:`record_path_for`).
        ctx: the audit context.

    Returns:
        ``(record, ledger entry, record path)``.

    Raises:
        ValueError: the record would carry patient identifiers or break the schema
            (nothing is written then).
    """
    ctx = ctx or AuditContext()
    map_path = Path(map_path)
    root = _root(ctx, map_path).resolve()
    prov = getattr(explanation, "provenance", None)
    if not isinstance(prov, Provenance):
        raise ValueError(
            "this explanation carries no provenance (voxel hash, start time, device), so no "
            "audit record can be written for it; build it with icam_med.explain.explain_volume."
        )
    site_key = ctx.site_key
    if site_key is _UNSET:
        site_key = load_site_key(dict(prov.audit_config), base_dir=prov.config_dir)
    info = explanation.scan_info
    result = explanation.result
    outputs = [
        {"path": Path(w.path).resolve().relative_to(root).as_posix(), "role": w.role,
         "sha256": w.sha256, "size": int(w.size)}
        for w in written
    ]
    record = build_record(
        scan_id=ctx.scan_id or safe_name(map_path.parent.name),
        input=input_from_scan(info, voxel_hash=prov.voxel_sha256,
                              voxel_dtype=prov.voxel_dtype, site_key=site_key),
        preprocessing=preprocessing_section(explanation.preprocessing),
        model=model_section(explanation.model_info),
        method=method_section(
            result.method, result.options,
            layer_weights=result.layer_weights,
            target_class=result.target_class, score=result.score,
            predicted_class=result.predicted_class,
            map_range=explanation.value_range(),
            labels=explanation.labels, logits=result.logits,
            region=getattr(explanation, "region_info", None),
            sliding_window=getattr(explanation, "sliding_window", None)),
        runtime=runtime_section(prov.device, seed=ctx.seed),
        activity=activity_section(
            ctx.run_id or uuid.uuid4().hex, prov.started_utc, operator=ctx.operator,
            warnings=[*info.warnings, *ctx.warnings], command=ctx.command),
        outputs=outputs,
        analysis=ctx.analysis,
    )
    path = record_path_for(map_path.resolve())
    identifiers = ctx.identifiers if ctx.identifiers is not None \
        else identifiers_from_scan(info)
    sealed, entry = Ledger(root).commit_record(record, path, identifiers=tuple(identifiers))
    return sealed, entry, path
