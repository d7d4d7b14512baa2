"""Batch audits: `icam-med audit` end to end, PHI-free outputs, bad inputs, kill and resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _audit_util import PHI, PHI_NEEDLES, write_tiny_lesionnet_config
from safetensors.torch import save_file

from icam_med import cli
from icam_med.audit import Ledger, validate_record, verify_folder
from icam_med.batch import map_analysis, run_batch
from icam_med.discovery import collect_scans


def write_config(folder: Path) -> Path:
    return write_tiny_lesionnet_config(folder)


def write_scans(folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        vol = rng.integers(0, 500, (12, 14, 10)).astype(np.int16)
        vol[3:7, 4:9, 3:6] += 600  # a bright "lesion"
        p = folder / f"case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(p))
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("batch")
    cfg = write_config(base)
    nifti = write_scans(base / "nifti", 3)
    from icam_med.evaluation.dicom_series import write_dicom_series

    rng = np.random.default_rng(7)
    vol = rng.integers(0, 500, (10, 14, 12)).astype(np.int16)
    write_dicom_series(vol, base / "dicom" / "series1", modality="MR",
                       patient_name=PHI["PatientName"], patient_id=PHI["PatientID"],
                       patient_birth_date=PHI["PatientBirthDate"],
                       InstitutionName=PHI["InstitutionName"],
                       AccessionNumber=PHI["AccessionNumber"], StudyDate=PHI["StudyDate"],
                       ReferringPhysicianName=PHI["ReferringPhysicianName"])
    mask = np.zeros((12, 14, 10), np.uint8)
    mask[3:7, 4:9, 3:6] = 1
    nib.save(nib.Nifti1Image(mask, np.diag([2.0, 2.0, 3.0, 1.0])), str(base / "mask0.nii.gz"))
    return {"base": base, "config": cfg, "nifti": nifti, "dicom": base / "dicom" / "series1",
            "mask": base / "mask0.nii.gz"}


def run_cli(args, capsys):
    code = cli.main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def scan_entries(out: Path):
    return [e for e in Ledger(out).entries() if e.kind == "scan"]


def test_batch_writes_verified_phi_free_outputs(workspace, tmp_path, capsys):
    ws = workspace
    listing = tmp_path / "scans.csv"
    listing.write_text(
        "path,label,mask\n"
        f"{ws['nifti'][0]},present,{ws['mask']}\n"
        f"{ws['nifti'][1]},absent,\n"
        f"{ws['dicom']},present,\n")
    out = tmp_path / "audit"
    code, stdout, _ = run_cli(["audit", str(listing), "--config", str(ws["config"]),
                               "--out", str(out), "--no-progress", "--operator", "op-17"], capsys)
    assert code == 0, stdout
    assert "3 scan(s): 3 explained" in stdout
    report = verify_folder(out)
    assert report.ok and report.n_scans == 3, report.problems
    # Every record validates and describes its scan.
    records = {p.parent.name: json.loads(p.read_text()) for p in out.rglob("*.icam.json")}
    assert set(records) == {"case00", "case01", "series1"}
    for rec in records.values():
        validate_record(rec)
        assert rec["activity"]["operator"] == "op-17" and rec["activity"]["command"] == "audit"
    assert records["series1"]["input"]["format"] == "dicom"
    assert records["series1"]["input"]["uid_hashes"] is None  # no site key: no UIDs at all
    assert records["case00"]["analysis"]["expected_label"] == "present"
    # The mask covers the bright block: its mass fraction is reported and plausible.
    frac = records["case00"]["analysis"]["mask_fraction"]
    assert 0.0 < frac <= 1.0
    # summary.csv: one row per scan, prediction vs expected label.
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"case00", "case01", "series1"}
    for sid, row in rows.items():
        rec = records[sid]
        assert row["status"] == "ok"
        assert row["predicted_label"] == rec["method"]["predicted"]["label"]
        assert row["disagrees"] == str(row["expected_label"] != row["predicted_label"])
    assert float(rows["case00"]["mask_fraction"]) == pytest.approx(frac, rel=1e-5)
    # No identifier in records, ledger or summary, nor in any other output except the
    # DICOM Parametric Map, which by design carries its source's patient module.
    carrying = set()
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            if any(n.lower().encode() in data for n in PHI_NEEDLES):
                carrying.add(path.relative_to(out).as_posix())
    assert carrying <= {"scans/series1/cam_parametric_map.dcm"}, carrying
    ledger_text = (out / "ledger.jsonl").read_text()
    assert str(ws["base"]) not in ledger_text and str(tmp_path) not in ledger_text


def test_bad_scans_fail_alone_and_are_reported(workspace, tmp_path, capsys):
    ws = workspace
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file")
    two_channel = tmp_path / "two_channel.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 14, 10, 2), np.float32), np.eye(4)), str(two_channel))
    out = tmp_path / "audit"
    missing = tmp_path / "missing.nii.gz"
    code, stdout, stderr = run_cli(
        ["audit", str(ws["nifti"][0]), str(missing), str(corrupt), str(two_channel),
         str(ws["nifti"][1]), "--config", str(ws["config"]), "--out", str(out),
         "--no-progress"], capsys)
    assert code == 1  # some scans failed
    assert "5 scan(s): 2 explained" in stdout and "3 failed" in stdout
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    assert rows["case00"]["status"] == rows["case01"]["status"] == "ok"
    assert rows["missing"]["status"] == "failed" and "does not exist" in rows["missing"]["reason"]
    assert rows["corrupt"]["status"] == "failed" and "NIfTI" in rows["corrupt"]["reason"]
    assert rows["two_channel"]["status"] == "failed"
    assert "2 volumes" in rows["two_channel"]["reason"]
    assert "failed: missing:" in stderr
    # Reasons name files, never the folders they are in.
    assert str(tmp_path) not in (out / "ledger.jsonl").read_text()
    assert verify_folder(out).ok


def test_wrong_input_contract_fails_alone(workspace, tmp_path):
    """A config whose model wants 2 channels: every scan is refused before inference."""
    cfg = tmp_path / "two.yaml"
    text = (workspace["config"].read_text()
            .replace("in_channels: 1", "in_channels: 2").replace("channels: 1", "channels: 2"))
    cfg.write_text(text)
    from icam_med.networks import LesionNet

    net = LesionNet(spatial_dims=3, in_channels=2, out_channels=2, channels=[4, 8])
    save_file({k: v.contiguous() for k, v in net.state_dict().items()},
              str(tmp_path / "tiny.safetensors"))
    result = run_batch([workspace["nifti"][0]], cfg, tmp_path / "out", progress=False)
    assert result.exit_code == 1
    assert "has 1 channel(s) after preprocessing, but model 'tiny-lesion-net' expects 2" in \
        result.failed["case00"]


@pytest.mark.parametrize("kind", ["file", "under-file"])
def test_unwritable_output_folder_fails_fast(workspace, tmp_path, capsys, kind):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker if kind == "file" else blocker / "sub"
    start = time.perf_counter()
    code, _, stderr = run_cli(["audit", str(workspace["nifti"][0]), "--config",
                               str(workspace["config"]), "--out", str(out), "--no-progress"],
                              capsys)
    assert code == 2
    assert "cannot be written" in stderr and "Nothing was processed" in stderr
    assert time.perf_counter() - start < 5  # before loading any model or scan
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_output_folder_fails_fast(workspace, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="cannot be written"):
            run_batch([workspace["nifti"][0]], workspace["config"], out, progress=False)
    finally:
        out.chmod(0o755)


def test_second_concurrent_run_is_refused(workspace, tmp_path):
    from icam_med.audit.ledger import FolderLock

    out = tmp_path / "out"
    out.mkdir()
    with FolderLock(out), pytest.raises(FileExistsError, match="in use by another icam-med run"):
        run_batch([workspace["nifti"][0]], workspace["config"], out, progress=False)
    assert not (out / "ledger.jsonl").exists()


def test_scan_ids_are_unique_and_stable(tmp_path):
    a = tmp_path / "sub-01" / "anat"
    b = tmp_path / "sub-02" / "anat"
    for d in (a, b):
        d.mkdir(parents=True)
        (d / "T1w.nii.gz").write_bytes(b"")
    scans = collect_scans([tmp_path])
    assert [s.scan_id for s in scans] == ["sub-01_anat_T1w", "sub-02_anat_T1w"]
    assert [s.scan_id for s in collect_scans([tmp_path])] == [s.scan_id for s in scans]
    listing = tmp_path / "list.csv"
    listing.write_text("path,label,id\nsub-01/anat/T1w.nii.gz,absent,A\n"
                       "sub-02/anat/T1w.nii.gz,present,A\n")
    with pytest.raises(ValueError, match="scan id 'A' is used twice"):
        collect_scans([listing])
    # The same name in two formats side by side: told apart by the format, never by the
    # folders above (ids carry no part of the user's path).
    from icam_med.evaluation.samples import generate_radiographs

    side = tmp_path / "radiographs"
    generate_radiographs(side)  # chest_dx_finding.dcm beside chest_dx_finding.nii.gz
    assert sorted(s.scan_id for s in collect_scans([side])) == [
        "chest_cr_finding_mono1", "chest_dx_finding_dcm", "chest_dx_finding_nii",
        "chest_dx_normal"]


def test_map_analysis_mass_in_mask():
    fused = np.zeros((1, 4, 4, 4), np.float32)
    fused[0, 1, 1, 1] = 1.0
    fused[0, 3, 3, 3] = 1.0
    mask = np.zeros((4, 4, 4), np.uint8)
    mask[:2, :2, :2] = 1
    a = map_analysis(fused, np.eye(4), mask=mask, expected_label="present",
                     predicted_class=0, predicted_label="absent")
    assert a["mask_fraction"] == pytest.approx(0.5)
    assert a["mask_volume_fraction"] == pytest.approx(8 / 64)  # the context of that 50%
    assert a["peak_in_mask"] is True  # the first maximum (C order) is (1, 1, 1)
    fused[0, 1, 1, 1] = 0.5
    assert map_analysis(fused, np.eye(4), mask=mask)["peak_in_mask"] is False
    fused[0, 1, 1, 1] = 1.0
    assert a["disagrees"] is True
    assert a["map_stats"]["centroid_voxel"] == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="must be on the scan's own grid"):
        map_analysis(fused, np.eye(4), mask=np.zeros((4, 4, 5)))


def test_kill_mid_run_then_resume_does_every_scan_once(workspace, tmp_path):
    scans = write_scans(tmp_path / "many", 14, seed=3)
    out = tmp_path / "audit"
    cmd = [sys.executable, "-m", "icam_med", "audit", str(tmp_path / "many"), "--config",
           str(workspace["config"]), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = out / "ledger.jsonl"
    deadline = time.monotonic() + 120
    n_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ledger.exists():
                n_at_kill = ledger.read_bytes().count(b'"kind":"scan"')
                if n_at_kill >= 2:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the batch finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= n_at_kill < len(scans)
    done_before = {e.scan_id for e in scan_entries(out)}
    assert 2 <= len(done_before) < len(scans)

    # a hang guard only (the resume does 12 scans and rebuilds the report: 180 s ran out
    # once at load 10 on the 2-core VM)
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} already done" in rerun.stdout
    entries = scan_entries(out)
    ids = [e.scan_id for e in entries]
    assert sorted(ids) == sorted(f"case{i:02d}" for i in range(len(scans)))  # each once
    report = verify_folder(out)
    assert report.ok, report.problems
    # Nothing partial survives: every file under scans/ is named by a ledger entry.
    named = {e.data["record"]["path"] for e in entries}
    named |= {o["path"] for e in entries for o in e.data["outputs"]}
    on_disk = {p.relative_to(out).as_posix() for p in (out / "scans").rglob("*") if p.is_file()}
    assert on_disk == named
    assert not [p for p in out.rglob("*") if p.name.endswith((".part", ".partial"))]
    kinds = [e.kind for e in Ledger(out).entries()]
    assert kinds.count("run-start") == 2 and kinds.count("run-end") == 1  # the kill shows


def test_bad_site_key_config_fails_before_any_work(workspace, tmp_path):
    cfg = tmp_path / "keyed.yaml"
    cfg.write_text(workspace["config"].read_text().replace(
        "tiny.safetensors", str(workspace["base"] / "tiny.safetensors"))
        + "audit: {site_key_file: missing.key}\n")
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="site key file"):
        run_batch([workspace["nifti"][0]], cfg, out, progress=False)
    assert not (out / "ledger.jsonl").exists()


def test_rerun_keeps_tampered_outputs_as_evidence(workspace, tmp_path):
    out = tmp_path / "out"
    first = run_batch(workspace["nifti"][:2], workspace["config"], out, progress=False)
    assert first.exit_code == 0
    target = out / "scans" / "case01" / "cam.nii.gz"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF
    target.write_bytes(bytes(data))
    again = run_batch(workspace["nifti"][:2], workspace["config"], out, progress=False)
    assert again.exit_code == 1
    assert again.skipped == ["case00"] and again.done == []
    assert "no longer verify" in again.failed["case01"]
    assert target.read_bytes() == bytes(data)  # not overwritten
    with open(out / "summary.csv", newline="") as fh:
        rows = {r["scan_id"]: r for r in csv.DictReader(fh)}
    assert rows["case00"]["status"] == "ok" and rows["case01"]["status"] == "failed"
    report = verify_folder(out)
    assert not report.ok and report.first_problem.scan_id == "case01"


# ---------------------------------------------------------------------------------------
# Workers write their scan's outputs; the coordinator checks and seals them
# ---------------------------------------------------------------------------------------
def test_workers_write_outputs_and_coordinator_seals_them(workspace, tmp_path, monkeypatch):
    import icam_med.batch as batch

    seen = {}
    real_task = batch.explain_task

    def worker(task, spec):
        outcome = real_task(task, spec)
        # The worker's files are in place before the coordinator sees the outcome, and the
        # maps themselves do not travel back.
        folder = task.out_dir / "scans" / spec.scan_id
        seen[spec.scan_id] = sorted(p.name for p in folder.iterdir())
        assert outcome.explanation.fused is None and outcome.explanation.map_range is not None
        return outcome

    monkeypatch.setattr(batch, "explain_task", worker)
    out = tmp_path / "out"
    result = run_batch(workspace["nifti"][:2], workspace["config"], out, progress=False)
    assert result.exit_code == 0 and sorted(result.done) == ["case00", "case01"]
    assert seen["case00"] == ["cam.nii.gz", "cam_summary.json"]  # no record before the seal
    report = verify_folder(out)
    assert report.ok, report.problems
    rec = json.loads((out / "scans" / "case00" / "cam.icam.json").read_text())
    assert rec["method"]["map_range"][1] > rec["method"]["map_range"][0]


@pytest.mark.parametrize("change", ["flip-byte", "truncate", "remove"])
def test_coordinator_refuses_worker_output_changed_before_seal(workspace, tmp_path,
                                                               monkeypatch, change):
    import icam_med.batch as batch

    real_task = batch.explain_task

    def tampering_worker(task, spec):
        outcome = real_task(task, spec)
        if spec.scan_id == "case01":  # changed after the worker hashed it, before the seal
            target = task.out_dir / "scans" / spec.scan_id / "cam.nii.gz"
            data = bytearray(target.read_bytes())
            if change == "flip-byte":
                data[len(data) // 2] ^= 0xFF  # same size: only the hash can tell
                target.write_bytes(bytes(data))
            elif change == "truncate":
                target.write_bytes(bytes(data[:-10]))
            else:
                target.unlink()
        return outcome

    monkeypatch.setattr(batch, "explain_task", tampering_worker)
    out = tmp_path / "out"
    result = run_batch(workspace["nifti"][:2], workspace["config"], out, progress=False)
    assert result.done == ["case00"]
    reason = result.failed["case01"]
    if change == "remove":
        assert "missing or not a plain file" in reason
    else:
        assert "changed between its write and the seal" in reason
    # Nothing of the changed scan was sealed or kept; the folder still verifies.
    assert [e.scan_id for e in scan_entries(out)] == ["case00"]
    assert not (out / "scans" / "case01").exists()
    assert verify_folder(out).ok
    # The next run redoes it from scratch (the worker writes it again).
    monkeypatch.setattr(batch, "explain_task", real_task)
    again = run_batch(workspace["nifti"][:2], workspace["config"], out, progress=False)
    assert again.done == ["case01"] and again.skipped == ["case00"]
    assert verify_folder(out).ok


_KILLED_WORKER = """
import os, sys, time
from pathlib import Path
from icam_med.batch import explain_task, worker_task
from icam_med.config import load_config
from icam_med.discovery import collect_scans

