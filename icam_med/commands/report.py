"""``icam-med report DIR``: the audit report (HTML, optionally PDF) of an output folder."""

from __future__ import annotations

import argparse
import sys

from icam_med.commands import _args
from icam_med.commands._output import echo

HELP = "build the audit report of an output folder: self-contained HTML (and --pdf)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="an output folder of `icam-med audit` (holds ledger.jsonl)")
    parser.add_argument("--scans", nargs="+", metavar="INPUT",
                        help="the audited scans (the same inputs as `icam-med audit`: files, "
                             "folders or CSV), to draw each map over its scan; a scan is "
                             "drawn only if its voxel SHA-256 matches its record")
    parser.add_argument("--config", help="the run's YAML config, to load the scans with its "
                                         "geometry options")
    parser.add_argument("--pdf", action="store_true", help="also write report.pdf")
    parser.add_argument("--per-page", type=_args.positive_int, default=25, metavar="N",
                        help="scan sections per HTML page (default 25)")
    parser.add_argument("--anchor", metavar="HASH", type=_args.sha256_hex,
                        help="a ledger head hash kept elsewhere (printed by `icam-med verify`); "
                             "the report then proves the ledger was not rewritten since")
    parser.add_argument("--model-card", metavar="FILE",
                        help="the model card (intended use, training data) to embed and link; "
                             "default with --config: MODEL_CARD.md beside the model's weights, "
                             "if there is one")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from icam_med.report import build_report

    geometry = None
    card = args.model_card
    if args.config:
        from icam_med.config import load_config

        cfg = load_config(args.config)
        geometry = cfg.geometry
        weights = cfg.model.weights
        beside = Path(weights).parent / "MODEL_CARD.md" if weights else None
        if card is None and beside is not None and beside.is_file():
            card = beside
    result = build_report(args.folder, scans=args.scans, geometry=geometry, pdf=args.pdf,
                          per_page=args.per_page, overwrite=args.overwrite,
                          anchor=args.anchor, model_card=card)
    echo(result.line())
    if not result.ledger_ok:
        echo(f"warning: the folder does not verify: {result.problems[0]}", file=sys.stderr)
        return 1
    return 0
