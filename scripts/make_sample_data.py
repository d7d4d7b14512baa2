#!/usr/bin/env python
"""Generate the sample scans of ``make demo`` into ``sample_data/scans/``, deterministically.

A thin command-line caller of :func:`icam_med.evaluation.samples.generate` (the library
code the napari plugin also uses); see that module for what each file is, and
``sample_data/README.md`` for provenance and licence.

Usage::

    python scripts/make_sample_data.py              # create what is missing, verify the rest
    python scripts/make_sample_data.py --force      # regenerate everything
    python scripts/make_sample_data.py --out DIR    # somewhere else
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from icam_med.evaluation.samples import generate

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "sample_data" / "scans"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="store_true", help="regenerate every file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    manifest = generate(args.out, force=args.force)
    for name, entry in manifest["files"].items():
        print(f"{args.out / name}: {entry['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
