"""Batch audits: explain many scans into one audited output folder, resumably.

::

    from icam_med.batch import run_batch
    result = run_batch(["scans.csv"], "configs/demo.yaml", "runs/audit")            # local
    result = run_batch(["scans/"], cfg, out, workers=4)                              # processes
    result = run_batch(["scans/"], cfg, out, cluster="tcp://scheduler:8786")         # Dask

Folder layout (docs/audit.md)::

    OUT/ledger.jsonl                   hash-chained log: run-start, scan, failure, run-end
    OUT/summary.csv                    one row per scan (rebuilt from the ledger every run)
    OUT/.icam-med.lock                 flock held while a run is active
    OUT/scans/<scan_id>/cam.nii.gz     fused map on the scan's grid (+ DICOM Parametric Map,
    OUT/scans/<scan_id>/cam.icam.json  JSON summary) and its audit record

How work is split: workers (this process, local processes or Dask workers) load and
explain scans, each worker preparing the model once and keeping it, and write their scan's
outputs (maps, Parametric Map, JSON summary) into ``OUT/scans/<scan_id>/`` themselves,
each file atomically (temporary file in that folder, fsync, rename). The coordinating
process only re-hashes those files against what the worker reported, writes the record
and appends the ledger, one scan at a time, so the chain stays linear. Workers therefore
need the scans, the weights and the output folder at the same paths (a shared file
system).

Resuming: a scan is done when the ledger holds its ``scan`` entry, all its files still
verify and the scan given now still has the voxel SHA-256 its record pins (a changed scan
under an old id is refused, not skipped; so is a scan whose target region mask changed: the
mask's voxel SHA-256 is compared with the record's). A re-run skips exactly those, removes what an interrupted run left of the others
(files no entry names) and redoes them. A scan whose logged outputs no longer verify is
never overwritten (it is evidence): it is reported as failed.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from icam_med._version import __version__
from icam_med._worker import host_name, init_worker, share_cores
from icam_med.audit import (
    AuditRecord,
    Ledger,
    LedgerEntry,
    RecordError,
    sha256_file,
    verify_folder,
    voxel_sha256,
)
from icam_med.audit.intended_use import IntendedUse, card_beside
from icam_med.audit.ledger import FolderLock
from icam_med.audit.phi import identifiers_from_scan, load_site_key
from icam_med.audit.record import RecordAnalysis
from icam_med.audit.signing import check_key_outside, load_signing_key, sign_head
from icam_med.audit.trail import AuditContext
from icam_med.cam.summary import MapStatistics, map_statistics
from icam_med.config import ICAMConfig, RegionConfig, load_config
from icam_med.discovery import ScanSpec, collect_scans
from icam_med.memory import release_freed_memory
from icam_med.paths import SCANS_DIR

__all__ = ["MODEL_CACHE", "BatchResult", "ModelCache", "ResumePlan", "ScanOutcome", "WorkerTask",
           "choose_backend", "commit_outcome", "explain_task", "map_analysis", "plan_resume",
           "region_mask_of", "run_batch", "scan_region", "summary_rows", "worker_task",
           "write_summary"]

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = (
    "scan_id", "status", "predicted_class", "predicted_label", "score", "expected_label",
    "disagrees", "target_label", "region_source", "region_voxels", "region_sha256", "map_min", "map_max", "map_mean", "map_frac_above_0.5",
    "peak_voxel", "peak_world_ras_mm", "centroid_voxel", "mask_fraction", "record",
    "ledger_seq", "reason",
)


# ---------------------------------------------------------------------------------------
# Work done by a worker (this process, a local process, or a Dask worker)
# ---------------------------------------------------------------------------------------
class ModelCache:
    """The prepared model of one process, loaded once and kept for every scan it explains.

    One config at a time: asking for another key drops the old model first. The lock makes
    scans go through the one model one at a time (Dask runs tasks on threads).

    Attributes:
        prepare_count: how many times this process prepared a model.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prepare_count = 0
        self._key: str | None = None
        self._prepared: Any = None

    def get(self, key: str, config: ICAMConfig, device: str) -> Any:
        """The prepared model for ``key`` (call with :attr:`lock` held)."""
        if key != self._key:
            from icam_med.explain import prepare

            self._key, self._prepared = None, None  # don't keep an old model alive
            self._prepared = prepare(config, device)
            self._key = key
            self.prepare_count += 1
            log.info("process %d prepared model '%s'", os.getpid(), config.model.name)
        return self._prepared


#: This process's model cache: the module's only state (each worker process has its own).
MODEL_CACHE = ModelCache()


@dataclass(frozen=True)
class WorkerTask:
    """What every worker needs for every scan of a run.

    Attributes:
        key: identifies the config and the weights' hash (the model cache's key).
        config: the run config, its weights pinned to the hash the run recorded.
        device: torch device.
        seed: torch seed set before each scan, or ``None``.
        out_dir: the audit folder; a worker writes scan ``S`` into ``out_dir/scans/S``.
        intended_use: the model's intended use (from its card) each scan is checked
            against, or ``None`` when the card states none.
    """

    key: str
    config: ICAMConfig
    device: str
    seed: int | None
    out_dir: Path
    intended_use: IntendedUse | None = None


