"""``icam-med bench``: time and measure the CAM engine against its baselines."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = ("benchmark the CAM methods against a plain forward+backward, MONAI's Grad-CAM and "
        "TorchCAM's fused LayerCAM")

# the networks of icam_med.evaluation.bench.NETWORKS (listed here so --help needs no torch)
_NETWORKS = ["densenet121-3d", "densenet121-2d", "resnet18-3d", "seresnet50-3d", "unet-3d"]
PIPELINE_SHAPE = (512, 512, 300)
VERIFY_SHAPE = (64, 64, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", action="append", choices=_NETWORKS,
                        help="network(s) to run (default: all)")
    parser.add_argument("--size", type=int, default=None,
                        help="input edge length (default per network: 96 in 3D, 224 in 2D)")
    parser.add_argument("--device", default="cpu", type=_args.device, help="torch device (default: cpu)")
    parser.add_argument("--repeats", type=_args.positive_int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=_args.positive_int, default=1, help="batch size (default: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--case", action="append", help="only these cases (default: the default cases; the costly toolbox cases, e.g. "
                             "scorecam/last, run only when named)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    pipe = parser.add_argument_group(
        "pipeline benchmark (--pipeline): batch audits of synthetic full-size CT series")
    pipe.add_argument("--pipeline", action="store_true",
                      help="audit N synthetic DICOM CT series per backend (in-process, "
                           "--workers, Dask LocalCluster) instead of the engine benchmark")
    pipe.add_argument("--scans", type=_args.positive_int, default=4,
                      help="series to audit per backend (default: 4)")
    pipe.add_argument("--shape", type=_args.positive_int, nargs=3, default=None,
                      metavar=("COLUMNS", "ROWS", "SLICES"),
                      help="size of each series (default: 512 512 300; with --verify "
                           f"{' '.join(map(str, VERIFY_SHAPE))})")
    pipe.add_argument("--backend", action="append", choices=["local", "workers", "dask"],
                      help="backend(s) to run (default: all three)")
    pipe.add_argument("--workers", type=_args.positive_int, default=2,
                      help="processes for the workers and Dask backends (default: 2)")
    pipe.add_argument("--config", default=None,
                      help="the audit's config (default: the packaged example_ct)")
    pipe.add_argument("--work", default=None,
                      help="folder for the series and audits (default: a new temporary one)")
    pipe.add_argument("--verify", type=_args.positive_int, metavar="N", default=None,
                      help="instead: build an audit folder of N sealed scans (one small CT "
                           "series explained once, its outputs written and sealed N times) "
                           "and time `icam-med verify` on it; reuses --work/audit-N")


def run(args: argparse.Namespace) -> int:
    if args.verify is not None:
        return _run_verify(args)
    if args.pipeline:
        return _run_pipeline(args)
    from icam_med.evaluation.bench import (
        CASES,
        format_table,
        machine_description,
        rows_to_json,
        run_benchmark,
    )

    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats}: must be at least 1.")
    unknown = [c for c in (args.case or []) if c not in CASES]
    if unknown:
        raise ValueError(f"unknown --case {unknown}; choose from {CASES}.")
    if args.json:
        from pathlib import Path

        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir():
            raise FileNotFoundError(
                f"--json {target}: not a file in an existing folder; create the folder first.")
    if args.size is not None and args.size < 16:
        raise ValueError(f"--size {args.size}: must be at least 16 voxels per axis.")
    networks = args.network or list(_NETWORKS)
    echo(f"machine: {machine_description(args.device)}", flush=True)
    rows = run_benchmark(networks, device=args.device, repeats=args.repeats, batch=args.batch,
                         memory=not args.no_memory, cases=args.case, size=args.size,
                         progress=lambda s: echo(f"  running {s}", file=sys.stderr, flush=True))
    echo(format_table(rows))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(rows_to_json(rows), encoding="utf-8")
    return 0


def _run_pipeline(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from icam_med.evaluation.pipeline_bench import format_pipeline_table, run_pipeline_bench
    from icam_med.resources import resolve_config

    shape = _shape(args, PIPELINE_SHAPE)
    _check_json(args)
    config = resolve_config(args.config) if args.config else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icam-med-pipeline-"))
    rows = run_pipeline_bench(work, n_scans=args.scans, shape_xyz=shape, config=config,
                              backends=args.backend or ["local", "workers", "dask"],
                              workers=args.workers,
                              progress=lambda s: echo(f"  {s}", file=sys.stderr, flush=True))
    echo(format_pipeline_table(rows, shape))
    echo(f"(series and audit folders under {work})")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n",
                                   encoding="utf-8")
    return 0


def _shape(args: argparse.Namespace, default: tuple[int, int, int]) -> list[int]:
    shape = list(args.shape or default)
    if min(shape) < 8:
        raise ValueError(f"--shape {shape}: each axis needs at least 8 voxels.")
    return shape


def _check_json(args: argparse.Namespace) -> None:
    if args.json:
        from pathlib import Path

        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir():
            raise FileNotFoundError(
                f"--json {target}: not a file in an existing folder; create the folder first.")


def _load() -> str:
    import os

    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _run_verify(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from icam_med.evaluation.bench import machine_description
    from icam_med.evaluation.pipeline_bench import run_verify_bench
    from icam_med.resources import resolve_config

    shape = _shape(args, VERIFY_SHAPE)
    _check_json(args)
    config = resolve_config(args.config) if args.config else None
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="icam-med-verify-"))
    echo(f"machine: {machine_description('cpu')}; load average {_load()}", flush=True)
    row = run_verify_bench(work, n_scans=args.verify, shape_xyz=shape, config=config,
                           progress=lambda s: echo(f"  {s}", file=sys.stderr, flush=True))
    n = row["n_scans"]
    if row["seal_first_s"] is None:
        echo(f"reused the folder of {n} sealed scans")
    else:
        echo(f"built {n} sealed scans of one {tuple(shape)} CT series in "
             f"{row['build_s']:.1f} s; sealing took {1000 * row['seal_first_s']:.1f} ms a "
             f"scan over the first tenth, {1000 * row['seal_last_s']:.1f} ms over the last")
    echo(f"verify: {n} scans, {row['files']} files, {row['bytes'] / 1e6:.1f} MB in "
         f"{row['verify_s']:.2f} s ({row['ms_per_scan']:.2f} ms a scan, "
         f"{row['mb_per_s']} MB/s); `icam-med verify` as a fresh process: {row['cli_s']:.2f} s;"
         f" load average {_load()}")
    echo(f"(audit folder {work / f'audit-{n}'})")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    return 0
