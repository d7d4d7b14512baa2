"""The pipeline benchmark (``icam-med bench --pipeline``): batch audits of full-size CT series.

:func:`run_pipeline_bench` writes N synthetic CT series (``512x512x300`` int16 by default,
DICOM, via :func:`icam_med.evaluation.dicom_series.write_dicom_series`) and audits them with
:func:`icam_med.batch.run_batch` once per backend (in-process, ``--workers``, a Dask
``LocalCluster``), each run in a fresh Python process so its peak memory is its own. For each
backend it reports scans per minute, the peak resident memory of the coordinator and of the
largest worker process, the per-stage seconds per scan and the output bytes per scan.

Stages: ``load``, ``preprocess``, ``engine`` (the CAM), ``inverse`` (back onto the scan's
grid), ``write`` (the worker writing the maps, Parametric Map and summary) and ``record``
(the coordinator re-hashing them, writing the record and appending the ledger). All are
timed in the process that runs them where that is the benchmark's own process (the
in-process backend: every stage; the other backends: ``record``); ``preprocess``,
``engine`` and ``inverse`` come from each scan's JSON summary for every backend.

:func:`sealed_folder` builds a large audit folder cheaply (one small scan explained once,
its outputs written and sealed N times with the library's own writers) to time
``icam-med verify`` on it (:func:`time_verify`); :func:`run_verify_bench` does both
(``icam-med bench --verify N``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BACKENDS", "PipelineRow", "format_pipeline_table", "run_pipeline_bench",
           "run_verify_bench", "sealed_folder", "synthetic_ct", "time_verify", "write_series"]

BACKENDS = ("local", "workers", "dask")
STAGES = ("load", "preprocess", "engine", "inverse", "write", "record")


def synthetic_ct(shape_xyz: Sequence[int], seed: int = 0) -> np.ndarray:
    """``(slices, rows, columns)`` int16 Hounsfield units: air, an elliptic body of soft
    tissue with noise, a bright lesion (placed by ``seed``)."""
    nx, ny, nz = (int(s) for s in shape_xyz)
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    body = ((x - nx / 2) / (0.42 * nx)) ** 2 + ((y - ny / 2) / (0.32 * ny)) ** 2 <= 1.0
    vol = np.full((nz, ny, nx), -1000, dtype=np.int16)
    rng = np.random.default_rng(seed)
    cx, cy, cz = 0.5 + 0.2 * rng.random(3)
    for k in range(nz):
        sl = np.where(body, 40, -1000).astype(np.int16)
        sl += rng.integers(-20, 21, size=sl.shape, dtype=np.int16)
        dz = (k - cz * nz) / max(1.0, 0.05 * nz)
        lesion = ((x - cx * nx) / (0.04 * nx)) ** 2 + ((y - cy * ny) / (0.04 * ny)) ** 2 + dz**2
        sl[lesion <= 1.0] = 180
        vol[k] = sl
    return vol


def write_series(folder: str | Path, n: int, shape_xyz: Sequence[int],
                 spacing: Sequence[float] = (0.7, 0.7, 1.0)) -> list[Path]:
    """N synthetic CT series ``folder/ct000``... (kept when already there)."""
    from icam_med.evaluation.dicom_series import write_dicom_series

    out = []
    for i in range(n):
        series = Path(folder) / f"ct{i:03d}"
        if not (series.is_dir() and len(list(series.iterdir())) == int(shape_xyz[2])):
            write_dicom_series(synthetic_ct(shape_xyz, seed=i), series, spacing=tuple(spacing),
                               origin=(-180.0, -180.0, -150.0), modality="CT",
                               overwrite=True)
        out.append(series)
    return out


@dataclass
class PipelineRow:
    """One backend's figures."""

    backend: str
    n_scans: int
    wall_s: float
    scans_per_min: float
    coordinator_peak_mb: float
    worker_peak_mb: float | None
    stages_s: dict[str, float | None] = field(default_factory=dict)
    bytes_per_scan: float = 0.0
    failed: int = 0
    #: Median seconds a worker spent on a scan, every stage it runs (load to write).
    worker_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def _timed(module: Any, name: str, bucket: list[float],
           after: Callable[[Any], None] | None = None) -> None:
    """Replace ``module.name`` with a wrapper that appends each call's seconds to ``bucket``."""
    inner = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        result = inner(*args, **kwargs)
        bucket.append(time.perf_counter() - t0)
        if after is not None:
            after(result)
        return result

    setattr(module, name, wrapper)


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One backend's audit, in this (fresh) process; returns its figures."""
    import icam_med.batch as batch
    import icam_med.explain as ex
    import icam_med.io as io
    from icam_med.audit import record as audit_record
    from icam_med.audit import schema
    from icam_med.batch import run_batch

    times: dict[str, list[float]] = {s: [] for s in STAGES}
    _timed(io, "load_volume", times["load"])
    _timed(ex, "write_outputs", times["write"])
    _timed(ex, "seal_outputs", times["record"])
    worker: list[float] = []
    commit = batch.commit_outcome

    def committing(*args: Any, **kwargs: Any) -> None:
        outcome = args[3]
        if outcome.error is None:
            worker.append(float(outcome.seconds))
        commit(*args, **kwargs)

    batch.commit_outcome = committing
    # What the coordinator does once per process, not per scan: the schemas compiled, the
    # package versions read (the record's runtime section). ``record`` is then the
    # steady per-scan cost of sealing.
    schema._compiled(schema.RECORD_SCHEMA_FILE)
    schema._compiled(schema.LEDGER_SCHEMA_FILE)
    for dist in audit_record.VERSIONED_PACKAGES:
        audit_record._version(dist)
    backend, workers = spec["backend"], int(spec["workers"])
    cluster = None
    if backend == "dask":
        from distributed import LocalCluster

        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
    worker_rss: list[float] = []
    try:
        result = run_batch(spec["inputs"], spec["config"], spec["out"],
                           workers=workers if backend == "workers" else 0,
                           cluster=cluster, progress=False)
        if cluster is not None:
            from distributed import Client

            with Client(cluster) as client:
                worker_rss = [v / 1024 for v in client.run(
                    lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss).values()]
    finally:
        if cluster is not None:
            cluster.close()
    out = Path(spec["out"])
    for summary in sorted(out.glob("scans/*/cam_summary.json")):
        timing = json.loads(summary.read_text(encoding="utf-8")).get("timing_s", {})
        for stage, key in (("preprocess", "preprocess"), ("engine", "cam"),
                           ("inverse", "invert")):
            if key in timing:
                times[stage].append(float(timing[key]))
    if backend != "local":  # the workers' loads and writes ran in other processes
        times["load"], times["write"] = [], []
    files = [f for f in out.glob("scans/*/*") if f.is_file()]
    n_done = len(result.done)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if backend == "workers":
        worker_rss = [children]
    return PipelineRow(
        backend=backend if backend == "local" else f"{backend} x{workers}",
        n_scans=len(spec["inputs"]), wall_s=round(result.seconds, 2),
        scans_per_min=round(60.0 * n_done / result.seconds, 2) if result.seconds else 0.0,
        coordinator_peak_mb=round(own, 1),
        worker_peak_mb=round(max(worker_rss), 1) if worker_rss else None,
        stages_s={s: _median(v) for s, v in times.items()},
        bytes_per_scan=sum(f.stat().st_size for f in files) / max(1, n_done),
        failed=len(result.failed), worker_s=_median(worker),
    ).to_dict()


