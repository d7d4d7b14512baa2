"""Measure the batch coordinator's per-scan cost: writing everything vs sealing what a worker wrote.

Usage::

    python scripts/bench_coordinator.py [--scans N] [--dicom]

One brain-sized scan (91x109x91, like the sample brain, or a DICOM series of that size
with ``--dicom``) is explained once with the demo config; its explanation is then committed
N times into a fresh audit folder, under the folder's lock, two ways:

* ``before``: what the coordinator did until workers wrote their own outputs:
  :func:`icam_med.explain.write_explanation` (maps, Parametric Map, summary, record, ledger);
* ``after``: what it does now: :func:`icam_med.explain.seal_outputs` on files a worker wrote
  with :func:`icam_med.explain.write_outputs` (re-hash, record, ledger); the worker's time
  is printed beside it.

Prints milliseconds per scan (median and mean).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _scan(folder: Path, dicom: bool) -> Path:
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 400, (91, 109, 91)).astype(np.int16)
    vol[40:55, 50:65, 40:55] += 500
    if dicom:
        from icam_med.evaluation.dicom_series import write_dicom_series

        path = folder / "series"
        write_dicom_series(vol, path, modality="MR")
        return path
    path = folder / "brain.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from icam_med.audit import AuditContext
    from icam_med.audit.ledger import FolderLock
    from icam_med.explain import (
        explain_volume,
        prepare,
        seal_outputs,
        write_explanation,
        write_outputs,
    )
    from icam_med.io import load_volume

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", type=int, default=20)
    ap.add_argument("--dicom", action="store_true", help="a DICOM series (adds a Parametric Map)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        prepared = prepare(ROOT / "configs" / "demo.yaml")
        image, info = load_volume(_scan(tmp_path, args.dicom))
        explanation = explain_volume(image, info, prepared)
        rows = {}
        for how in ("before", "after"):
            out = tmp_path / how
            out.mkdir()
            coord, worker = [], []
            with FolderLock(out) as lock:
                ctx = AuditContext(root=out, command="audit", lock=lock, site_key=None)
                for i in range(args.scans):
                    folder = out / "scans" / f"s{i:04d}"
                    audit = replace(ctx, scan_id=f"s{i:04d}")
                    if how == "before":
                        t0 = time.perf_counter()
                        write_explanation(explanation, folder, audit=audit)
                        coord.append(time.perf_counter() - t0)
                    else:
                        t0 = time.perf_counter()
                        written = write_outputs(explanation, folder, audit=audit)
                        t1 = time.perf_counter()
                        sent = copy.copy(explanation)  # what the worker sends back
                        sent.drop_maps()
                        t2 = time.perf_counter()
                        seal_outputs(sent, written, folder, audit=audit)
                        worker.append(t1 - t0)
                        coord.append(time.perf_counter() - t2)
            rows[how] = (coord, worker)
    kind = "DICOM series + Parametric Map" if args.dicom else "NIfTI"
    sys.stdout.write(f"{args.scans} commits of one {info.shape} {kind} map\n")
    for how, (coord, worker) in rows.items():
        line = (f"{how:6s} coordinator per scan: median {1e3 * statistics.median(coord):7.1f} ms, "
                f"mean {1e3 * statistics.mean(coord):7.1f} ms")
        if worker:
            line += (f"; worker write per scan: median {1e3 * statistics.median(worker):7.1f} "
                     "ms")
        sys.stdout.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
