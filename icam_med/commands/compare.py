"""``icam-med compare AUDIT_A AUDIT_B --out DIR``: model or method comparison of two audits."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands._output import echo

HELP = ("compare two audit folders on the scans they share (matched by voxel hash): map "
        "agreement, prediction agreement, side-by-side report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("audit_a", help="the first audit folder (holds ledger.jsonl)")
    parser.add_argument("audit_b", help="the second audit folder (holds ledger.jsonl)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for comparison.html, comparison.csv and comparison.json "
                             "(existing comparison files are never replaced)")
    parser.add_argument("--allow-broken", action="store_true",
                        help="compare an audit that does not verify, under a BROKEN banner, "
                             "instead of refusing it")


def run(args: argparse.Namespace) -> int:
    from icam_med.report.compare import compare_audits

    result = compare_audits(args.audit_a, args.audit_b, args.out,
                            allow_broken=args.allow_broken)
    echo(result.line())
    for line in result.broken:
        echo(f"warning: BROKEN: {line}", file=sys.stderr)
    return 1 if result.broken else 0