@dataclass
class ScanOutcome:
    """What a worker sends back for one scan: the files it wrote, or why it failed.

    Attributes:
        scan_id: the scan.
        pid: the worker process (``None`` when the worker died).
        explanation: the :class:`~icam_med.explain.Explanation`, its maps dropped once
            written (what the record needs stays).
        written: the files the worker wrote into the scan's folder, with the SHA-256 and
            size it computed (the coordinator checks them before sealing).
        analysis: the record's ``analysis`` section (see :func:`map_analysis`).
        error: ``"<ExceptionType>: <message>"`` when the scan failed.
        prepare_count: how many times that worker had prepared a model.
        seconds: time spent on the worker.
        identifiers: the scan's identifying header values, once it was loaded (in memory
            only: the coordinator screens failure reasons with them; never written).
        region_mask: the scan's own target region mask (a ``masks`` region), once found:
            the coordinator keeps its path out of failure reasons as it does the scan's.
    """

    scan_id: str
    pid: int | None = None
    explanation: Any = None
    written: tuple[Any, ...] = ()
    analysis: dict[str, Any] | None = None
    error: str | None = None
    prepare_count: int | None = None
    seconds: float = 0.0
    identifiers: tuple[str, ...] = ()
    region_mask: Path | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.explanation is not None and bool(self.written)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view (the explanation itself stays in memory)."""
        return {"scan_id": self.scan_id, "pid": self.pid, "ok": self.ok, "error": self.error,
                "written": [w.to_dict() for w in self.written],
                "analysis": self.analysis, "prepare_count": self.prepare_count,
                "seconds": self.seconds}


def map_analysis(fused: Any, affine: Any, *, mask: Any = None, expected_label: str | None = None,
                 predicted_class: int | None = None,
                 predicted_label: str | None = None,
                 stats: MapStatistics | None = None) -> dict[str, Any]:
    """The record's ``analysis`` section: map statistics, where the map's mass lies, and
    whether the prediction disagrees with the expected label.

    Args:
        fused: the map on the scan's grid, ``(1, *spatial)`` or ``(*spatial)``, in [0, 1].
        affine: the scan's voxel-to-RAS affine.
        mask: a mask on the same grid (non-zero = inside), or ``None``.
        expected_label: the expected label (a class label or index as text).
        predicted_class, predicted_label: the model's prediction.
        stats: the map's statistics when already computed (``Explanation.map_statistics``).

    Raises:
        ValueError: the mask's shape differs from the map's.
    """
    stats = stats if stats is not None else map_statistics(fused, affine)
    mask_fraction = mask_sha = mask_volume = peak_in_mask = None
    if mask is not None:
        a = fused.detach().cpu().numpy() if hasattr(fused, "detach") else np.asarray(fused)
        a = a.reshape(stats.shape)  # float32: sums below accumulate in float64, no copy
        m = mask.detach().cpu().numpy() if hasattr(mask, "detach") else np.asarray(mask)
        m = m[0] if m.ndim == a.ndim + 1 else m
        if m.shape != a.shape:
            raise ValueError(
                f"mask has shape {m.shape} but the scan's map has {a.shape}; the mask must be "
                "on the scan's own grid."
            )
        inside = m != 0
        total = float(a.sum(dtype=np.float64))
        mask_sha = voxel_sha256(m)
        inside_mass = float(a[inside].sum(dtype=np.float64))
        mask_fraction = inside_mass / total if total > 0 else None
        # Context: an evenly spread map puts mask_volume_fraction of its mass in the mask.
        mask_volume = float(inside.mean()) if inside.size else None
        peak_in_mask = bool(inside[tuple(stats.peak_voxel)]) if total > 0 else None
    disagrees = None
    if expected_label is not None:
        disagrees = str(expected_label) not in {str(predicted_label), str(predicted_class)}
    return {"expected_label": expected_label, "disagrees": disagrees,
            "map_stats": stats.to_dict(), "mask_fraction": mask_fraction,
            "mask_sha256": mask_sha, "mask_volume_fraction": mask_volume,
            "peak_in_mask": peak_in_mask}


def _load_mask(spec: ScanSpec, info: Any, geometry: Any) -> Any:
    """The scan's mask, refused unless it lies on the scan's grid."""
    from icam_med.io import load_volume

    mask, mask_info = load_volume(spec.mask, geometry=geometry)
    if not np.allclose(np.asarray(mask_info.affine), np.asarray(info.affine), atol=1e-3):
        raise ValueError(
            f"mask {spec.mask} is not on the grid of scan {spec.path} (different affine); "
            "give a mask resampled to the scan."
        )
    return mask


def region_mask_of(region: RegionConfig | None, spec: ScanSpec) -> Path | None:
    """The target region mask file of one scan: the scan list's ``region`` entry for it,
    else its own mask under a ``masks`` region
    (:meth:`~icam_med.config.RegionConfig.mask_for`), else the one mask of a ``mask``
    region, else ``None`` (a predicted region, or no region)."""
    if spec.region is not None:
        return Path(spec.region)
    if region is None:
        return None
    if region.kind == "masks":
        return region.mask_for(spec.path, spec.scan_id)
    return Path(region.mask) if region.kind == "mask" and region.mask is not None else None


def scan_region(config: ICAMConfig, spec: ScanSpec) -> RegionConfig | None:
    """The target region of one scan of a batch, checked before its scan is read.

    The scan list's ``region`` entry, or under a ``masks`` region the scan's own mask file,
    becomes a ``mask`` region; otherwise ``None`` (:func:`~icam_med.explain.explain_volume`
    takes the config's). That the mask lies on the scan's grid is checked by
    ``explain_volume`` before the model runs.

    Raises:
        FileNotFoundError: the scan's mask does not exist (the message names the scan, the
            mask and the fix).
        ValueError: the mask is the scan itself, or a scan list names a region mask but
            the config names no target label.
    """
    region = config.target.region if config.target is not None else None
    if spec.region is None and (region is None or region.kind != "masks"):
        return None
    path = region_mask_of(region, spec)
    assert path is not None
    source = ("the scan list's 'region' column" if spec.region is not None else
              "the per-scan mask pattern (in the config's target.region, or given on the "
              "command line)")
    if config.target is None:
        raise ValueError(
            f"scan {spec.scan_id}: {source} gives it a region mask, but the config has no "
            "target label to explain over it: add 'target: {label: LABEL}' to the config.")
    if not path.exists():
        raise FileNotFoundError(
            f"scan {spec.scan_id}: its region mask {path} does not exist; put the scan's mask "
            f"there (NIfTI or DICOM, on the scan's grid), correct {source}, or leave the "
            "scan out of the batch.")
    if path.absolute() == Path(spec.path).absolute():
        raise ValueError(
            f"scan {spec.scan_id}: {source} leads to the scan itself; give the masks a name "
            "or folder of their own (e.g. 'masks/{scan}.nii.gz' or "
            "'{dir}/{scan}_seg.nii.gz').")
    return RegionConfig("mask", mask=path)


def _drop_region_masks(scans: list[ScanSpec], region: RegionConfig | None) -> list[ScanSpec]:
    """The scans less those that are another scan's region mask (a folder holding
    ``case01.nii.gz`` and ``case01_seg.nii.gz`` gives both: the second is a mask)."""
    if not any(s.region is not None for s in scans) and (region is None
                                                         or region.kind != "masks"):
        return scans
    masks = {p.absolute() for s in scans
             if (s.region is not None or (region is not None and region.kind == "masks"))
             and (p := region_mask_of(region, s)) is not None}
    kept = [s for s in scans if Path(s.path).absolute() not in masks]
    if len(kept) < len(scans):
        log.info("%d input(s) are other scans' region masks and are not audited as scans",
                 len(scans) - len(kept))
    return kept or scans


def second_class_explanation(prepared: Any, image: Any, info: Any, explanation: Any,
                             analysis: dict[str, Any]) -> Any:
    """Misclassification analysis (docs/report.md): the map of the class a labelled scan's
    prediction competes with, or ``None``. A prediction that disagrees with its expected
    label gets the expected class's map; a right one below
    :data:`~icam_med.report.collect.LOW_CONFIDENCE_PROBABILITY` the runner-up's. Written
    beside the scan's map as ``cam_class<c>`` (roles ``second_class:<role>`` in its record).
    """
    from icam_med.explain import explain_volume
    from icam_med.report.collect import LOW_CONFIDENCE_PROBABILITY

    res, expected = explanation.result, analysis.get("expected_label")
    probs, labels = res.probabilities or (), list(explanation.labels)
    if expected is None or len(probs) < 2 or res.predicted_class is None:
        return None
    if analysis.get("disagrees"):
        exp = str(expected)
        other = labels.index(exp) if exp in labels else int(exp) if exp.isdigit() else None
    elif probs[res.predicted_class] < LOW_CONFIDENCE_PROBABILITY:
        other = max((i for i in range(len(probs)) if i != res.predicted_class),
                    key=lambda i: probs[i])
    else:
        return None
    if other is None or not 0 <= other < len(probs) or other == res.target_class:
        return None
    return explain_volume(image, info, prepared, targets=other)


def explain_task(task: WorkerTask, spec: ScanSpec) -> ScanOutcome:
    """Load, explain and write one scan on a worker; never raises (failures are outcomes).

    The outputs go into ``task.out_dir/scans/<scan_id>`` (:func:`icam_med.explain.write_outputs`);
    the coordinator seals them.
    """
    started = time.perf_counter()
    outcome = ScanOutcome(scan_id=spec.scan_id, pid=os.getpid())
    try:
        import torch

        from icam_med.explain import explain_volume, write_outputs
        from icam_med.io import load_volume

        outcome.region_mask = region_mask_of(
            task.config.target.region if task.config.target is not None else None, spec)
        region = scan_region(task.config, spec)  # a missing mask: refused before any work
        with MODEL_CACHE.lock:
            prepared = MODEL_CACHE.get(task.key, task.config, task.device)
            image, info = load_volume(spec.path, geometry=task.config.geometry)
            outcome.identifiers = identifiers_from_scan(info)
            intended = (task.intended_use.check(info, image)
                        if task.intended_use is not None else None)
            # Only a labelled scan can need a second map (of the class its prediction
            # competes with); otherwise the volume is handed over to be freed as soon as
            # the model input exists, before the engine's and the map's peaks.
            second_source = image if spec.expected_label is not None else None
            handed = [image]
            del image
            if task.seed is not None:
                torch.manual_seed(task.seed)
            explanation = explain_volume(handed, info, prepared, region=region)
            mask = _load_mask(spec, info, task.config.geometry) if spec.mask else None
            analysis = map_analysis(
                explanation.fused, info.affine, mask=mask, expected_label=spec.expected_label,
                predicted_class=explanation.result.predicted_class,
                predicted_label=explanation.predicted_label,
                stats=explanation.map_statistics())
            if intended is not None:
                analysis["intended_use"] = intended
            second = (second_class_explanation(prepared, second_source, info, explanation,
                                               analysis)
                      if second_source is not None else None)
        del second_source, mask  # the loaded volume is not needed to write: free it first
        written = write_outputs(explanation, Path(task.out_dir) / SCANS_DIR / spec.scan_id,
                                audit=AuditContext(root=Path(task.out_dir), scan_id=spec.scan_id,
                                                   command="audit"))
        if second is not None:  # NIfTI + summary, sealed in the scan's record by role (no
            # second Parametric Map: it would copy the source's patient module once more)
            from icam_med.explain import _write_files
            from icam_med.paths import class_stem, output_paths
            from icam_med.report.collect import SECOND_CLASS_ROLE

            paths = output_paths(Path(task.out_dir) / SCANS_DIR / spec.scan_id, is_dicom=False,
                                 stem=class_stem(second.result.target_class))
            written += [replace(w, role=f"{SECOND_CLASS_ROLE}:{w.role}")
                        for w in _write_files(second, paths, overwrite=False)]
            second.drop_maps()
        # What the coordinator needs to seal; the maps and the engine's internals stay here.
        explanation.drop_maps()
        outcome.explanation, outcome.analysis = explanation, analysis
        outcome.written = tuple(written)
    except Exception as exc:  # a bad scan fails alone; the reason travels back
        outcome.error = f"{type(exc).__name__}: {exc}"
    # The scan's volume and full-size maps are gone: hand their memory back before the next
    # scan, or glibc keeps it and each scan's peak sits on the last one's leftovers.
    release_freed_memory()
    outcome.prepare_count = MODEL_CACHE.prepare_count
    outcome.seconds = time.perf_counter() - started
    return outcome


# ---------------------------------------------------------------------------------------
# Backends: each yields outcomes as they complete
# ---------------------------------------------------------------------------------------
def _run_local(task: WorkerTask, scans: Sequence[ScanSpec]) -> Iterator[ScanOutcome]:
    for spec in scans:
        yield explain_task(task, spec)


def _lost(spec: ScanSpec, exc: BaseException) -> ScanOutcome:
    """The outcome of a scan whose worker died (killed by the OOM killer, say)."""
    return ScanOutcome(scan_id=spec.scan_id, pid=None, error=f"{type(exc).__name__}: {exc}")


def _run_processes(task: WorkerTask, scans: Sequence[ScanSpec],
                   workers: int) -> Iterator[ScanOutcome]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    ctx = mp.get_context("spawn")  # no fork of a process that holds torch threads
    threads = max(1, (os.cpu_count() or 1) // workers)  # no oversubscription of the cores
    # Workers die with this process (even when it is killed), so a killed run leaves no
    # orphans behind.
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker,
                             initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(explain_task, task, s): s for s in scans}
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as exc:
                    yield _lost(futures[fut], exc)
        finally:
            for fut in futures:
                fut.cancel()


def _run_dask(task: WorkerTask, scans: Sequence[ScanSpec], cluster: Any) -> Iterator[ScanOutcome]:
    from distributed import Client, as_completed

    if isinstance(cluster, Client):
        client, own = cluster, False
    else:  # an address or a cluster object
        client, own = Client(cluster), True
    try:
        # torch threads per worker: its share of its host's cores (a nanny sets 1), as --workers
        hosts = Counter(client.run(host_name).values())
        client.run(share_cores, dict(hosts))
        [task_future] = client.scatter([task], broadcast=True)
        futures = {client.submit(explain_task, task_future, s, pure=False,
                                 key=f"icam-med-{s.scan_id}-{uuid.uuid4().hex[:8]}"): s
                   for s in scans}
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as exc:  # a worker died: the scan fails, the batch goes on
                    yield _lost(futures[fut], exc)
        finally:
            client.cancel(list(futures))
    finally:
        if own:
            client.close()


def choose_backend(task: WorkerTask, todo: Sequence[ScanSpec], *, workers: int = 0,
                   cluster: Any = None) -> tuple[str, Iterator[ScanOutcome]]:
    """``(backend name, outcomes)``: Dask when a cluster is given, else ``workers`` local
    processes, else this process. Outcomes come as scans complete."""
    if cluster is not None:
        return "dask", _run_dask(task, todo, cluster)
    if workers and workers > 0:
        return f"processes:{workers}", _run_processes(task, todo, workers)
    return "local", _run_local(task, todo)


# ---------------------------------------------------------------------------------------
# The coordinator
# ---------------------------------------------------------------------------------------
@dataclass
class BatchResult:
    """What a batch run did.

    Attributes:
        out_dir: the output folder.
        run_id: this run's id (in every record and ledger entry it wrote).
        n_scans: scans in the inputs.
        skipped: scans already done in an earlier run (verified), not redone.
        done: scans explained and recorded by this run.
        failed: scan id -> reason, for scans that failed in this run.
        seconds: wall time of the run.
        prepare_counts: process id -> how many times that worker prepared the model.
    """

    out_dir: Path
    run_id: str
    n_scans: int = 0
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    prepare_counts: dict[int, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0 when every scan is done, 1 when any failed."""
        return 1 if self.failed else 0

    def line(self) -> str:
        rate = len(self.done) / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.n_scans} scan(s): {len(self.done)} explained ({rate:.2f}/s), "
                f"{len(self.skipped)} already done, {len(self.failed)} failed; "
                f"summary {self.out_dir / SUMMARY_NAME}")


