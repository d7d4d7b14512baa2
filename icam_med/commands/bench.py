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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", action="append", choices=_NETWORKS,
                        help="network(s) to run (default: all)")
    parser.add_argument("--size", type=int, default=None,
                        help="input edge length (default per network: 96 in 3D, 224 in 2D)")
    parser.add_argument("--device", default="cpu", type=_args.device, help="torch device (default: cpu)")
    parser.add_argument("--repeats", type=_args.positive_int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=_args.positive_int, default=1, help="batch size (default: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--case", action="append", help="only these cases (default: all)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
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