config, scan, out, stop_at = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
real_replace, calls = os.replace, []

def replace(src, dst):  # the atomic writers' rename; hang before the stop_at-th one
    calls.append(dst)
    if len(calls) == stop_at:
        print("WRITING", flush=True)
        time.sleep(600)
    real_replace(src, dst)

os.replace = replace
[spec] = collect_scans([scan])
explain_task(worker_task(load_config(config), None, "cpu", 0, out), spec)
"""


@pytest.mark.parametrize("stop_at", [1, 2], ids=["temp-file-only", "map-renamed"])
def test_worker_killed_mid_write_leaves_nothing_verify_accepts(workspace, tmp_path, stop_at):
    out = tmp_path / "out"
    assert run_batch(workspace["nifti"][:1], workspace["config"], out,
                     progress=False).exit_code == 0
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WORKER, str(workspace["config"]),
                             str(workspace["nifti"][1]), str(out), str(stop_at)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "WRITING", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)  # mid-write: fsynced temp file, no rename yet
    finally:
        proc.wait(30)
    left = sorted(p.name for p in (out / "scans" / "case01").iterdir())
    assert left and all(n.endswith(".part") or n == "cam.nii.gz" for n in left), left
    assert ("cam.nii.gz" in left) == (stop_at == 2)
    report = verify_folder(out)
    assert not report.ok and "case01" not in report.verified_scans
    unlogged = [p for p in report.problems if p.kind == "unlogged"]
    assert len(unlogged) == len(left)
    assert all("scans/case01/" in str(p) for p in unlogged)
    assert report.verified_scans == {"case00": 2}
    # Resume: the leftovers are removed, the scan is done once, the folder verifies.
    result = run_batch(workspace["nifti"][:2], workspace["config"], out, progress=False)
    assert result.done == ["case01"] and result.skipped == ["case00"]
    assert verify_folder(out).ok
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]