def _check_output_folder(out: Path) -> Path:
    """Create the output folder and prove it writable, before any work."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".icam-med-write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(
            f"output folder {out} cannot be written ({exc.strerror or exc}); choose a folder "
            "you can write to. Nothing was processed."
        ) from None
    return out.resolve()


def _weights_sha256(cfg: ICAMConfig) -> str | None:
    """The run's one hash of the weights file (refused here if the config pins another)."""
    weights = cfg.model.weights
    if not weights or not Path(weights).is_file():
        return None  # the workers report the missing file, scan by scan
    sha = sha256_file(weights)
    if cfg.model.weights_sha256 is not None and sha != cfg.model.weights_sha256:
        raise ValueError(
            f"weights file {weights} has SHA-256 {sha}, but the config expects "
            f"{cfg.model.weights_sha256}: refusing to load weights that are not the audited "
            "ones. Nothing was processed."
        )
    return sha


def worker_task(cfg: ICAMConfig, weights_sha256: str | None, device: str,
                seed: int | None, out_dir: Path,
                intended_use: IntendedUse | None = None) -> WorkerTask:
    """The task every worker gets: the config with its weights pinned to the hash this run
    records, so a worker that reads other bytes refuses them instead of using them."""
    from icam_med.audit import sha256_json

    if weights_sha256 is not None:
        cfg = replace(cfg, model=replace(cfg.model, weights_sha256=weights_sha256))
    key = sha256_json({"raw": cfg.raw, "path": str(cfg.path), "weights": weights_sha256})
    return WorkerTask(key=key, config=cfg, device=device, seed=seed, out_dir=Path(out_dir),
                      intended_use=intended_use)


