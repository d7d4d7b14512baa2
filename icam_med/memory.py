"""Giving freed heap memory back to the operating system between the peaks of a scan.

glibc keeps memory freed by many mid-sized blocks (a network's activations and gradients,
a volume's slices) for reuse. That memory stays in the process's resident set, and the next
peak (a batched forward, the full-size map) is often allocated beside it rather than in it,
so the peaks of one scan stack up. :func:`release_freed_memory` (``malloc_trim(0)``) returns
it; the engine and the scan pipeline call it between their stages.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["release_freed_memory"]

log = logging.getLogger(__name__)


def release_freed_memory() -> None:
    """Give the C heap's free memory back to the operating system (glibc only).

    Measured on a DenseNet121 at 96x96x64 (2-core CPU VM): after the backward pass about
    290 MB of freed activations stay resident; trimmed, the counterfactual forward that follows
    reuses the address space instead of adding 300 MB on top. Elsewhere (macOS, Windows,
    musl) this does nothing. Costs a few milliseconds.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: no malloc_trim
        log.debug("malloc_trim not available; freed memory stays with the process")
