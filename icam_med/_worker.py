"""The start of a batch worker process, in a module that imports nothing heavy.

A ``spawn`` worker unpickles its initializer before anything else. Were it in
``icam_med.batch``, the worker would import torch (seconds, more under load) before it could
ask to die with its coordinator: a coordinator killed in that window left orphans. Here the
worker sets up its death with the coordinator first, then imports torch.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

__all__ = ["die_with", "init_worker"]


def die_with(parent: int) -> None:
    """End this worker process when ``parent`` (its coordinator) dies, even by SIGKILL.

    On Linux the kernel sends SIGKILL at the parent's death (``PR_SET_PDEATHSIG``); on every
    system a daemon thread also checks once a second that the parent is still there.
    """
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="icam-med-parent-watch", daemon=True).start()


def init_worker(threads: int, parent: int) -> None:
    """Tie the worker to its coordinator, then set torch's thread count."""
    die_with(parent)
    import torch

    torch.set_num_threads(threads)