def _failure_reason(error: str, spec: ScanSpec,
                    region_mask: Path | None = None) -> tuple[str, tuple[str, ...]]:
    """A failure reason that names the scan by its id, never by its path.

    Every spelling of the scan's (and mask's) path becomes ``<scan ID>`` (``<mask of ID>``;
    its target region mask's ``<region mask of ID>``),
    so what is left below it (``<scan ID>/IM0001.dcm``) is relative. Returns the text and the
    folder and file names on those paths, which the ledger withholds from the reason too
    (see :meth:`icam_med.audit.Ledger.log_failure`).
    """
    names: set[str] = set()
    for p, label in ((spec.path, f"<scan {spec.scan_id}>"),
                     (spec.mask, f"<mask of {spec.scan_id}>"),
                     (region_mask, f"<region mask of {spec.scan_id}>")):
        if p is None:
            continue
        forms = {str(p), str(p.expanduser()), str(p.absolute())}
        with contextlib.suppress(OSError, RuntimeError):
            forms.add(str(p.resolve()))
        for form in sorted(forms, key=len, reverse=True):
            error = error.replace(form, label)
        names.update(q.name for q in (p, *p.absolute().parents) if q.name)
    # A name the scan id was made from is public already; withholding it would hide the id.
    names = {n for n in names if n.lower() not in spec.scan_id.lower()}
    return error, tuple(sorted(names))


