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
from icam_med.audit.phi import check_no_phi, find_phi, screen_text, scrub_paths
from icam_med.audit.record import (
    OutputRef,
    parse_json_bytes,
    record_sha256,
    safe_name,
    seal_record,
    utc_now,
)
from icam_med.audit.schema import LedgerError, validate_entry, validate_record
from icam_med.io.atomic import atomic_write_text

__all__ = ["LEDGER_NAME", "LOCK_NAME", "FolderLock", "Ledger", "LedgerEntry", "LedgerError",
           "entry_sha256"]

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
LOCK_NAME = ".icam-med.lock"
LEDGER_SCHEMA = "icam-med.ledger-entry/1"
#: An entry names a record and its outputs; a line far longer than this is not an entry.
MAX_ENTRY_BYTES = 4 * 1024 * 1024
#: ledger file -> what :meth:`Ledger.referenced_paths` last read of it: device, inode, bytes
#: read (whole lines), the last line read (with its newline) and the paths pinned so far.
_PINNED: dict[Path, tuple[int, int, int, bytes, frozenset[str]]] = {}


def entry_sha256(entry: Mapping[str, Any]) -> str:
    """SHA-256 of an entry's canonical JSON without its ``entry_sha256`` field."""
    return sha256_json({k: v for k, v in entry.items() if k != "entry_sha256"})


