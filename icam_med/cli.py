"""The ``icam-med`` command line.

Each sub-command lives in its own module under :mod:`icam_med.commands` and is
imported only when it runs, so ``icam-med --help`` stays fast. A command module
defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.

The CLI's promise: whatever goes wrong, the user sees one line on stderr, never a
traceback (unless ``--debug``):

* a bad argument: argparse's usage line and message, exit 2;
* bad input (a ``ValueError`` such as a refused scan or config, a missing or unreadable
  file, an existing output): ``icam-med CMD: error: ...``, exit 2;
* anything else (a bug, or an exception the library failed to translate): one line naming
  the exception type and a hint to re-run with ``--debug`` for the traceback, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
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
    "compare": "compare",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icam-med",
        description="Integrative CAM explanations for medical CNNs, with audit records.",
    )
    parser.add_argument("--version", action="version", version=f"icam-med {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an unexpected error")
    # The same switch after the command name (``icam-med explain ... --debug``); SUPPRESS
    # keeps the sub-parser from resetting a --debug given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"icam_med.commands.{module_name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (multi-line messages, e.g. a series listing,
    keep their lines but are indented under the first)."""
    text = str(exc).strip() or type(exc).__name__
    first, *rest = text.splitlines()
    return "\n".join([first, *("  " + line for line in rest)])


# Exceptions raised for the user: their message is the explanation (exit 2).
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, LookupError)


# Library messages that quote a DICOM header value (pydicom's "Invalid value for VR DA:
# '19800231'", highdicom's remark on a one-word Patient's Name): the value may identify the
# patient, so the terminal gets the fact without the value.
_QUOTES_HEADER_VALUES = re.compile(r"Invalid value for VR|intended person name|potentially invalid")
_WITHHELD = "a DICOM header value does not conform to its value representation (value withheld)"


class _WithholdHeaderValues(logging.Filter):
    """Rewrites log records (Python warnings included) that quote header values."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _QUOTES_HEADER_VALUES.search(str(record.msg)) or any(
                _QUOTES_HEADER_VALUES.search(str(a)) for a in (record.args or ())
                if isinstance(a, str)):
            record.msg, record.args = _WITHHELD, ()
        return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    # One stderr handler for this run: library log records and Python warnings both pass
    # through it, and through the filter that withholds quoted header values.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_WithholdHeaderValues())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    try:
        return _dispatch(parser, args)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(old_level)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        echo("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except _USER_ERRORS as exc:
        if debug:
            raise
        if isinstance(exc, KeyError | IndexError):  # internal lookups: a bug, not bad input
            return _unexpected(args.command, exc)
        text = _one_line(exc)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text = f"{exc.strerror or text}: {exc.filename}"
        # Errors raised for the user carry their own explanation: show it, no traceback.
        echo(f"icam-med {args.command}: error: {text}", file=sys.stderr)
        return 2
    except Exception as exc:  # the CLI's promise: no traceback for the user
        if debug:
            raise
        return _unexpected(args.command, exc)


def _unexpected(command: str, exc: BaseException) -> int:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    echo(f"icam-med {command}: internal error: {type(exc).__name__}"
         + (f": {first}" if first else "")
         + f". This is a bug or an unsupported input; re-run with `icam-med --debug {command} ...`"
         " for the traceback and report it.", file=sys.stderr)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
