"""The coordinator's per-scan cost does not grow with the ledger.

Before every seal (and every write over existing files) the audit asks which files the
ledger pins (``Ledger.referenced_paths``). It used to parse the whole ledger each time, so
sealing the N-th scan of a batch parsed N lines: quadratic in the cohort. A process now
reads only the lines appended since its last look, and reads everything again when the
ledger is not the one it read (truncated, replaced, rewritten at the end).
"""

from __future__ import annotations

import os
import shutil

import pytest
from _audit_util import tiny_model_config, write_scan_outputs

import icam_med.audit.ledger as ledger_module
from icam_med.audit import Ledger, verify_folder


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    base = tmp_path_factory.mktemp("pinned")
    out = base / "out"
    out.mkdir()
    cfg = tiny_model_config(base)
    for i in range(3):
        write_scan_outputs(out, f"scan-{i}", seed=i, model_cfg=cfg)
    return out, cfg


@pytest.fixture
def folder(pristine, tmp_path):
    out, cfg = pristine
    dst = tmp_path / "out"
    shutil.copytree(out, dst)
    return dst, cfg


def _pins(i: int) -> set[str]:
    return {f"scan-{i}/icam.icam.json", f"scan-{i}/icam.nii.gz"}


@pytest.fixture
def parsed(monkeypatch):
    """The ledger lines parsed (counted at LedgerEntry.parse)."""
    lines: list[bytes] = []
    real = ledger_module.LedgerEntry.parse.__func__

    def counting(cls, line, *args, **kwargs):
        lines.append(bytes(line))
        return real(cls, line, *args, **kwargs)

    monkeypatch.setattr(ledger_module.LedgerEntry, "parse", classmethod(counting))
    return lines


def test_only_appended_lines_are_read_again(folder, parsed):
    out, cfg = folder
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)
    assert len(parsed) == 3
    parsed.clear()
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)
    assert parsed == []  # nothing new: nothing parsed
    write_scan_outputs(out, "scan-3", seed=3, model_cfg=cfg)  # seals: asks for the pins
    parsed.clear()
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2) | _pins(3)
    assert len(parsed) <= 1  # the one new line at most (the seal may have read it)
    assert verify_folder(out).ok


def test_a_torn_line_pins_nothing_until_it_is_whole(folder):
    out, _ = folder
    ledger = out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(b"".join(lines[:2]) + lines[2][:40])
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1)
    with open(ledger, "ab") as fh:
        fh.write(lines[2][40:])
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)


def test_a_truncated_or_replaced_ledger_is_read_again(folder, parsed):
    out, _ = folder
    ledger = out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1) | _pins(2)
    # truncated in place (same file): the last line read is no longer where it was
    with open(ledger, "r+b") as fh:
        fh.truncate(len(lines[0]) + len(lines[1]))
    parsed.clear()
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(1)
    assert len(parsed) == 2
    # replaced by another file holding, where the last read stopped, the same last line
    # (its first line damaged): the file is another one, so it is read from the start
    inode = os.stat(ledger).st_ino
    other = out / "other.jsonl"
    other.write_bytes(b"x" * (len(lines[0]) - 1) + b"\n" + lines[1])
    os.replace(other, ledger)
    assert os.stat(ledger).st_ino != inode
    assert Ledger(out).referenced_paths() == _pins(1)
    # removed
    ledger.unlink()
    assert Ledger(out).referenced_paths() == set()


def test_a_damaged_line_pins_nothing_and_the_rest_still_counts(folder):
    out, _ = folder
    ledger = out / "ledger.jsonl"
    lines = ledger.read_bytes().splitlines(keepends=True)
    ledger.write_bytes(lines[0] + b'{"not": "an entry"}\n' + lines[2])
    assert Ledger(out).referenced_paths() == _pins(0) | _pins(2)
