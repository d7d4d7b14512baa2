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

__all__ = ["die_with", "host_name", "init_worker", "share_cores"]


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


def host_name() -> str:
    """This process's host name (run on each Dask worker to count the workers per host)."""
    import socket

    return socket.gethostname()


def share_cores(workers_on_host: dict[str, int]) -> int:
    """Set torch's thread count of this (Dask worker) process to its share of the host's cores.

    Run on every worker of a cluster (``Client.run``) before the first scan. A Dask nanny
    starts its worker with ``OMP_NUM_THREADS=1``, so torch would run one thread on a host of
    any size (one worker on a 16-core node: 1 core busy); ``W`` workers on a host of ``C``
    cores get ``C // W`` threads each, as ``--workers`` gives its processes.

    Args:
        workers_on_host: worker processes per host name (:func:`host_name` on each worker).

    Returns:
        The thread count set.
    """
    import torch

    n = max(1, int(workers_on_host.get(host_name(), 1)))
    threads = max(1, (os.cpu_count() or 1) // n)
    torch.set_num_threads(threads)
    return threads
