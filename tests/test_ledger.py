"""The hash-chained ledger and `icam-med verify`: tamper evidence, locking, torn writes."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest
from _audit_util import write_three_scans

from icam_med import cli
from icam_med.audit import Ledger, verify_folder
from icam_med.audit.ledger import FolderLock


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """An output folder with three scans, built once; tests work on copies."""
    return write_three_scans(tmp_path_factory.mktemp("ledger"))


@pytest.fixture
def folder(pristine, tmp_path):
    import shutil

    dst = tmp_path / "out"
    shutil.copytree(pristine, dst)
    return dst


def verify_cli(folder, capsys):
    # The real parser and main(), with only this command registered, so that this test
    # does not depend on other commands' modules.
    saved = cli.COMMANDS
    cli.COMMANDS = {"verify": "verify"}
    try:
        code = cli.main(["verify", str(folder)])
    finally:
        cli.COMMANDS = saved
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_intact_folder_verifies(folder, capsys):
    code, text = verify_cli(folder, capsys)
    assert code == 0
    assert text.strip().count("\n") == 0  # one line
    assert "3 ledger entries chained, 3 scan record(s)" in text and "6 file(s) re-hashed" in text


def test_flipped_byte_in_a_map_is_caught(folder, capsys):
    flip_byte(folder / "scan-2" / "icam.nii.gz", 200)
    code, text = verify_cli(folder, capsys)
    assert code == 1
    assert "ledger line 2: entry 2: output (map-nifti) 'scan-2/icam.nii.gz' was changed" in text


def test_flipped_byte_in_a_record_is_caught(folder, capsys):
    record = folder / "scan-3" / "icam.icam.json"
    flip_byte(record, len(record.read_bytes()) // 2)
    code, text = verify_cli(folder, capsys)
    assert code == 1
    assert "ledger line 3: entry 3: record 'scan-3/icam.icam.json' was changed" in text


def test_rewritten_record_with_valid_json_is_caught(folder):
    """A careful forger who re-hashes the record still breaks the ledger's file hash."""
    from icam_med.audit import record_sha256

    path = folder / "scan-1" / "icam.icam.json"
    record = json.loads(path.read_text())
    record["method"]["predicted"]["label"] = "absent"
    record["integrity"]["record_sha256"] = record_sha256(record)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    report = verify_folder(folder)
    assert not report.ok and report.first_problem.line == 1


@pytest.mark.parametrize("line", [1, 2, 3])
def test_flipped_byte_in_the_ledger_is_caught(folder, capsys, line):
    ledger = folder / "ledger.jsonl"
    lines = ledger.read_bytes().split(b"\n")
    offset = sum(len(x) + 1 for x in lines[: line - 1]) + len(lines[line - 1]) // 2
    flip_byte(ledger, offset)
    code, text = verify_cli(folder, capsys)
    assert code == 1
    assert f"ledger line {line}:" in text


def test_removed_entry_is_caught(folder, capsys):
    ledger = folder / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(lines[0] + lines[2])
    code, text = verify_cli(folder, capsys)
    assert code == 1
    assert "ledger line 2: holds entry 3, expected 2" in text


def test_removed_last_entry_is_caught_by_its_orphan_record(folder, capsys):
    ledger = folder / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text("".join(lines[:2]))
    code, text = verify_cli(folder, capsys)
    assert code == 1
    assert "record 'scan-3/icam.icam.json' is not in the ledger" in text


def test_reordered_entries_are_caught(folder, capsys):
    ledger = folder / "ledger.jsonl"
    lines = ledger.read_text().splitlines(keepends=True)
    ledger.write_text(lines[0] + lines[2] + lines[1])
    code, text = verify_cli(folder, capsys)
    assert code == 1
    assert "ledger line 2: holds entry 3, expected 2" in text


def test_renumbered_reorder_is_still_caught(folder):
    """Swapping two entries and fixing their numbers and hashes breaks the chain links."""
    from icam_med.audit.ledger import entry_sha256

    ledger = folder / "ledger.jsonl"
    entries = [json.loads(x) for x in ledger.read_text().splitlines()]
    entries[1], entries[2] = entries[2], entries[1]
    for i, e in enumerate(entries, start=1):
        e["seq"] = i
        e["entry_sha256"] = entry_sha256(e)
    ledger.write_text("".join(json.dumps(e) + "\n" for e in entries))
    report = verify_folder(folder)
    assert not report.ok
    assert report.first_problem.line == 2
    assert "does not chain" in report.first_problem.message


def test_missing_output_and_missing_ledger(folder, tmp_path, capsys):
    (folder / "scan-1" / "icam.nii.gz").unlink()
    code, text = verify_cli(folder, capsys)
    assert code == 1 and "'scan-1/icam.nii.gz' is missing" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    code, text = verify_cli(empty, capsys)
    assert code == 2 and "has no ledger.jsonl" in text


def test_torn_tail_is_reported_then_repaired(folder):
    ledger = Ledger(folder)
    with open(ledger.path, "ab") as fh:
        fh.write(b'{"seq": 4, "kind": "sc')
    report = verify_folder(folder)
    assert not report.ok and "incomplete" in report.first_problem.message
    with pytest.raises(ValueError, match="partial line"):
        ledger.append("run-end", run_id="r")
    assert ledger.repair_torn_tail()
    assert verify_folder(folder).ok
    entry = ledger.append("run-end", run_id="r", details={"n": 3})
    assert entry.seq == 4
    assert verify_folder(folder).ok


def _append_many(root, tag, n):
    ledger = Ledger(root)
    for i in range(n):
        ledger.append("failure", run_id=tag, scan_id=f"{tag}-{i}", reason="test")


def test_concurrent_appends_from_processes_keep_one_chain(tmp_path):
    ctx = mp.get_context("fork")  # fork: no re-import of torch per process
    procs = [ctx.Process(target=_append_many, args=(tmp_path, f"p{k}", 25)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = verify_folder(tmp_path)
    assert report.ok, report.problems
    assert report.n_entries == 50 and report.n_failures == 50


def test_folder_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from icam_med.audit.ledger import FolderLock;"
         f"FolderLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileExistsError, match="in use by another icam-med run"):
            FolderLock(tmp_path).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The kernel released the lock with the killed process; the stale file does not block.
    deadline = time.monotonic() + 5
    while True:
        try:
            with FolderLock(tmp_path):
                break
        except FileExistsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_anchor_catches_a_recomputed_ledger(folder):
    """Someone rewrites the last entry and recomputes its hash: the chain holds, the anchor
    kept elsewhere does not."""
    from icam_med.audit.ledger import entry_sha256

    head = verify_folder(folder).head_sha256
    assert verify_folder(folder, anchor=head).ok
    ledger = folder / "ledger.jsonl"
    lines = ledger.read_text().splitlines()
    last = json.loads(lines[-1])
    last["time_utc"] = "2020-01-01T00:00:00.000Z"
    last["entry_sha256"] = entry_sha256(last)
    ledger.write_text("\n".join([*lines[:-1], json.dumps(last)]) + "\n")
    assert verify_folder(folder).ok  # plain SHA-256 chains can be recomputed...
    report = verify_folder(folder, anchor=head)
    assert not report.ok and "anchor" in report.first_problem.message  # ...but not the anchor
