"""`icam-med bench --pipeline` at a tiny size, and what verify hands to a resumed audit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from io_helpers import write_tiny_config

import icam_med.audit.record as record_module
from icam_med.audit import AuditRecord, Ledger, verify_folder
from icam_med.batch import plan_resume
from icam_med.cli import main
from icam_med.discovery import ScanSpec
from icam_med.evaluation.dicom_series import write_dicom_series
from icam_med.evaluation.pipeline_bench import STAGES, sealed_folder, synthetic_ct


def test_bench_pipeline_audits_series_and_reports_every_figure(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path)
    rows_file = tmp_path / "rows.json"
    code = main(["bench", "--pipeline", "--scans", "2", "--shape", "24", "20", "10",
                 "--backend", "local", "--config", str(cfg), "--work", str(tmp_path / "w"),
                 "--json", str(rows_file)])
    assert code == 0
    table = capsys.readouterr().out
    assert "| local | 2 |" in table and "record (s)" in table
    [row] = json.loads(rows_file.read_text())
    assert row["failed"] == 0 and row["n_scans"] == 2 and row["scans_per_min"] > 0
    assert all(row["stages_s"][s] is not None and row["stages_s"][s] >= 0 for s in STAGES)
    # the worker's total covers its stages (load to write)
    worker_stages = sum(row["stages_s"][s] for s in STAGES if s != "record")
    assert row["worker_s"] >= 0.9 * worker_stages
    assert "worker total (s)" in table
    assert row["coordinator_peak_mb"] > 50  # a Python process with torch
    # every scan's outputs were written: a map, a Parametric Map, a summary and a record
    audit = next((tmp_path / "w").glob("audit-local-*"))
    assert verify_folder(audit).ok and verify_folder(audit).n_scans == 2
    sizes = [sum(f.stat().st_size for f in d.iterdir()) for d in (audit / "scans").iterdir()]
    assert row["bytes_per_scan"] == pytest.approx(np.mean(sizes))
    assert len(list((tmp_path / "w" / "series").iterdir())) == 2


def test_bench_pipeline_refuses_bad_options_before_any_work(tmp_path, capsys):
    assert main(["bench", "--pipeline", "--shape", "4", "32", "32", "--work",
                 str(tmp_path / "w")]) == 2
    assert "--shape" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_verify_report_carries_the_voxel_hashes_resume_needs(tmp_path, monkeypatch):
    cfg = write_tiny_config(tmp_path)
    series = tmp_path / "series"
    write_dicom_series(synthetic_ct((20, 18, 8)), series, spacing=(1.5, 1.5, 2.0),
                       modality="CT")
    out = sealed_folder(tmp_path / "audit", 3, cfg, series)
    report = verify_folder(out)
    assert report.ok and sorted(report.verified_scans) == ["s00000", "s00001", "s00002"]
    for sid in report.verified_scans:
        rec = AuditRecord.load(out / "scans" / sid / "cam.icam.json")
        assert report.voxel_hashes[sid] == rec.input.voxel_sha256
    # resuming reads each record once (verify), not twice (verify, then the voxel hashes);
    # every reading of a record's bytes (AuditRecord.load and verify's own) parses them here
    loads = []
    real = record_module.AuditRecord.from_bytes.__func__

    def counting(cls, *args, **kwargs):
        loads.append(kwargs.get("path"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(record_module.AuditRecord, "from_bytes", classmethod(counting))
    specs = [ScanSpec(scan_id=sid, path=series) for sid in report.verified_scans]
    plan = plan_resume(out, Ledger(out), specs)
    assert sorted(plan.skipped) == sorted(report.verified_scans) and not plan.todo
    assert len(loads) == 3


def test_bench_verify_builds_a_sealed_folder_and_times_verify(tmp_path, capsys):
    cfg = write_tiny_config(tmp_path)
    rows_file = tmp_path / "verify.json"
    argv = ["bench", "--verify", "3", "--shape", "20", "18", "8", "--config", str(cfg),
            "--work", str(tmp_path / "w"), "--json", str(rows_file)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "built 3 sealed scans" in out and "sealing took" in out
    assert "verify: 3 scans, 12 files" in out and "as a fresh process" in out
    row = json.loads(rows_file.read_text())
    assert row["ok"] and row["n_scans"] == 3 and row["files"] == 12
    assert row["verify_s"] > 0 and row["cli_s"] > row["verify_s"]  # start-up included
    assert row["seal_first_s"] > 0 and row["seal_last_s"] > 0
    folder = tmp_path / "w" / "audit-3"
    report = verify_folder(folder)
    assert report.ok and report.n_scans == 3
    assert row["bytes"] == sum(f.stat().st_size for f in folder.rglob("*")
                               if f.is_file() and f.name != ".icam-med.lock")
    # run again: the folder is reused (nothing built), and still verifies
    assert main(argv) == 0
    assert "reused the folder of 3 sealed scans" in capsys.readouterr().out
    assert json.loads(rows_file.read_text())["seal_first_s"] is None
