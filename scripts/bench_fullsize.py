"""Full-size benchmark: `icam-med explain` on a synthetic 512x512x300 int16 CT series, before
and after a code change, in one run.

Writes a synthetic CT series (air, an elliptic body of soft tissue, a bright lesion) as 300
DICOM files, extracts the "before" revision of the package with ``git archive`` (no change
to the repository), and runs ``python -m icam_med explain SERIES --config CONFIG --out DIR``
for the before and the current tree, alternately, ``--repeat`` times each. For each run it
reports wall time, peak resident memory of the explain process (``ru_maxrss`` of the child),
the stage timings from the summary and the output sizes; then the after/before ratios of
the medians.

Usage::

    python scripts/bench_fullsize.py --before 0a395cd [--config configs/example_ct.yaml]
        [--shape 512 512 300] [--repeat 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "rc = subprocess.run(sys.argv[1:]).returncode\n"
    "wall = time.perf_counter() - t\n"
    "print('BENCH', rc, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


def extract_revision(rev: str, dest: Path) -> Path:
    """The package ``icam_med`` at ``rev`` under ``dest`` (git archive; the repo is untouched)."""
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "icam_med"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def run_explain(tree: Path, series: Path, config: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "icam_med", "explain",
           str(series), "--config", str(config), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tree))
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH")), None)
    if line is None:
        raise SystemExit(f"benchmark wrapper failed:\n{proc.stdout}\n{proc.stderr}")
    _, rc, wall, rss_kib = line.split()
    if int(rc) != 0:
        raise SystemExit(f"explain failed in {tree} (rc {rc}):\n{proc.stdout}\n{proc.stderr}")
    summary = json.loads((out / "cam_summary.json").read_text())
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    return {"wall_s": float(wall), "peak_rss_mb": int(rss_kib) / 1024.0,
            "timing_s": summary.get("timing_s", {}), "sizes": sizes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="git revision to compare with")
    ap.add_argument("--config", default=str(REPO / "configs" / "example_ct.yaml"))
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300],
                    help="columns rows slices")
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--keep", help="keep the series and outputs in this folder")
    args = ap.parse_args()
    from icam_med.evaluation.dicom_series import write_dicom_series
    from icam_med.evaluation.pipeline_bench import synthetic_ct

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="icam-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    series = work / "ct"
    shape = tuple(args.shape)
    if not series.is_dir():
        t0 = time.perf_counter()
        vol = synthetic_ct(shape)  # type: ignore[arg-type]
        write_dicom_series(vol, series, spacing=tuple(args.spacing), origin=(-180.0, -180.0, -150.0),
                           modality="CT")
        on_disk = sum(p.stat().st_size for p in series.iterdir())
        print(f"wrote {shape[2]} slices of {shape[0]}x{shape[1]} int16 ({on_disk / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t0:.1f} s")
        del vol
    before_tree = extract_revision(args.before, work / "before")
    trees = {"before": before_tree, "after": REPO}
    results: dict[str, list[dict]] = {"before": [], "after": []}
    stamp = f"run{os.getpid()}"  # (no date: the PHI screen refuses tokens equal to header dates)
    for i in range(args.repeat):
        for name, tree in trees.items():
            out = work / f"out_{stamp}_{name}_{i}"  # a new folder: explain never overwrites
            r = run_explain(tree, series, Path(args.config).resolve(), out)
            results[name].append(r)
            t = r["timing_s"]
            print(f"{name:6s} run {i + 1}: wall {r['wall_s']:6.1f} s, peak RSS "
                  f"{r['peak_rss_mb']:7.0f} MB; preprocess {t.get('preprocess', 0):.2f} s, "
                  f"cam {t.get('cam', 0):.2f} s, invert {t.get('invert', 0):.2f} s; "
                  + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sorted(r["sizes"].items())
                              if k.endswith((".dcm", ".nii.gz"))))
    print(f"\nmedians over {args.repeat} run(s) each, {shape} int16 CT, config {args.config}")
    rows = [("wall time (s)", "wall_s"), ("peak RSS (MB)", "peak_rss_mb")]
    for label, key in rows:
        b = statistics.median(r[key] for r in results["before"])
        a = statistics.median(r[key] for r in results["after"])
        print(f"  {label:16s} before {b:8.1f}  after {a:8.1f}  after/before {a / b:.2f}")
    for stage in ("preprocess", "cam", "invert"):
        b = statistics.median(r["timing_s"].get(stage, 0.0) for r in results["before"])
        a = statistics.median(r["timing_s"].get(stage, 0.0) for r in results["after"])
        print(f"  {stage + ' (s)':16s} before {b:8.2f}  after {a:8.2f}  after/before "
              f"{a / b if b else float('nan'):.2f}")
    for fname in sorted(results["after"][0]["sizes"]):
        if not fname.endswith((".dcm", ".nii.gz")):
            continue
        b = results["before"][0]["sizes"].get(fname)
        a = results["after"][0]["sizes"][fname]
        if b:
            print(f"  {fname:28s} before {b / 1e6:8.1f} MB  after {a / 1e6:8.1f} MB  "
                  f"after/before {a / b:.2f}")
    print(f"(files under {work})" if args.keep else "")


if __name__ == "__main__":
    main()
