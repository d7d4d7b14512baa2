"""Verifying an output folder: every output, every record and the ledger chain.

:func:`verify_folder` re-hashes every file the ledger names, re-derives every record's
self-hash and every entry's hash, and walks the chain. It reports the first broken entry
(and everything else it found), so ``icam-med verify DIR`` can say exactly where the
evidence stops holding.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icam_med.audit.hashing import ZERO_HASH, sha256_bytes, sha256_file
from icam_med.audit.ledger import LEDGER_NAME, LedgerEntry
from icam_med.audit.record import (
    MAX_RECORD_BYTES,
    RECORD_SUFFIX,
    AuditRecord,
    OutputRef,
    RecordError,
    resolve_inside,
)
from icam_med.audit.schema import LedgerError
from icam_med.audit.signing import SIGNATURES_NAME, read_signatures
from icam_med.paths import SCANS_DIR

__all__ = ["Problem", "VerifyReport", "resolve_inside", "verify_folder"]


@dataclass(frozen=True)
class Problem:
    """One broken thing.

    Attributes:
        line: the ledger line (1-based), ``None`` for folder-level problems.
        message: what is wrong.
        kind: ``"ledger"`` (the chain itself), ``"outputs"`` (a logged scan's record or
            outputs changed or missing), ``"unlogged"`` (a record, or a file under ``scans/``, no entry names) or
            ``"signature"`` (a run's signed head is missing or does not verify).
        scan_id: the scan concerned, for ``"outputs"`` problems.
    """

    line: int | None
    message: str
    kind: str = "ledger"
    scan_id: str | None = None

    def __str__(self) -> str:
        return f"ledger line {self.line}: {self.message}" if self.line else self.message


@dataclass
class VerifyReport:
    """What :func:`verify_folder` found.

    Attributes:
        verified_scans: scan id -> the ledger position of its (last) ``scan`` entry whose
            record and outputs verify.
        voxel_hashes: scan id -> the input voxel SHA-256 pinned by the record of the entry
            in ``verified_scans`` (read while verifying it: a resumed audit reads no record
            twice).
        region_hashes: scan id -> the target region's SHA-256 pinned by that record, for
            the scans explained over a region.
    """

    folder: Path
    n_entries: int = 0
    n_scans: int = 0
    n_failures: int = 0
    n_files: int = 0
    problems: list[Problem] = field(default_factory=list)
    verified_scans: dict[str, int] = field(default_factory=dict)
    voxel_hashes: dict[str, str] = field(default_factory=dict)
    region_hashes: dict[str, str] = field(default_factory=dict)
    head_sha256: str | None = None
    signed_runs: list[str] = field(default_factory=list)
    unsigned_runs: list[str] = field(default_factory=list)
    signatures_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def summary(self) -> str:
        """A one-line summary for the command line."""
        if self.ok:
            return (f"OK {self.folder}: {self.n_entries} ledger entries chained, "
                    f"{self.n_scans} scan record(s), {self.n_failures} failure(s) logged, "
                    f"{self.n_files} file(s) re-hashed; head {self.head_sha256}; "
                    f"{self.signature_line()}")
        more = f" (+{len(self.problems) - 1} more problem(s))" if len(self.problems) > 1 else ""
        return f"BROKEN {self.folder}: {self.first_problem}{more}"


    def signature_line(self) -> str:
        """How many runs carry a signed head, and whether signatures were checked."""
        n_signed, n_unsigned = len(self.signed_runs), len(self.unsigned_runs)
        text = f"run(s): {n_signed} signed, {n_unsigned} unsigned"
        if n_unsigned:
            text += f" ({', '.join(self.unsigned_runs[:5])}{', ...' if n_unsigned > 5 else ''})"
        if not self.signatures_checked:
            text += " (signatures not checked: give --public-key)"
        return text


def _check_signatures(root: Path, report: VerifyReport, heads: dict[str, LedgerEntry],
                      by_seq: dict[int, LedgerEntry], public_key: Any) -> None:
    """Match ``ledger.sig.jsonl`` to the runs' heads; with a key, check every signature and
    require one per run."""
    sigs, bad = read_signatures(root)
    for line, what in bad:
        report.problems.append(Problem(None, f"{SIGNATURES_NAME} line {line}: {what}",
                                       "signature"))
    signed: set[str] = set()
    for sig in sigs:
        entry = by_seq.get(sig.seq)
        if entry is None or entry.sha256 != sig.entry_sha256 or entry.run_id != sig.run_id:
            report.problems.append(Problem(
                None, f"{SIGNATURES_NAME} line {sig.line}: signs entry {sig.seq} of run "
                      f"{sig.run_id}, which the ledger does not hold (rewritten ledger?)",
                "signature"))
            continue
        if public_key is not None and not sig.valid_for(public_key):
            report.problems.append(Problem(
                None, f"{SIGNATURES_NAME} line {sig.line}: the signature of run {sig.run_id} "
                      "does not verify with the given public key", "signature"))
            continue
        if heads.get(sig.run_id) is not None and heads[sig.run_id].seq == sig.seq:
            signed.add(sig.run_id)
    report.signed_runs = [r for r in heads if r in signed]
    report.unsigned_runs = [r for r in heads if r not in signed]
    report.signatures_checked = public_key is not None
    if public_key is not None:
        for rid in report.unsigned_runs:
            report.problems.append(Problem(
                heads[rid].line, f"run {rid} (entries up to {heads[rid].seq}) has no valid "
                                 "signature of its head by the given key: it was written "
                                 "without the site key, interrupted, or rewritten",
                "signature"))


def _threads() -> int:
    """Threads that check files at once: two per core (one hashes while the other reads),
    at most 8. On the 2-core development VM, re-hashing 350 MB of maps took 3.0-3.3 s with
    one thread, 1.9-2.1 s with two and 1.5-1.7 s with four."""
    return max(2, min(8, 2 * (os.cpu_count() or 1)))


def _open_checked(root: Path, ref: OutputRef | None, what: str
                  ) -> tuple[Path | None, str | None]:
    """``(the file, None)`` when the ref names a file inside the folder of the recorded
    size, else ``(None, what is wrong)``."""
    if ref is None:
        return None, f"{what}: no file reference"
    path = resolve_inside(root, ref.path)
    if path is None:
        return None, (f"{what}: path {ref.path!r} is not a relative path inside the folder "
                      "(absolute, '..', or a symbolic link leading out of it)")
    try:
        st = os.stat(path)  # one stat: is it a file, and its size
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        return None, f"{what} '{ref.path}' is missing"
    size = st.st_size
    if size != ref.size:
        return None, f"{what} '{ref.path}' was changed (size {size}, recorded {ref.size})"
    return path, None


def _changed(ref: OutputRef, what: str) -> str:
    return f"{what} '{ref.path}' was changed (its SHA-256 differs from the ledger's)"


def _check_file(root: Path, ref: OutputRef | None, what: str) -> str | None:
    """None if the file matches its reference, else what is wrong."""
    path, bad = _open_checked(root, ref, what)
    if bad:
        return bad
    assert path is not None and ref is not None
    return None if sha256_file(path) == ref.sha256 else _changed(ref, what)


def _check_record(root: Path, entry: LedgerEntry) -> tuple[list[str], AuditRecord | None]:
    """Problems with a scan entry's record and outputs, and the record (once parsed).

    The record is read once: its bytes are hashed against the ledger and then parsed.
    """
    ref = entry.record
    path, bad = _open_checked(root, ref, "record")
    if bad:
        return [bad], None
    assert path is not None and ref is not None
    if ref.size > MAX_RECORD_BYTES:  # hash it without holding it; the reader refuses it
        raw = None
        if sha256_file(path) != ref.sha256:
            return [_changed(ref, "record")], None
    else:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_RECORD_BYTES + 1)
        if sha256_bytes(raw) != ref.sha256:
            return [_changed(ref, "record")], None
    try:
        record = (AuditRecord.load(path, root=root) if raw is None
                  else AuditRecord.from_bytes(raw, path=path, root=root))
    except RecordError as exc:
        return [f"record '{ref.path}' {exc.detail}"], None
    problems = []
    if not record.self_hash_ok() or record.record_sha256 != entry.record_sha256:
        problems.append(f"record '{ref.path}' does not match its own hash or the ledger's")
    if record.sequence != entry.seq or record.previous_entry_sha256 != entry.previous_sha256:
        problems.append(f"record '{ref.path}' belongs to another ledger position")
    if record.outputs != entry.outputs:
        problems.append(f"record '{ref.path}' lists other outputs than its ledger entry")
    for out in entry.outputs:
        bad = _check_file(root, out, f"output ({out.role or '?'})")
        if bad:
            problems.append(bad)
    return problems, record


def verify_folder(folder: str | Path, *, check_files: bool = True,
                  anchor: str | None = None, public_key: Any = None) -> VerifyReport:
    """Verify an output folder.

    Args:
        folder: a folder holding ``ledger.jsonl``.
        check_files: re-hash outputs and records (``False``: the chain only).
        anchor: an ``entry_sha256`` kept outside the folder (an earlier ``head``); it must
            be one of the chain's entries, else the ledger was rewritten or truncated.
        public_key: the site's Ed25519 public key (see :mod:`icam_med.audit.signing`):
            every run must then carry a valid signature of its head by it; without it, runs
            are only counted as signed or unsigned.

    Returns:
        A report; ``report.ok`` is true when everything holds, and ``report.head_sha256``
        is the last entry's hash (keep it elsewhere to anchor the chain). Problems come in ledger
        order, so ``report.first_problem`` names the first broken entry. A line that is not
        a ledger entry (changed bytes, wrong field types, deep nesting) is a problem on its
        line, never an exception. Records (``*.icam.json``) in the folder that no entry
        names are problems too: an entry was removed, or a run was interrupted before
        logging them. Every path an entry names must stay inside the folder, symbolic links
        included.

    Raises:
        FileNotFoundError: the folder or its ledger does not exist.
    """
    root = Path(folder).resolve()
    ledger = root / LEDGER_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give an icam-med output folder.")
    if not ledger.is_file():
        raise FileNotFoundError(
            f"{root} has no {LEDGER_NAME}; give a folder written by `icam-med explain` or "
            "`icam-med audit`."
        )
    report = VerifyReport(folder=root)
    data = ledger.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif data:
        report.problems.append(Problem(len(lines), "the last line is incomplete (torn write)"))
        lines.pop()
    prev: str | None = ZERO_HASH
    heads: dict[str, LedgerEntry] = {}
    by_seq: dict[int, LedgerEntry] = {}
    referenced: set[str] = set()
    seen_hashes: set[str] = set()
    # The chain is walked here, in order; each scan's files are checked by a thread pool
    # (hashing and reading release the GIL) and their problems put back in ledger order.
    chunks: list[list[Problem] | tuple[int, LedgerEntry, Future[Any]]] = []
    pool = ThreadPoolExecutor(_threads()) if check_files else None
    try:
        for i, raw in enumerate(lines, start=1):
            report.n_entries += 1
            found: list[Problem] = []
            chunks.append(found)
            try:
                entry = LedgerEntry.parse(raw, i, path=ledger)
            except LedgerError as exc:
                found.append(Problem(i, exc.detail))
                prev = None  # the chain cannot be followed past this line
                report.head_sha256 = None
                continue
            seq = entry.seq
            hash_ok = entry.hash_ok()
            if not hash_ok:
                found.append(Problem(i, f"entry {seq} was changed: its hash does not match"))
            if seq != i:
                found.append(Problem(
                    i, f"holds entry {seq}, expected {i}: entries were removed, inserted or "
                       "reordered"))
            elif prev is not None and entry.previous_sha256 != prev:
                found.append(Problem(
                    i, f"entry {seq} does not chain to the entry before it (removed or "
                       "reordered)"))
            prev = entry.sha256
            report.head_sha256 = prev
            heads[entry.run_id] = entry  # a run's last entry is its head
            by_seq.setdefault(entry.seq, entry)
            if hash_ok:
                seen_hashes.add(prev)
            if entry.kind == "scan":
                report.n_scans += 1
                outputs = entry.outputs
                if entry.record is not None:
                    referenced.add(entry.record.path)
                referenced.update(o.path for o in outputs)
                if pool is not None:
                    chunks.append((i, entry, pool.submit(_check_record, root, entry)))
                    report.n_files += 1 + len(outputs)
            elif entry.kind == "failure":
                report.n_failures += 1
        for chunk in chunks:
            if isinstance(chunk, list):
                report.problems.extend(chunk)
                continue
            i, entry, future = chunk
            messages, record = future.result()
            report.problems.extend(Problem(i, f"entry {entry.seq}: {m}", "outputs",
                                           entry.scan_id) for m in messages)
            if not messages and entry.scan_id is not None:
                report.verified_scans[entry.scan_id] = entry.seq
                if record is not None:
                    report.voxel_hashes[entry.scan_id] = record.input.voxel_sha256
                    region = (record.method.region or {}).get("sha256")
                    if region is not None:
                        report.region_hashes[entry.scan_id] = region
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    _check_signatures(root, report, heads, by_seq, public_key)
    if anchor is not None and anchor.lower() not in seen_hashes:
        report.problems.append(Problem(
            None, f"anchor {anchor} is not in the ledger: it was rewritten or truncated"))
    for rec in sorted(root.rglob(f"*{RECORD_SUFFIX}")):
        rel = rec.relative_to(root).as_posix()
        if rel not in referenced:
            report.problems.append(Problem(
                None, f"record '{rel}' is not in the ledger (an entry was removed, or a run "
                      "was interrupted before logging it)", "unlogged"))
    scans = root / SCANS_DIR
    if scans.is_dir() and not scans.is_symlink():
        # A batch's workers write into scans/ before the coordinator seals: a file there that
        # no entry names was never sealed (a worker or run was interrupted) and is no evidence.
        for f in sorted(scans.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if (f.is_file() or f.is_symlink()) and rel not in referenced \
                    and not rel.endswith(RECORD_SUFFIX):
                report.problems.append(Problem(
                    None, f"file '{rel}' is not in the ledger (written by a worker or run that "
                          "was interrupted before it was sealed; the next audit run removes it)",
                    "unlogged"))
    return report
