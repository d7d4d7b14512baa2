"""Atomic, non-overwriting file writes.

Every output of icam-med is written to a temporary file in the target's own folder,
flushed and fsynced, then moved into place with :func:`os.replace` (atomic on POSIX and
Windows for paths on one file system). An interrupted run therefore leaves either the
complete file or nothing under the final name; the temporary file is removed on error.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "check_writable"]


def check_writable(path: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an existing ``path`` unless ``overwrite``; return it as a :class:`Path`.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        IsADirectoryError: ``path`` is a folder.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"output path {p} is a folder; expected a file name.")
    if p.exists() and not overwrite:
        raise FileExistsError(
            f"output file {p} already exists; choose another output folder or pass "
            "--overwrite (overwrite=True) to replace it."
        )
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | Path, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """Open a temporary binary file beside ``path``; on success move it onto ``path``.

    Usage::

        with atomic_write(out / "map.nii.gz") as fh:
            fh.write(data)

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (checked before and,
            to narrow races, again right before the rename).
    """
    target = check_writable(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates 0600 files; give the output the mode a plain open() would.
        with contextlib.suppress(OSError, AttributeError):
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if not overwrite and target.exists():
            raise FileExistsError(f"output file {target} appeared while it was being written.")
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_write(path, overwrite=overwrite) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; return the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
