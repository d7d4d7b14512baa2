"""``icam-med bench``: time and measure the CAM engine against its baselines."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = "benchmark the CAM methods against a plain forward+backward and MONAI's Grad-CAM"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", action="append", choices=["densenet121-3d", "densenet121-2d"],
                        help="network(s) to run (default: both)")
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
    networks = args.network or ["densenet121-3d", "densenet121-2d"]
    echo(f"machine: {machine_description(args.device)}", flush=True)
    rows = run_benchmark(networks, device=args.device, repeats=args.repeats, batch=args.batch,
                         memory=not args.no_memory, cases=args.case,
                         progress=lambda s: echo(f"  running {s}", file=sys.stderr, flush=True))
    echo(format_table(rows))
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(rows_to_json(rows), encoding="utf-8")
    return 0