def _clean_leftovers(out: Path, ledger: Ledger, scan_id: str) -> None:
    """Remove what an interrupted run left of a scan: files no ledger entry pins.

    A file an entry pins is evidence and is never removed, whichever scan it belongs to;
    nor is anything reached through a symbolic link out of the scan's folder.
    """
    folder = out / SCANS_DIR / scan_id
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.resolve().is_relative_to(out.resolve()):
        log.warning("scan %s: its output folder is a link out of %s; left as it is",
                    scan_id, out)
        return
    pinned = ledger.referenced_paths()
    kept = [p for p in folder.rglob("*") if p.relative_to(out).as_posix() in pinned]
    if not kept:
        log.warning("scan %s: removing partial outputs of an interrupted run", scan_id)
        shutil.rmtree(folder)
        return
    for p in sorted(folder.rglob("*"), reverse=True):
        rel = p.relative_to(out).as_posix()
        if p.is_file() or p.is_symlink():
            if rel not in pinned:
                p.unlink()
        elif p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    log.warning("scan %s: removed unpinned leftovers; kept %d file(s) a ledger entry pins",
                scan_id, len(kept))


@dataclass
class ResumePlan:
    """Which scans a run does.

    Attributes:
        todo: scans to explain now.
        skipped: scans whose logged outputs still verify and whose voxels still hash to
            their record's (done by an earlier run).
        refused: scan id -> why it is neither done nor redone (its logged outputs no longer
            verify, or the scan changed since: the old outputs are kept as evidence).
    """

    todo: list[ScanSpec] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def _same_scan(spec: ScanSpec, recorded: str | None, geometry: Any) -> str | None:
    """None when the scan's voxels still hash to the recorded SHA-256, else why not."""
    from icam_med.io import load_volume

    if recorded is None:
        return "its record cannot be read to confirm it is the audited scan"
    try:
        image, _ = load_volume(spec.path, geometry=geometry)
    except Exception as exc:  # the reason's text may quote the path: keep its type only
        return (f"it cannot be read now to confirm it is the audited scan "
                f"({type(exc).__name__})")
    if voxel_sha256(image) != recorded:
        return ("the scan changed since it was audited (its voxel SHA-256 differs from the "
                "record's); the old outputs are kept as evidence: audit the new scan into a "
                "new folder or under a new id")
    return None


