"""The run ledger: an append-only, hash-chained event log per output folder.

``<out>/ledger.jsonl`` holds one JSON object per line (canonical JSON: sorted keys, no
whitespace). Every entry carries ``previous_entry_sha256``, the ``entry_sha256`` of the
entry before it (64 zeros for the first), and its own ``entry_sha256`` over its canonical
JSON without that field. Changing, removing or reordering any entry therefore breaks the
chain at that entry, and every file an entry names is pinned by its SHA-256.

Entry kinds:

* ``scan``: one explained scan: its record (path, file SHA-256, record hash) and outputs.
* ``failure``: a scan that could not be explained, with the reason (paths scrubbed).
* ``run-start`` / ``run-end``: a batch run's start and end, with counts.

Appends happen under an exclusive ``flock`` on the ledger file, so two processes writing
into one folder (two ``explain`` commands, say) still produce one valid chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icam_med.audit.hashing import ZERO_HASH, canonical_json, sha256_file, sha256_json
from icam_med.audit.phi import check_no_phi, scrub_paths
from icam_med.audit.record import record_sha256, safe_name, seal_record, utc_now
from icam_med.audit.schema import validate_record
from icam_med.io.atomic import atomic_write_text

__all__ = ["LEDGER_NAME", "LOCK_NAME", "FolderLock", "Ledger", "LedgerEntry", "entry_sha256"]

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".icam-med.lock"
LEDGER_SCHEMA = "icam-med.ledger-entry/1"


def entry_sha256(entry: Mapping[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its ``entry_sha256`` field."""
    return sha256_json({k: v for k, v in entry.items() if k != "entry_sha256"})


@dataclass(frozen=True)
class LedgerEntry:
    """One parsed ledger line."""

    seq: int
    kind: str
    data: dict[str, Any]

    @property
    def sha256(self) -> str:
        return self.data["entry_sha256"]

    @property
    def scan_id(self) -> str | None:
        return self.data.get("scan_id")