@dataclass(frozen=True)
class LedgerEntry:
    """One ledger entry, parsed and checked against the ledger-entry schema.

    Build it with :meth:`parse` (a line of ``ledger.jsonl``): the one parser that
    :class:`Ledger`, :func:`~icam_med.audit.verify.verify_folder`, the batch summary and the
    report all use.

    Attributes:
        seq: its sequence number (1 for the first line).
        kind: ``scan``, ``failure``, ``run-start`` or ``run-end``.
        data: the entry's JSON object as written (its hash is over this).
        line: the 1-based line it was read from, when read from a file.
    """

    seq: int
    kind: str
    data: dict[str, Any]
    line: int | None = None

    @classmethod
    def parse(cls, line: bytes | str, lineno: int | None = None, *,
              path: str | Path | None = None) -> LedgerEntry:
        """Parse one line of a ledger.

        Args:
            line: the line's bytes (or text), without or with its newline.
            lineno: its 1-based line number, named in errors.
            path: the ledger file, named in errors.

        Raises:
            LedgerError: the line is not JSON, not an object, or not an entry of the schema
                (the error names the file, the line and the field).
        """
        raw = line.encode("utf-8") if isinstance(line, str) else bytes(line)
        if len(raw) > MAX_ENTRY_BYTES:
            raise LedgerError(f"not a valid ledger entry ({len(raw)} bytes, too long for one)",
                              path=path, field="<entry>", line=lineno)
        try:
            data = parse_json_bytes(raw, what="the line")
        except ValueError as exc:
            raise LedgerError(f"not a valid ledger entry ({exc}; changed bytes?)",
                              path=path, field="<entry>", line=lineno) from None
        if not isinstance(data, dict):
            raise LedgerError(f"not a valid ledger entry (a JSON {type(data).__name__}, not "
                              "an object)", path=path, field="<entry>", line=lineno)
        validate_entry(data, path=path, line=lineno)
        return cls(data["seq"], data["kind"], data, lineno)

    @property
    def sha256(self) -> str:
        """The ``entry_sha256`` the entry states for itself."""
        return self.data["entry_sha256"]

    @property
    def previous_sha256(self) -> str:
        return self.data["previous_entry_sha256"]

    def hash_ok(self) -> bool:
        """Whether the entry still hashes to its own ``entry_sha256``."""
        return entry_sha256(self.data) == self.sha256

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def time_utc(self) -> str:
        return self.data["time_utc"]

    @property
    def scan_id(self) -> str | None:
        return self.data.get("scan_id")

    @property
    def record(self) -> OutputRef | None:
        """The record a ``scan`` entry pins (role ``record``)."""
        ref = self.data.get("record")
        return None if ref is None else OutputRef(ref["path"], "record", ref["sha256"],
                                                  ref["size"])

    @property
    def record_sha256(self) -> str | None:
        return self.data.get("record_sha256")

    @property
    def outputs(self) -> tuple[OutputRef, ...]:
        """The outputs a ``scan`` entry pins."""
        return tuple(OutputRef.from_dict(o) for o in self.data.get("outputs") or ())

    @property
    def reason(self) -> str | None:
        """A ``failure`` entry's reason."""
        return self.data.get("reason")

    @property
    def details(self) -> dict[str, Any]:
        """A ``run-start``/``run-end`` entry's details."""
        return dict(self.data.get("details") or {})


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

    def read(self) -> tuple[list[LedgerEntry], list[LedgerError]]:
        """Every line parsed: ``(entries, errors)``, each in file order.

        A line that is not an entry (an empty one included) becomes a :class:`LedgerError`
        naming its line; a torn last line (no newline) is one too. Hashes and the chain are not checked here (see
        :func:`~icam_med.audit.verify.verify_folder`).
        """
        data = self._read_bytes()
        if not data:
            return [], []
        lines = data.split(b"\n")
        torn = lines[-1] != b""
        if not torn:
            lines.pop()  # the newline ending the last entry
        entries: list[LedgerEntry] = []
        errors: list[LedgerError] = []
        for i, raw in enumerate(lines, start=1):
            if i == len(lines) and torn:
                errors.append(LedgerError("the last line is incomplete (torn write)",
                                          path=self.path, field="<entry>", line=i))
                break
            try:  # an empty line is damage too: the ledger never writes one
                entries.append(LedgerEntry.parse(raw, i, path=self.path))
            except LedgerError as exc:
                errors.append(exc)
        return entries, errors

    def referenced_paths(self) -> set[str]:
        """Every path (relative to the folder) that a well-formed entry pins: records and
        outputs. Nothing may remove or replace these files.

        The ledger only grows, and this is asked before every write and seal of a batch: a
        process remembers what it read of each ledger (up to the last complete line) and
        reads only the lines appended since, as long as the file is the same one (device
        and inode) and still holds, where the read stopped, the line it read last. Anything
        else (a ledger truncated, replaced or rewritten there) is read again from the
        start. Without this, a coordinator sealing N scans re-read N ledger lines per scan
        (a seal of the 1000th scan spent ~0.2 s in it).
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return set()
        try:
            st = os.fstat(fd)
            start, paths = 0, set()
            seen = _PINNED.get(self.path)
            if seen is not None and seen[:2] == (st.st_dev, st.st_ino) \
                    and seen[2] <= st.st_size \
                    and os.pread(fd, len(seen[3]), seen[2] - len(seen[3])) == seen[3]:
                start, paths = seen[2], set(seen[4])
            data = os.pread(fd, st.st_size - start, start) if st.st_size > start else b""
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # a torn last line is no entry (yet)
        lines = data[:end].split(b"\n")[:-1]
        for raw in lines:
            try:  # a malformed line pins nothing (verify reports it)
                entry = LedgerEntry.parse(raw, path=self.path)
            except LedgerError:
                continue
            if entry.record is not None:
                paths.add(entry.record.path)
            paths.update(o.path for o in entry.outputs)
        if lines:
            _PINNED[self.path] = (st.st_dev, st.st_ino, start + end, lines[-1] + b"\n",
                                  frozenset(paths))
        return paths

    def entries(self) -> list[LedgerEntry]:
        """All well-formed entries, in file order (malformed lines are left out: see
        :meth:`read`). Does not verify them (see verify)."""
        return self.read()[0]

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
            entry = LedgerEntry.parse(last, path=self.path)
        except LedgerError as exc:
            raise LedgerError(
                f"the last line is not a ledger entry ({exc.detail}); run `icam-med verify` "
                "on the folder.", path=self.path, field=exc.field) from None
        return entry.seq, entry.sha256

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
            return LedgerEntry(entry["seq"], kind, entry)  # parse(line) would give the same

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
                    identifiers: tuple[str, ...] = (), keep: tuple[str, ...] = (),
                    names: tuple[str, ...] = ()) -> LedgerEntry:
        """Log a scan that failed, with its reason, screened like a record.

        Absolute paths are cut to ``<path>`` (file names can name a patient), paths inside
        the folder become relative, and every known identifier (a whole token) becomes
        ``<withheld>``. Should the entry still carry an identifier, the reason is replaced by
        its exception type only.

        Args:
            scan_id: the scan's (pseudonymous) id in the folder.
            reason: what went wrong.
            run_id: the run.
            identifiers: the scan's known identifiers (header values): never written.
            keep: further folders whose paths become relative rather than cut.
            names: folder and file names on the scan's path: withheld from the reason too
                (they may name the patient) but, unlike ``identifiers``, not searched for
                in the rest of the entry (the scan id may come from one of them).
        """
        text = scrub_paths(reason, keep=(str(self.root), *keep), names=False)
        text = screen_text(text, (*identifiers, *names))[:2000]
        try:
            return self.append("failure", run_id=run_id, scan_id=safe_name(scan_id),
                               identifiers=identifiers, reason=text)
        except ValueError:
            short = screen_text(text.split(":", 1)[0][:80], identifiers)
            if find_phi({"r": short}, identifiers):
                short = "error"
            return self.append("failure", run_id=run_id, scan_id=safe_name(scan_id),
                               identifiers=identifiers,
                               reason=f"{short}: (message withheld: it held identifiers)")


class FolderLock:
    """An exclusive, non-blocking lock on an output folder, held by ``audit`` for a whole
    batch run and by ``explain`` (:func:`icam_med.explain.write_explanation`) from its
    last check to its ledger entry.

    The lock is an ``flock`` on ``<out>/.icam-med.lock``: the kernel releases it when the
    holding process dies, so a killed run never leaves the folder locked, while a second
    live process (or a second lock object in this one) is refused. A caller that holds
    the lock passes it on (:attr:`icam_med.audit.AuditContext.lock`) instead of taking it
    again. (``flock`` over some network file systems is advisory only.)
    """

    def __init__(self, root: str | Path) -> None:
        self.path = Path(root) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def covers(self, root: str | Path) -> bool:
        """Whether this object holds the lock of folder ``root``."""
        return self.held and self.path.resolve() == (Path(root) / LOCK_NAME).resolve()

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
