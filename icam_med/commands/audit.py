"""``icam-med audit INPUTS... --config CONFIG --out DIR``: a resumable, audited batch run."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = "batch audit: explain many scans into one audited folder (local, processes or Dask)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+",
                        help="NIfTI files, DICOM series folders, folders of them, or a CSV with "
                             "columns path[,label][,mask][,region][,id] (region: the scan's target "
                             "region mask)")
    parser.add_argument("--config", required=True, help="YAML run config (model, preprocessing, method)")
    parser.add_argument("--out", required=True, help="output folder (created if missing; re-run to resume)")
    parser.add_argument("--region-masks", metavar="PATTERN",
                        help="segmentation targets: each scan's own region mask, e.g. "
                             "'masks/{scan}_seg.nii.gz' ({scan}: the scan's name without "
                             ".nii.gz/.nii/.dcm, {id}: its batch id, {dir}: its folder) or a "
                             "folder of masks named as their scans; replaces the config's "
                             "target.region (the config gives target.label)")
    parser.add_argument("--workers", type=_args.non_negative_int, default=0, metavar="N",
                        help="N local worker processes (default: work in this process)")
    parser.add_argument("--cluster", metavar="ADDRESS",
                        help="Dask scheduler address (e.g. tcp://host:8786): run the scans there")
    parser.add_argument("--device", default="cpu", type=_args.device_name, help="torch device on the workers (default cpu)")
    parser.add_argument("--operator", help="pseudonymous operator id for the records (not a name)")
    parser.add_argument("--seed", type=_args.non_negative_int, default=0, help="torch seed set before each scan (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-report", action="store_true",
                        help="do not (re)build the HTML report at the end")
    parser.add_argument("--pdf", action="store_true", help="also write the report as PDF")


def run(args: argparse.Namespace) -> int:
    from icam_med.batch import run_batch

    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}.")
    result = run_batch(args.inputs, args.config, args.out, workers=args.workers,
                       cluster=args.cluster, device=args.device, operator=args.operator,
                       seed=args.seed, progress=not args.no_progress,
                       region_masks=args.region_masks)
    for scan_id, reason in result.failed.items():
        echo(f"failed: {scan_id}: {reason}", file=sys.stderr)
    echo(result.line())
    if not args.no_report:
        from icam_med.config import load_config
        from icam_med.report import build_report

        # The report is a view of the folder, rebuilt after every run (and re-verified).
        report = build_report(args.out, scans=args.inputs, geometry=load_config(args.config).geometry,
                              pdf=args.pdf, overwrite=True)
        echo(report.line())
        if not report.ledger_ok:
            echo(f"warning: the folder does not verify: {report.problems[0]}", file=sys.stderr)
            return max(result.exit_code, 1)
    return result.exit_code
