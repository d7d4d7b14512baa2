"""The ``icam-med`` command line.

Each sub-command lives in its own module under :mod:`icam_med.commands` and is
imported only when it runs, so ``icam-med --help`` stays fast. A command module
defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from icam_med._version import __version__
from icam_med.commands._output import echo

# name -> module under icam_med.commands
COMMANDS: dict[str, str] = {
    "bench": "bench",
    "explain": "explain",
    "audit": "audit",
    "verify": "verify",
    "report": "report",
    "evaluate": "evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icam-med",
        description="Integrative CAM explanations for medical CNNs, with audit records.",
    )
    parser.add_argument("--version", action="version", version=f"icam-med {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"icam_med.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        echo("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as exc:
        # Errors raised for the user carry their own explanation: show it, no traceback.
        echo(f"icam-med {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
