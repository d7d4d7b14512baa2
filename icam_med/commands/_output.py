"""The CLI's own output: one function every command uses for what it tells the user.

The library never writes to the terminal (it logs); only the commands do, through this.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def echo(*values: Any, file: TextIO | None = None, sep: str = " ", end: str = "\n",
         flush: bool = False) -> None:
    """Write a line for the user (stdout by default), like ``print``."""
    stream = file if file is not None else sys.stdout
    stream.write(sep.join(str(v) for v in values) + end)
    if flush:
        stream.flush()
