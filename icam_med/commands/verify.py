"""``icam-med verify DIR``: re-hash every output and record and walk the ledger chain."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = ("verify an output folder: every map, record, the hash-chained ledger and (with "
        "--public-key) every run's signed head")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an output folder holding ledger.jsonl")
    parser.add_argument("--chain-only", action="store_true",
                        help="check the ledger chain only, without re-hashing files")
    parser.add_argument("--anchor", metavar="SHA256", type=_args.sha256_hex,
                        help="a head hash printed by an earlier verify and kept elsewhere: "
                             "it must still be in the chain")
    parser.add_argument("--public-key", metavar="PEM",
                        help="the site's Ed25519 public key: every run must carry a valid "
                             "signature of its ledger head by it (unsigned runs fail)")
    parser.add_argument("--all", action="store_true",
                        help="list every problem found, not only the first")


def run(args: argparse.Namespace) -> int:
    from icam_med.audit import verify_folder
    from icam_med.audit.signing import load_public_key

    public_key = load_public_key(args.public_key) if args.public_key else None
    report = verify_folder(args.folder, check_files=not args.chain_only, anchor=args.anchor,
                           public_key=public_key)
    if report.ok:
        echo(report.summary())
        return 0
    echo(report.summary(), file=sys.stderr)
    if args.all:
        for problem in report.problems[1:]:
            echo(f"  {problem}", file=sys.stderr)
    return 1