def run_pipeline_bench(work: str | Path, *, n_scans: int = 4,
                       shape_xyz: Sequence[int] = (512, 512, 300),
                       config: str | Path | None = None, backends: Sequence[str] = BACKENDS,
                       workers: int = 2,
                       progress: Callable[[str], None] | None = None) -> list[PipelineRow]:
    """Write ``n_scans`` synthetic CT series under ``work`` and audit them once per backend.

    Args:
        work: a folder for the series (reused when already written) and the audit folders.
        n_scans: series to audit per backend.
        shape_xyz: columns, rows, slices of each series.
        config: the audit's config (default: ``configs/example_ct.yaml``).
        backends: among :data:`BACKENDS`.
        workers: processes for ``workers`` and ``dask``.
        progress: called with a line before each step.

    Returns:
        One :class:`PipelineRow` per backend.

    Raises:
        ValueError: an unknown backend, or fewer than one scan.
    """
    from icam_med.resources import packaged_config

    bad = [b for b in backends if b not in BACKENDS]
    if bad or n_scans < 1 or workers < 1:
        raise ValueError(f"backends {bad} (choose from {BACKENDS}), --scans {n_scans} and "
                         f"--workers {workers}: backends must be known, counts at least 1.")
    work = Path(work)
    cfg = Path(config) if config is not None else packaged_config("example_ct")
    say = progress or (lambda _line: None)
    say(f"writing {n_scans} CT series of {tuple(shape_xyz)} under {work}")
    series = write_series(work / "series", n_scans, shape_xyz)
    rows = []
    stamp = f"{os.getpid()}-{int(time.time())}"
    for backend in backends:
        say(f"auditing with backend {backend}")
        spec = {"backend": backend, "workers": workers, "config": str(cfg),
                "inputs": [str(s) for s in series], "out": str(work / f"audit-{backend}-{stamp}")}
        proc = subprocess.run(
            [sys.executable, "-m", "icam_med.evaluation.pipeline_bench", json.dumps(spec)],
            capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"backend {backend} failed (exit {proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        rows.append(PipelineRow(**json.loads(line)))
        say(f"{backend} done: {line}")  # each row as soon as it is known (long runs)
    return rows


def format_pipeline_table(rows: Sequence[PipelineRow], shape_xyz: Sequence[int]) -> str:
    """A Markdown table of the rows."""
    head = ("| backend | scans | scans/min | coordinator peak RSS (MB) | worker peak RSS (MB) | "
            + " | ".join(f"{s} (s)" for s in STAGES)
            + " | worker total (s) | output MB/scan | failed |")
    lines = [f"{tuple(int(s) for s in shape_xyz)} int16 CT series; stage seconds are "
             "medians per scan (load and write are timed in process only: on other "
             "backends they are inside the worker's total; record is the coordinator's "
             "seal)", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        stages = " | ".join("-" if r.stages_s.get(s) is None else f"{r.stages_s[s]:.2f}"
                            for s in STAGES)
        worker = "-" if r.worker_peak_mb is None else f"{r.worker_peak_mb:.0f}"
        total = "-" if r.worker_s is None else f"{r.worker_s:.2f}"
        lines.append(f"| {r.backend} | {r.n_scans} | {r.scans_per_min:.2f} | "
                     f"{r.coordinator_peak_mb:.0f} | {worker} | {stages} | {total} | "
                     f"{r.bytes_per_scan / 1e6:.1f} | {r.failed} |")
    return "\n".join(lines)


def sealed_folder(out: str | Path, n: int, config: str | Path, scan: str | Path, *,
                  seal_seconds: list[float] | None = None,
                  progress: Callable[[str], None] | None = None) -> Path:
    """An audit folder of ``n`` sealed scans made cheaply: ``scan`` explained once, its
    outputs written (:func:`icam_med.explain.write_outputs`) and sealed
    (:func:`icam_med.explain.seal_outputs`) ``n`` times under one lock, as a batch's workers
    and coordinator would.

    Args:
        seal_seconds: if given, each seal's seconds are appended to it (the coordinator's
            per-scan cost as the folder grows).
        progress: called with a line every 100 scans.
    """
    import copy
    from dataclasses import replace

    from icam_med.audit import AuditContext
    from icam_med.audit.ledger import FolderLock
    from icam_med.explain import explain_volume, prepare, seal_outputs, write_outputs
    from icam_med.io import load_volume
    from icam_med.paths import SCANS_DIR

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepared = prepare(config)
    image, info = load_volume(scan, geometry=prepared.config.geometry)
    explanation = explain_volume(image, info, prepared)
    sent = copy.copy(explanation)
    sent.drop_maps()
    with FolderLock(out) as lock:
        ctx = AuditContext(root=out, command="audit", lock=lock, site_key=None)
        for i in range(n):
            sid = f"s{i:05d}"
            audit = replace(ctx, scan_id=sid)
            written = write_outputs(explanation, out / SCANS_DIR / sid, audit=audit)
            t0 = time.perf_counter()
            seal_outputs(sent, written, out / SCANS_DIR / sid, audit=audit)
            if seal_seconds is not None:
                seal_seconds.append(time.perf_counter() - t0)
            if progress is not None and (i + 1) % 100 == 0:
                progress(f"{i + 1} of {n} scans sealed")
    return out


def time_verify(folder: str | Path) -> tuple[float, Any]:
    """Seconds :func:`icam_med.audit.verify_folder` takes on ``folder``, and its report."""
    from icam_med.audit import verify_folder

    t0 = time.perf_counter()
    report = verify_folder(folder)
    return time.perf_counter() - t0, report


def run_verify_bench(work: str | Path, *, n_scans: int, shape_xyz: Sequence[int],
                     config: str | Path | None = None,
                     progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build an audit folder of ``n_scans`` sealed scans (:func:`sealed_folder`, one
    synthetic CT series of ``shape_xyz``) and time ``icam-med verify`` on it.

    The folder is reused when ``work/audit-<n>`` already holds ``n_scans`` sealed scans.

    Returns:
        ``n_scans``, ``files`` and ``bytes`` re-hashed, ``build_s``, the coordinator's
        median seal seconds over the first and the last tenth of the scans
        (``seal_first_s``, ``seal_last_s``: flat when sealing does not grow with the
        ledger), ``verify_s`` (in this process, validators compiled), ``cli_s`` (a fresh
        ``icam-med verify`` process, start-up included), ``ms_per_scan`` and ``mb_per_s``
        (both from ``verify_s``), and ``ok``.

    Raises:
        RuntimeError: the folder does not verify, or the command fails.
    """
    from icam_med.resources import packaged_config

    if n_scans < 1:
        raise ValueError(f"--verify {n_scans}: give at least 1 scan.")
    work = Path(work)
    say = progress or (lambda _line: None)
    cfg = Path(config) if config is not None else packaged_config("example_ct")
    folder = work / f"audit-{n_scans}"
    seals: list[float] = []
    t0 = time.perf_counter()
    ledger = folder / "ledger.jsonl"
    n_lines = len(ledger.read_bytes().splitlines()) if ledger.is_file() else 0
    if n_lines != n_scans:
        if folder.exists():
            raise RuntimeError(f"{folder} holds {n_lines} ledger entries, not {n_scans}: "
                               "remove it or choose another --work folder.")
        [series] = write_series(work / "series", 1, shape_xyz)
        say(f"building {folder}: {n_scans} sealed scans of one {tuple(shape_xyz)} CT series")
        sealed_folder(folder, n_scans, cfg, series, seal_seconds=seals, progress=say)
    build_s = time.perf_counter() - t0
    say("verifying (in process, then as a fresh `icam-med verify`)")
    time_verify(folder)  # once, for the page cache and the compiled validators
    verify_s, report = time_verify(folder)
    if not report.ok:
        raise RuntimeError(f"the benchmark folder does not verify: {report.summary()}")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "icam_med", "verify", str(folder)],
                          capture_output=True, text=True)
    cli_s = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"icam-med verify {folder} failed (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    files = [f for f in folder.rglob("*") if f.is_file() and f.name != ".icam-med.lock"]
    n_bytes = sum(f.stat().st_size for f in files)
    tenth = max(1, len(seals) // 10)
    return {
        "n_scans": n_scans, "files": report.n_files, "bytes": n_bytes,
        "build_s": round(build_s, 2),
        "seal_first_s": _median(seals[:tenth]), "seal_last_s": _median(seals[-tenth:]),
        "verify_s": round(verify_s, 3), "cli_s": round(cli_s, 3),
        "ms_per_scan": round(1000 * verify_s / n_scans, 3),
        "mb_per_s": round(n_bytes / 1e6 / verify_s, 1) if verify_s else None,
        "ok": report.ok,
    }


if __name__ == "__main__":  # one backend's run, in a fresh process (run_pipeline_bench)
    sys.stdout.write(json.dumps(_child(json.loads(sys.argv[1]))) + "\n")