def _same_region(recorded: str | None, mask: Path, geometry: Any) -> str | None:
    """None when the scan's target region mask still hashes to ``recorded``, the region
    SHA-256 its record pins (:func:`icam_med.explain.region_summary`: the uint8
    ``mask != 0`` on the scan's grid), else why not."""
    from icam_med.io import load_volume

    if recorded is None:
        return ("it was audited without this target region mask (its record pins none); the "
                "old outputs are kept as evidence: audit with the mask into a new folder")
    if not mask.exists():
        return ("its target region mask is missing now, so it cannot be confirmed to be the "
                "audited one; restore the mask, or audit into a new folder")
    try:
        region, _ = load_volume(mask, geometry=geometry)
    except Exception as exc:  # the reason's text may quote the path: keep its type only
        return (f"its target region mask cannot be read now to confirm it is the audited "
                f"one ({type(exc).__name__})")
    import torch

    if voxel_sha256((region.as_tensor() != 0).to(torch.uint8)) != recorded:
        return ("its target region mask changed since it was audited (the mask's voxel "
                "SHA-256 differs from the record's region); the old outputs are kept as "
                "evidence: audit with the new mask into a new folder or under a new id")
    return None


def check_same_configuration(out: Path, ledger: Ledger, *, config_sha: str | None,
                             weights_sha: str | None, region: dict[str, Any] | None) -> None:
    """Refuse to resume a folder audited with another config, model or target region.

    An audit folder is one configuration's evidence: every record of it comes from the same
    config file, weights and target region, so its report and summary compare like with
    like. Each ``run-start`` entry logs them; a later run that differs in any (the config's
    SHA-256, the weights' SHA-256, or the region: a mask pattern against predicted regions)
    is refused before any work, naming what changed. Runs without a config file (no SHA-256
    on either side) are not compared on it.

    Raises:
        ValueError: the folder's earlier run used another configuration.
    """
    if not ledger.path.exists():
        return
    starts = [e for e in ledger.entries() if e.kind == "run-start"]
    if not starts:
        return
    first = starts[0].details
    changed = []
    if config_sha and first.get("config_sha256") and first["config_sha256"] != config_sha:
        changed.append(f"the config file's SHA-256 ({first['config_sha256'][:12]}... then, "
                       f"{config_sha[:12]}... now; any edit of the file changes it)")
    if (first.get("model_weights_sha256") or None) != (weights_sha or None):
        was, now = first.get("model_weights_sha256"), weights_sha
        changed.append(f"the model weights ({(was or 'none')[:12]} then, {(now or 'none')[:12]} now)")
    if (first.get("target_region") or None) != (region or None):
        changed.append(f"the target region ({first.get('target_region') or 'none'} then, "
                       f"{region or 'none'} now)")
    if changed:
        raise ValueError(
            f"{out} holds an audit made with another configuration (run "
            f"{starts[0].run_id}): {'; '.join(changed)}. A folder "
            "holds one configuration's records: audit into a new folder, or resume with the "
            "config, weights and region of the first run.")


def plan_resume(out: Path, ledger: Ledger, scans: Sequence[ScanSpec],
                geometry: Any = None, region: RegionConfig | None = None) -> ResumePlan:
    """Sort the scans into done, refused and to do, from the folder's verification.

    A scan is done (skipped) only when its logged outputs verify *and* the scan given now
    still has the voxel SHA-256 its record pins *and*, with a mask region (``region``: the
    run's ``target.region``), its mask still has the region SHA-256 its record pins; a
    changed scan or mask under an old id is refused, never reported as already done.

    Raises:
        ValueError: the ledger's chain is broken (nothing is done in such a folder).
    """
    ledger.repair_torn_tail()
    done: dict[str, int] = {}
    recorded: dict[str, str] = {}  # the voxel hash each verified record pins
    regions: dict[str, str] = {}  # and its target region's hash, where it has one
    tampered: dict[str, str] = {}
    if ledger.path.exists():
        report = verify_folder(out)
        broken = [p for p in report.problems if p.kind == "ledger"]
        if broken:
            raise ValueError(
                f"the ledger of {out} is broken ({broken[0]}); run `icam-med verify {out}`, "
                "keep the folder as evidence and audit into a new folder."
            )
        done, recorded = dict(report.verified_scans), dict(report.voxel_hashes)
        regions = dict(report.region_hashes)
        for p in report.problems:
            if p.kind == "outputs" and p.scan_id and p.scan_id not in done:
                tampered.setdefault(p.scan_id, str(p))
    plan = ResumePlan()
    for spec in scans:
        if spec.scan_id in done:
            changed = _same_scan(spec, recorded.get(spec.scan_id), geometry)
            mask = region_mask_of(region, spec)
            if changed is None and mask is not None:
                changed = _same_region(regions.get(spec.scan_id), mask, geometry)
            if changed is None:
                plan.skipped.append(spec.scan_id)
            else:
                plan.refused[spec.scan_id] = changed
        elif spec.scan_id in tampered:
            plan.refused[spec.scan_id] = (
                f"its logged outputs no longer verify ({tampered[spec.scan_id]}); they are "
                "kept as evidence and not redone: audit into a new folder")
        else:
            plan.todo.append(spec)
    return plan