class Ledger:
    """The ledger of one output folder.

    Args:
        root: the output folder; every path in the ledger is relative to it.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.path = self.root / LEDGER_NAME
        self._fd: int | None = None

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[Ledger]:
        """Hold an exclusive lock on the ledger (blocking) for a read-head-then-append."""
        if self._fd is not None:  # re-entrant within one process
            yield self
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._fd = fd
            yield self
        finally:
            self._fd = None
            os.close(fd)  # closing releases the lock

    # -- reading ---------------------------------------------------------------------------
    def _read_bytes(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def entries(self) -> list[LedgerEntry]:
        """All complete entries, in file order. Does not verify them (see verify)."""
        out = []
        for line in self._read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict) and isinstance(d.get("seq"), int):
                out.append(LedgerEntry(d["seq"], str(d.get("kind")), d))
        return out

    def head(self) -> tuple[int, str]:
        """``(sequence, entry_sha256)`` of the last entry, ``(0, ZERO_HASH)`` when empty.

        Reads only the end of the file, so appending stays cheap for long ledgers.

        Raises:
            ValueError: the last line is torn or not a ledger entry.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0, ZERO_HASH
        if size == 0:
            return 0, ZERO_HASH
        with open(self.path, "rb") as fh:
            block = 4096
            tail = b""
            pos = size
            while pos > 0 and tail.count(b"\n") < 2:
                step = min(block, pos)
                pos -= step
                fh.seek(pos)
                tail = fh.read(step) + tail
                block *= 2
        if not tail.endswith(b"\n"):
            raise ValueError(
                f"ledger {self.path} ends in a partial line (an interrupted write); a batch "
                "re-run repairs it, or run `icam-med verify` to inspect it."
            )
        last = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
        try:
            d = json.loads(last)
            return int(d["seq"]), str(d["entry_sha256"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"the last line of ledger {self.path} is not a ledger entry; run "
                "`icam-med verify` on the folder."
            ) from None

    def repair_torn_tail(self) -> bool:
        """Cut a partial last line left by an interrupted append. Returns whether it did.

        An append is one ``write`` of a whole line, so a partial line is an entry that was
        never completed; the scan it would have logged is simply not done.
        """
        with self.locked():
            data = self._read_bytes()
            if not data or data.endswith(b"\n"):
                return False
            keep = data.rfind(b"\n") + 1
            os.truncate(self.path, keep)
            log.warning("ledger %s: removed a partial last line (%d bytes) left by an "
                        "interrupted write", self.path, len(data) - keep)
            return True

    # -- writing ---------------------------------------------------------------------------
    def append(self, kind: str, *, run_id: str, scan_id: str | None = None,
               identifiers: tuple[str, ...] = (), **fields: Any) -> LedgerEntry:
        """Append one entry (under the lock) and return it.

        Args:
            kind: ``scan``, ``failure``, ``run-start`` or ``run-end``.
            run_id: the run this event belongs to.
            scan_id: the scan, for ``scan`` and ``failure`` entries.
            identifiers: known patient identifiers that must not appear (see phi.find_phi).
            **fields: further JSON fields (``record``, ``outputs``, ``reason``, ``details``...).

        Raises:
            ValueError: the entry would carry patient identifiers, or the ledger is damaged.
        """
        with self.locked():
            seq, prev = self.head()
            entry: dict[str, Any] = {
                "schema": LEDGER_SCHEMA,
                "seq": seq + 1,
                "kind": kind,
                "time_utc": utc_now(),
                "run_id": run_id,
            }
            if scan_id is not None:
                entry["scan_id"] = scan_id
            entry.update(fields)
            entry["previous_entry_sha256"] = prev
            check_no_phi(entry, identifiers, what="ledger entry")
            entry["entry_sha256"] = entry_sha256(entry)
            line = canonical_json(entry) + b"\n"
            assert self._fd is not None
            os.write(self._fd, line)  # one write of one line, O_APPEND
            os.fsync(self._fd)
            return LedgerEntry(entry["seq"], kind, entry)

    def commit_record(self, record: Mapping[str, Any], record_path: str | Path, *,
                      identifiers: tuple[str, ...] = ()) -> tuple[dict[str, Any], LedgerEntry]:
        """Seal, check and write a record, then log it with its outputs: the one audit seam.

        Under the ledger lock: the record gets its ledger position and the previous entry's
        hash, is validated against the schema, checked for patient identifiers, written
        atomically to ``record_path`` (inside the output folder; never overwriting), and a
        ``scan`` entry naming the record and every output is appended.

        Args:
            record: an unsealed record (see :func:`icam_med.audit.record.build_record`) whose
                ``outputs`` were hashed after they were written.
            record_path: where the record goes, usually ``<map-name>.icam.json``; a relative
                path is taken relative to the output folder.
            identifiers: known patient identifiers that must appear nowhere.

        Returns:
            The sealed record and its ledger entry.

        Raises:
            ValueError: schema violation or patient identifiers; nothing is written then.
            FileExistsError: the record file already exists.
        """
        target = Path(record_path)
        target = target if target.is_absolute() else self.root / target
        rel = target.resolve().relative_to(self.root).as_posix()
        with self.locked():
            seq, prev = self.head()
            sealed = seal_record(record, seq + 1, prev)
            validate_record(sealed)
            check_no_phi(sealed, identifiers)
            text = json.dumps(sealed, indent=2, sort_keys=True, ensure_ascii=False,
                              allow_nan=False) + "\n"
            atomic_write_text(target, text)
            try:
                entry = self.append(
                    "scan",
                    run_id=sealed["activity"]["run_id"],
                    scan_id=sealed["scan_id"],
                    identifiers=identifiers,
                    record={"path": rel, "sha256": sha256_file(target),
                            "size": target.stat().st_size},
                    record_sha256=record_sha256(sealed),
                    outputs=sealed["outputs"],
                )
            except BaseException:
                target.unlink(missing_ok=True)  # no record without its ledger entry
                raise
        return sealed, entry

    def log_failure(self, scan_id: str, reason: str, *, run_id: str,
                    identifiers: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> LedgerEntry:
        """Log a scan that failed, with its reason (absolute paths scrubbed).

        Should the reason still carry an identifier, it is replaced by its exception type only.
        """
        text = scrub_paths(reason, keep=(str(self.root), *keep))[:2000]
        try:
            return self.append("failure", run_id=run_id, scan_id=safe_name(scan_id),
                               identifiers=identifiers, reason=text)
        except ValueError:
            short = text.split(":", 1)[0][:80]
            return self.append("failure", run_id=run_id, scan_id=safe_name(scan_id),
                               identifiers=identifiers,
                               reason=f"{short}: (message withheld: it held identifiers)")


class FolderLock:
    """An exclusive, non-blocking lock on an output folder for a whole batch run.

    The lock is an ``flock`` on ``<out>/.icam-med.lock``: the kernel releases it when the
    holding process dies, so a killed run never leaves the folder locked, while a second
    live run is refused. (``flock`` over some network file systems is advisory only.)
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            FileExistsError: another live process holds it.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError):
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise FileExistsError(
                f"output folder {self.path.parent} is in use by another icam-med run "
                f"({holder or 'unknown process'}); wait for it to finish or use another folder."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} since {utc_now()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