def commit_outcome(out: Path, ledger: Ledger, spec: ScanSpec, outcome: ScanOutcome,
                   ctx: AuditContext, result: BatchResult) -> None:
    """Seal one scan's outputs (the worker wrote them) with a record and a ledger entry, or
    log its failure (never both).

    Sealing re-hashes every file the worker reported (:func:`icam_med.explain.seal_outputs`):
    a file missing or changed since its write fails the scan, and what the worker left is
    removed (nothing of it is logged).
    """
    from icam_med.explain import seal_outputs

    if outcome.pid is not None and outcome.prepare_count is not None:
        result.prepare_counts[outcome.pid] = outcome.prepare_count
    error = outcome.error
    if error is None and not outcome.written:
        error = "RuntimeError: the worker reported no outputs written"
    if error is None:
        try:
            seal_outputs(outcome.explanation, outcome.written, out / SCANS_DIR / spec.scan_id,
                         audit=replace(ctx, scan_id=spec.scan_id, analysis=outcome.analysis,
                                       identifiers=outcome.identifiers or None))
            result.done.append(spec.scan_id)
            return
        except Exception as exc:  # a scan that cannot be sealed fails alone
            error = f"{type(exc).__name__}: {exc}"
    _clean_leftovers(out, ledger, spec.scan_id)  # what a failed worker or seal left
    reason, names = _failure_reason(error, spec, outcome.region_mask)
    entry = ledger.log_failure(spec.scan_id, reason, run_id=result.run_id,
                               identifiers=outcome.identifiers, names=names)
    result.failed[spec.scan_id] = entry.data["reason"]
    log.warning("scan %s failed: %s", spec.scan_id, entry.data["reason"])


def _commit_all(out: Path, ledger: Ledger, todo: Sequence[ScanSpec],
                outcomes: Iterator[ScanOutcome], ctx: AuditContext, result: BatchResult,
                progress: bool) -> None:
    from tqdm.auto import tqdm

    by_id = {s.scan_id: s for s in todo}
    bar = tqdm(total=len(todo), unit="scan", desc="icam-med audit", disable=not progress,
               dynamic_ncols=True)
    try:
        for outcome in outcomes:
            commit_outcome(out, ledger, by_id[outcome.scan_id], outcome, ctx, result)
            bar.update(1)
            bar.set_postfix(failed=len(result.failed), refresh=False)
    finally:
        bar.close()
        close = getattr(outcomes, "close", None)
        if close is not None:
            close()


def run_batch(inputs: Iterable[str | Path], config: str | Path | ICAMConfig,
              out_dir: str | Path, *, workers: int = 0, cluster: Any = None,
              device: str = "cpu", operator: str | None = None, seed: int | None = 0,
              progress: bool = True, region_masks: str | None = None) -> BatchResult:
    """Explain many scans into one audited output folder (resumable).

    The steps: check the inputs (folder, config, site key, scan list, weights hash), take
    the folder's lock, :func:`plan_resume`, log ``run-start``, :func:`choose_backend`, run,
    :func:`commit_outcome` for each scan as it completes, log ``run-end``, sign the run's
    head when a signing key is configured, rewrite ``summary.csv``.

    Args:
        inputs: see :func:`collect_scans`.
        config: a YAML config path or a loaded :class:`~icam_med.config.ICAMConfig`.
        out_dir: the output folder (created if missing).
        workers: 0 to work in this process; N > 0 for N local worker processes.
        cluster: a Dask scheduler address (``"tcp://host:8786"``), a
            ``distributed.LocalCluster`` or a ``distributed.Client``; overrides ``workers``.
        device: torch device for the workers.
        operator: a pseudonymous operator id for the records.
        seed: torch seed set before each scan (recorded); ``None`` to leave it.
        progress: show a progress bar (scans done, rate, ETA) on stderr.
        region_masks: each scan's own target region mask, as a pattern (``--region-masks``;
            see :meth:`~icam_med.config.RegionConfig.masks_pattern`, relative to the working
            folder); it replaces the config's ``target.region``, whose ``label`` it needs.
            Inputs that are another scan's mask are not audited as scans. A scan whose mask
            is missing or off its grid fails alone, before anything is written for it.

    Returns:
        A :class:`BatchResult`; ``result.exit_code`` is 1 when any scan failed.

    Raises:
        PermissionError: the output folder cannot be written (checked before any work).
        FileExistsError: another run holds the folder's lock.
        ValueError / FileNotFoundError: bad config (site or signing key included, or a
            signing key inside the output folder), weights that differ
            from the config's pin, bad scan list, or a damaged ledger.
    """
    t0 = time.perf_counter()
    if cluster is not None:
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ValueError("--cluster needs Dask distributed; install it with "
                             "pip install 'icam-med[dask]'.") from None
    out = _check_output_folder(Path(out_dir))
    cfg = config if isinstance(config, ICAMConfig) else load_config(config)
    if region_masks is not None:
        cfg = _with_region_masks(cfg, region_masks)
    region = cfg.target.region if cfg.target is not None else None
    site_key = load_site_key(cfg.audit, base_dir=cfg.path.parent if cfg.path else None)
    signing_key = load_signing_key(cfg.audit, base_dir=cfg.path.parent if cfg.path else None)
    check_key_outside(signing_key, out)
    scans = _drop_region_masks(collect_scans(inputs), region)
    if operator is not None and (not operator.strip() or len(operator) > 64):
        raise ValueError(f"--operator {operator!r}: give a short pseudonymous id (1-64 chars).")
    weights_sha = _weights_sha256(cfg)  # the run's one read of the weights file
    card = card_beside(cfg.model.weights)  # its intended use, checked for every scan
    use = IntendedUse.from_card(card) if card is not None else None
    task = worker_task(cfg, weights_sha, device, seed, out, use)
    result = BatchResult(out_dir=out, run_id=uuid.uuid4().hex, n_scans=len(scans))
    config_sha = sha256_file(cfg.path) if cfg.path else None
    with FolderLock(out) as lock:
        ledger = Ledger(out)
        check_same_configuration(out, ledger, config_sha=config_sha, weights_sha=weights_sha,
                                 region=region.to_dict() if region is not None else None)
        plan = plan_resume(out, ledger, scans, cfg.geometry, region)
        result.skipped, result.failed = list(plan.skipped), dict(plan.refused)
        backend, outcomes = choose_backend(task, plan.todo, workers=workers, cluster=cluster)
        ledger.append("run-start", run_id=result.run_id, details={
            "command": "audit", "icam_med_version": __version__, "n_scans": len(scans),
            "n_todo": len(plan.todo), "n_already_done": len(plan.skipped),
            "config_sha256": config_sha,
            "model_weights_sha256": weights_sha, "backend": backend,
            "device": device, "seed": seed, "operator": operator,
            "signing_key_id": signing_key.key_id if signing_key else None,
            "intended_use_card_sha256": use.card_sha256 if use else None,
            **({"target_region": region.to_dict()} if region is not None else {}),
        })
        for scan_id, reason in plan.refused.items():
            ledger.log_failure(scan_id, reason, run_id=result.run_id)
        for spec in plan.todo:
            _clean_leftovers(out, ledger, spec.scan_id)
        ctx = AuditContext(root=out, run_id=result.run_id, operator=operator,
                           command="audit", seed=seed, site_key=site_key, lock=lock)
        _commit_all(out, ledger, plan.todo, outcomes, ctx, result, progress)
        result.seconds = time.perf_counter() - t0
        end = ledger.append("run-end", run_id=result.run_id, details={
            "n_done": len(result.done), "n_failed": len(result.failed),
            "n_skipped": len(result.skipped), "seconds": round(result.seconds, 3)})
        if signing_key is not None:  # the run's head, signed (see icam_med.audit.signing)
            sign_head(out, signing_key, result.run_id, end.seq, end.sha256)
        write_summary(out)
    return result


def _with_region_masks(cfg: ICAMConfig, pattern: str) -> ICAMConfig:
    """The config with ``target.region`` replaced by per-scan masks (``--region-masks``)."""
    if cfg.target is None:
        where = f"config {cfg.path}" if cfg.path else "the config"
        raise ValueError(
            f"--region-masks {pattern!r} needs a target label to explain over each scan's mask, "
            f"but {where} has no 'target' section: add 'target: {{label: LABEL}}' (a label of "
            "model.labels or an output channel). Nothing was processed.")
    region = RegionConfig.masks_pattern(pattern, Path.cwd(), where="--region-masks")
    return replace(cfg, target=replace(cfg.target, region=region))


# ---------------------------------------------------------------------------------------
# summary.csv
# ---------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(_fmt(v) for v in value)
    return str(value)


def summary_rows(out_dir: str | Path) -> list[dict[str, str]]:
    """One row per scan of an output folder, from its ledger and records.

    A scan's last event decides its row: a ``scan`` entry is ``ok``, a ``failure`` gives the
    reason (a failure after a ``scan`` entry means its outputs stopped verifying). Rows come
    in the order scans first appear in the ledger. Records are read through
    :meth:`~icam_med.audit.AuditRecord.load` inside the folder only: a record that is missing,
    outside the folder, or not a valid record gives an ``unreadable`` row saying why.
    """
    out = Path(out_dir).resolve()
    latest: dict[str, LedgerEntry] = {}
    for entry in Ledger(out).entries():
        sid = entry.scan_id
        if entry.kind not in ("scan", "failure") or sid is None:
            continue
        latest[sid] = entry  # the last event of a scan is its state
    rows = []
    for sid, e in latest.items():
        row = dict.fromkeys(SUMMARY_COLUMNS, "")
        row.update(scan_id=sid, ledger_seq=str(e.seq))
        if e.kind == "failure":
            row.update(status="failed", reason=e.reason or "")
            rows.append(row)
            continue
        ref = e.record
        assert ref is not None  # the entry schema requires it for scan entries
        try:
            rec = AuditRecord.load_inside(out, ref.path)
        except RecordError as exc:
            row.update(status="unreadable", reason=f"record {ref.path}: {exc.detail}")
            rows.append(row)
            continue
        method, analysis = rec.method, rec.analysis or RecordAnalysis()
        stats = analysis.map_stats
        row.update(
            status="ok", record=ref.path,
            predicted_class=_fmt(method.predicted.class_index),
            predicted_label=_fmt(method.predicted.label),
            target_label=_fmt(method.target.label), score=_fmt(method.score),
            region_source=_fmt((method.region or {}).get("source")),
            region_voxels=_fmt((method.region or {}).get("voxels")),
            region_sha256=_fmt((method.region or {}).get("sha256")),
            expected_label=_fmt(analysis.expected_label),
            disagrees=_fmt(analysis.disagrees),
            map_min=_fmt(stats.get("min")), map_max=_fmt(stats.get("max")),
            map_mean=_fmt(stats.get("mean")),
            **{"map_frac_above_0.5": _fmt(stats.get("frac_above_0.5"))},
            peak_voxel=_fmt(stats.get("peak_voxel")),
            peak_world_ras_mm=_fmt(stats.get("peak_world_ras_mm")),
            centroid_voxel=_fmt(stats.get("centroid_voxel")),
            mask_fraction=_fmt(analysis.mask_fraction),
        )
        rows.append(row)
    return rows


def write_summary(out_dir: str | Path) -> Path:
    """(Re)write ``summary.csv`` of an output folder atomically; return its path.

    It is a view of the ledger and records, so it is not itself in the ledger.
    """
    from icam_med.io.atomic import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(summary_rows(out_dir))
    return atomic_write_text(Path(out_dir) / SUMMARY_NAME, buf.getvalue(), overwrite=True)
