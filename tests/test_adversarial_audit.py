"""The audit tooling as an attacker and a careless user meet it (issue 12, items 2-4 and 9).

Every case ends in a clear error or a correct result, never a traceback; no identifier
reaches a non-DICOM output or the terminal; no audited file is lost; a tampered folder is
reported, never trusted; a rebuilt chain is caught by the site's signature.
"""

from __future__ import annotations

import contextlib
import csv
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from _audit_util import PHI, PHI_NEEDLES, write_scan_outputs, write_tiny_lesionnet_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from icam_med import cli
from icam_med.audit import (
    SIGNATURES_NAME,
    AuditRecord,
    FolderLock,
    Ledger,
    LedgerEntry,
    LedgerError,
    RecordError,
    find_phi,
    generate_signing_key,
    identifiers_from_scan,
    load_public_key,
    verify_folder,
)
from icam_med.audit.ledger import entry_sha256
from icam_med.audit.phi import identifying_keywords, screen_text
from icam_med.batch import run_batch, summary_rows
from icam_med.explain import explain_volume, prepare, write_explanation
from icam_med.io import load_volume

# -- fixtures --------------------------------------------------------------------------------


def _scan(path: Path, seed: int, bright: float = 600.0) -> Path:
    rng = np.random.default_rng(seed)
    vol = rng.integers(0, 500, (12, 14, 10)).astype(np.int16)
    vol[3:7, 4:9, 3:6] += np.int16(bright)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(path))
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    base = tmp_path_factory.mktemp("adversarial")
    cfg = write_tiny_lesionnet_config(base)
    scans = [_scan(base / "scans" / f"case{i:02d}.nii.gz", i) for i in range(2)]
    return {"base": base, "config": cfg, "scans": scans}


def _audit(ws, out, inputs=None, **kw):
    return run_batch(inputs or [ws["base"] / "scans"], ws["config"], out, progress=False, **kw)


def _rows(out):
    with open(out / "summary.csv", newline="") as fh:
        return {r["scan_id"]: r for r in csv.DictReader(fh)}


# -- PHI: whole tokens, a profile-derived attribute list, screened failures -----------------


def test_identifiers_match_whole_tokens_only():
    entry = {"previous_entry_sha256": "0" * 64, "seq": 1,
             "preprocessing": [{"name": "ScaleIntensityRanged"}],
             "note": "run 41234 of study 20230417-b", "scan_id": "DOE_JOHN_01"}
    # All-zero ids, a 3-digit id inside a number, "Scale" inside a transform name: no hit.
    assert find_phi(entry, ["000000", "0000", "123", "Scale^Test", "4123"]) == []
    # Whole tokens are still found, with _ - . and space as boundaries.
    assert find_phi(entry, ["DOE^JOHN"]) == ["scan_id: contains a known patient identifier"]
    assert find_phi(entry, ["20230417"]) == ["note: contains a known patient identifier"]
    assert screen_text("cannot read QUIXOTE_ALONSO/IM1.dcm", ["QUIXOTE^ALONSO"]) == \
        "cannot read <withheld>_<withheld>/IM1.dcm"


def test_three_digit_ids_hidden_in_real_records_are_not_false_matches(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_scan_outputs(out, "scan-1")
    text = next(out.rglob("*.icam.json")).read_text() + (out / "ledger.jsonl").read_text()
    record = json.loads(next(out.rglob("*.icam.json")).read_text())
    entry = json.loads((out / "ledger.jsonl").read_text().splitlines()[0])
    inside = {text[i:i + 3] for i in range(len(text) - 2) if text[i:i + 3].isdigit()}
    assert len(inside) > 100  # hashes hold most 3-digit strings
    hits = [d for d in sorted(inside) if find_phi(record, [d]) or find_phi(entry, [d])]
    # Only a 3-digit id standing alone as a token could match; none does in a record.
    assert hits == []


def test_all_zero_patient_id_is_not_refused(tmp_path):
    ledger = Ledger(tmp_path)
    e = ledger.append("run-start", run_id="r1", identifiers=("0000000000", "000"))
    assert e.previous_sha256 == "0" * 64  # the first entry's zeros are not a patient id


def test_identifying_attributes_come_from_the_deid_profile():
    kws = identifying_keywords()
    for kw in ("PatientName", "PatientID", "OtherPatientIDs", "AccessionNumber", "StudyDate",
               "AcquisitionDateTime", "StudyInstanceUID", "ReferringPhysicianName",
               "PatientAddress", "InstitutionName", "StationName", "DeviceSerialNumber"):
        assert kw in kws, kw
    for kw in ("Rows", "Modality", "PixelSpacing", "RescaleSlope", "SliceThickness",
               "ImageOrientationPatient"):
        assert kw not in kws, kw
    assert len(kws) > 300  # every date, time, UID and ID attribute of the dictionary


def test_identifiers_from_a_real_series(tmp_path):
    from icam_med.evaluation.dicom_series import write_dicom_series

    vol = np.random.default_rng(0).integers(0, 500, (10, 12, 8)).astype(np.int16)
    write_dicom_series(vol, tmp_path / "s", patient_name=PHI["PatientName"],
                       patient_id=PHI["PatientID"], patient_birth_date=PHI["PatientBirthDate"],
                       InstitutionName=PHI["InstitutionName"],
                       AccessionNumber=PHI["AccessionNumber"])
    _, info = load_volume(tmp_path / "s")
    ids = identifiers_from_scan(info)
    for key in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                "AccessionNumber"):
        assert PHI[key] in ids, key
    assert info.series_instance_uid in ids


def test_failure_reasons_name_the_scan_by_id_and_leak_nothing(ws, tmp_path, capfd):
    from icam_med.evaluation.dicom_series import write_dicom_series
    from icam_med.report import build_report

    phi_dir = tmp_path / "QUIXOTE_ALONSO" / PHI["PatientID"]
    phi_dir.mkdir(parents=True)
    corrupt = phi_dir / "PANZA_scan.nii.gz"
    corrupt.write_bytes(b"not a NIfTI file at all")
    series = phi_dir / "La_Mancha_series"
    vol = np.random.default_rng(1).integers(0, 500, (12, 14, 10)).astype(np.int16)
    write_dicom_series(vol, series, patient_name=PHI["PatientName"],
                       patient_id=PHI["PatientID"], patient_birth_date=PHI["PatientBirthDate"],
                       InstitutionName=PHI["InstitutionName"],
                       AccessionNumber=PHI["AccessionNumber"])
    off_grid = phi_dir / "QUIXOTE_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((12, 14, 10), np.uint8), np.diag([9.0, 9.0, 9.0, 1.0])),
             str(off_grid))
    listing = tmp_path / "scans.csv"
    listing.write_text("id,path,mask\n"
                       f"s1,{corrupt},\n"
                       f"s2,{phi_dir / 'ALONSO_missing.nii.gz'},\n"
                       f"s3,{series},{off_grid}\n")
    out = tmp_path / "audit"
    capfd.readouterr()
    result = run_batch([listing], ws["config"], out, progress=False)
    build_report(out, pdf=False, overwrite=True)
    captured = capfd.readouterr()
    assert set(result.failed) == {"s1", "s2", "s3"}
    assert result.failed["s1"].startswith("GeometryError") and "<scan s1>" in result.failed["s1"]
    assert "<scan s2>" in result.failed["s2"] and "does not exist" in result.failed["s2"]
    assert "<mask of s3>" in result.failed["s3"] and "not on the grid" in result.failed["s3"]
    needles = [*PHI_NEEDLES, "QUIXOTE_ALONSO", "PANZA_scan", "La_Mancha", "ALONSO_missing",
               str(tmp_path)]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            leaked = [n for n in needles if n.lower().encode() in data]
            assert not leaked, (path.name, leaked)
    terminal = (captured.out + captured.err).lower()
    assert not [n for n in needles if n.lower() in terminal]


def test_failure_entry_withholds_header_values(tmp_path):
    ledger = Ledger(tmp_path)
    entry = ledger.log_failure(
        "s9", f"ValueError: series of {PHI['PatientName']} ({PHI['PatientID']}) at "
              f"/data/{PHI['PatientID']}/x.dcm is broken", run_id="r",
        identifiers=(PHI["PatientName"], PHI["PatientID"]))
    assert entry.reason == "ValueError: series of <withheld> (<withheld>) at <path> is broken"


# -- tampered folders: paths, symlinks, changed scans, fuzzed parsers ----------------------


def test_symlinked_scan_folder_out_of_the_audit_folder_is_caught(ws, tmp_path):
    out = tmp_path / "audit"
    assert _audit(ws, out).exit_code == 0
    outside = tmp_path / "elsewhere" / "case00"
    shutil.copytree(out / "scans" / "case00", outside)
    shutil.rmtree(out / "scans" / "case00")
    (out / "scans" / "case00").symlink_to(outside, target_is_directory=True)
    report = verify_folder(out)
    assert not report.ok and "case00" not in report.verified_scans
    assert any("symbolic link" in p.message and p.scan_id == "case00" for p in report.problems)
    rows = {r["scan_id"]: r for r in summary_rows(out)}
    assert rows["case00"]["status"] == "unreadable" and "leaves" in rows["case00"]["reason"]
    again = _audit(ws, out)
    assert "case00" in again.failed and again.skipped == ["case01"]
    assert outside.is_dir() and (out / "scans" / "case00").is_symlink()  # evidence kept


def _rechain(ledger_path: Path, lines: list[dict]) -> None:
    """What an attacker with write access does: rebuild every hash of the chain."""
    prev = "0" * 64
    out = []
    for e in lines:
        e = {k: v for k, v in e.items() if k != "entry_sha256"}
        e["previous_entry_sha256"] = prev
        e["entry_sha256"] = entry_sha256(e)
        prev = e["entry_sha256"]
        out.append(json.dumps(e, sort_keys=True, separators=(",", ":")))
    ledger_path.write_text("\n".join(out) + "\n")


@pytest.mark.parametrize("bad_path", ["../outside.icam.json", "/etc/passwd",
                                      "scans/../../outside.icam.json", "scans\\..\\x.json"])
def test_ledger_path_traversal_is_never_followed(ws, tmp_path, bad_path):
    out = tmp_path / "audit"
    assert _audit(ws, out).exit_code == 0
    planted = tmp_path / "outside.icam.json"
    planted.write_text(json.dumps({"method": {"score": "PLANTED-SECRET"}}))
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    scan = next(e for e in lines if e["kind"] == "scan")
    scan["record"]["path"] = bad_path
    _rechain(out / "ledger.jsonl", lines)
    report = verify_folder(out)
    assert not report.ok
    bad = [p for p in report.problems if p.line == scan["seq"]]
    assert bad and "does not match" in bad[0].message
    rows = summary_rows(out)  # the malformed entry is left out, never followed
    assert "PLANTED-SECRET" not in json.dumps(rows)
    with pytest.raises(ValueError, match="broken"):
        _audit(ws, out)  # a broken chain: nothing is done in the folder


def test_changed_scan_under_an_old_id_is_not_reported_done(ws, tmp_path):
    scans = tmp_path / "scans"
    for i in range(2):
        _scan(scans / f"case{i:02d}.nii.gz", i)
    out = tmp_path / "audit"
    assert _audit(ws, out, [scans]).exit_code == 0
    _scan(scans / "case01.nii.gz", 99)  # new voxels, same name
    again = _audit(ws, out, [scans])
    assert again.skipped == ["case00"] and list(again.failed) == ["case01"]
    assert "changed since it was audited" in again.failed["case01"]
    assert verify_folder(out).ok  # the old outputs are intact evidence


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                         c, max_size=4),
                     max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.one_of(st.binary(max_size=200), _json.map(lambda v: json.dumps(v).encode())))
def test_fuzzed_ledger_lines_and_records_give_only_their_error_type(raw):
    try:
        LedgerEntry.parse(raw, 1)
    except LedgerError as exc:
        assert exc.line == 1 and exc.field
    try:
        AuditRecord.from_bytes(raw)
    except RecordError as exc:
        assert exc.field


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(line=st.binary(max_size=120), where=st.integers(min_value=0, max_value=2))
def test_fuzzed_ledger_lines_never_crash_verify(tmp_path_factory, line, where):
    folder = tmp_path_factory.mktemp("fuzz")
    ledger = Ledger(folder)
    for i in range(3):
        ledger.append("failure", run_id="r", scan_id=f"s{i}", reason="x")
    lines = (folder / "ledger.jsonl").read_bytes().split(b"\n")[:-1]
    lines[where] = line.replace(b"\n", b" ")
    (folder / "ledger.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    report = verify_folder(folder)
    assert isinstance(report.ok, bool)


# -- concurrency: one lock, nothing audited is ever removed --------------------------------


def _writer(explanation, out, barrier, results, rounds):
    for r in range(rounds):
        barrier.wait(60)
        try:
            write_explanation(explanation, out / f"round{r}", overwrite=True)
            results.put((r, "ok"))
        except FileExistsError as exc:
            results.put((r, f"refused: {exc}"))
        except Exception as exc:
            results.put((r, f"error {type(exc).__name__}: {exc}"))


@pytest.fixture(scope="module")
def explanation(ws):
    prepared = prepare(ws["config"])
    image, info = load_volume(ws["scans"][0])
    ex = explain_volume(image, info, prepared)
    ex.cam_result = ex.preprocessed = None
    return ex


def test_two_concurrent_overwriting_writers_never_lose_audited_files(explanation, tmp_path):
    rounds = 10
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(explanation, tmp_path, barrier, results, rounds))
             for _ in range(2)]
    for p in procs:
        p.start()
    outcomes: dict[int, list[str]] = {}
    for _ in range(2 * rounds):
        r, what = results.get(timeout=300)
        outcomes.setdefault(r, []).append(what)
    for p in procs:
        p.join(60)
    for r in range(rounds):
        got = sorted(outcomes[r])
        assert got[0] == "ok" and got[1].startswith("refused"), got  # one wins, one is refused
        folder = tmp_path / f"round{r}"
        report = verify_folder(folder)
        assert report.ok and report.n_scans == 1, (r, report.problems)  # nothing lost


def test_explain_waits_for_no_one_and_writes_nothing_while_audit_holds_the_folder(
        explanation, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from icam_med.audit import FolderLock; "
         f"lock = FolderLock({str(out)!r}); lock.acquire(); print('held', flush=True); "
         "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FileExistsError, match="in use by another icam-med run"):
            write_explanation(explanation, out)
        assert sorted(p.name for p in out.iterdir()) == [".icam-med.lock"]
    finally:
        holder.kill()
        holder.wait(30)
    write_explanation(explanation, out)  # the holder died: the kernel released the lock
    assert verify_folder(out).ok


def test_clean_up_never_removes_a_file_a_ledger_entry_pins(ws, explanation, tmp_path):
    from icam_med.audit import AuditContext

    out = tmp_path / "audit"
    folder = out / "scans" / "case00"
    # Another run logged files inside the folder a later batch would take as leftovers.
    write_explanation(explanation, folder,
                      audit=AuditContext(root=out, scan_id="other", command="explain"))
    pinned = sorted(p.name for p in folder.iterdir())
    (folder / "partial.nii.gz.part").write_bytes(b"left by a crash")
    result = _audit(ws, out, [ws["scans"][0]])
    assert list(result.failed) == ["case00"] and "already recorded" in result.failed["case00"]
    assert sorted(p.name for p in folder.iterdir()) == pinned  # leftover gone, evidence kept
    assert verify_folder(out).ok


def test_a_lock_in_this_process_is_not_taken_twice(tmp_path):
    with FolderLock(tmp_path) as lock:
        assert lock.held and lock.covers(tmp_path)
        with pytest.raises(FileExistsError, match="in use"):
            FolderLock(tmp_path).acquire()


# -- signed ledger heads -------------------------------------------------------------------


@pytest.fixture
def site_key(tmp_path, monkeypatch):
    key = generate_signing_key(tmp_path / "keys" / "site.pem")
    monkeypatch.setenv("ICAM_MED_SIGNING_KEY", str(key))
    return key, key.with_name("site.pub.pem")


def test_signed_runs_verify_and_a_rebuilt_chain_does_not(ws, tmp_path, site_key, capsys):
    _, public = site_key
    out = tmp_path / "audit"
    assert _audit(ws, out).exit_code == 0
    sigs = (out / SIGNATURES_NAME).read_text().splitlines()
    assert len(sigs) == 1 and json.loads(sigs[0])["algorithm"] == "Ed25519"
    assert not any(p.suffix == ".pem" for p in out.rglob("*"))  # the key stays outside
    report = verify_folder(out, public_key=load_public_key(public))
    assert report.ok and len(report.signed_runs) == 1 and report.unsigned_runs == []
    assert cli.main(["verify", str(out), "--public-key", str(public)]) == 0
    assert "1 signed, 0 unsigned" in capsys.readouterr().out

    # An attacker edits the run's counts and rebuilds the unkeyed chain: the old signature
    # no longer names a ledger entry.
    lines = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    lines[-1]["details"]["n_failed"] = 7
    _rechain(out / "ledger.jsonl", lines)
    report = verify_folder(out, public_key=load_public_key(public))
    assert not report.ok and report.unsigned_runs
    assert any("does not hold" in p.message for p in report.problems)
    # Removing the signatures too leaves a chain that verifies on its own (what an unkeyed
    # chain cannot tell) and a run reported unsigned; the site's key refuses it.
    (out / SIGNATURES_NAME).unlink()
    report = verify_folder(out)
    assert report.ok and len(report.unsigned_runs) == 1
    assert "0 signed, 1 unsigned" in report.summary()
    assert not verify_folder(out, public_key=load_public_key(public)).ok
    assert cli.main(["verify", str(out), "--public-key", str(public)]) == 1


def test_forged_signature_and_unsigned_runs_are_reported(ws, tmp_path, site_key, monkeypatch):
    _, public = site_key
    out = tmp_path / "audit"
    assert _audit(ws, out, [ws["scans"][0]]).exit_code == 0
    monkeypatch.delenv("ICAM_MED_SIGNING_KEY")
    assert _audit(ws, out).exit_code == 0  # a second run, without the key
    report = verify_folder(out, public_key=load_public_key(public))
    assert len(report.signed_runs) == 1 and len(report.unsigned_runs) == 1
    assert any("has no valid signature" in p.message for p in report.problems)
    assert "1 unsigned" in verify_folder(out).summary()  # reported without a key too
    # A signature made with another key does not verify.
    other = generate_signing_key(tmp_path / "other.pem")
    sig = json.loads((out / SIGNATURES_NAME).read_text().splitlines()[0])
    from icam_med.audit.signing import head_message, load_signing_key

    forged = load_signing_key(environ={"ICAM_MED_SIGNING_KEY": str(other)})
    import base64

    sig["signature"] = base64.b64encode(forged.private_key.sign(
        head_message(sig["run_id"], sig["seq"], sig["entry_sha256"]))).decode()
    (out / SIGNATURES_NAME).write_text(json.dumps(sig) + "\n")
    report = verify_folder(out, public_key=load_public_key(public))
    assert any("does not verify with the given public key" in p.message
               for p in report.problems)


def test_explain_signs_its_run_and_a_key_inside_the_folder_is_refused(
        explanation, tmp_path, monkeypatch):
    key = generate_signing_key(tmp_path / "out" / "site.pem")
    monkeypatch.setenv("ICAM_MED_SIGNING_KEY", str(key))
    with pytest.raises(ValueError, match="inside the audit folder"):
        write_explanation(explanation, tmp_path / "out")
    assert not (tmp_path / "out" / "cam.nii.gz").exists()
    outside = generate_signing_key(tmp_path / "site2.pem")
    monkeypatch.setenv("ICAM_MED_SIGNING_KEY", str(outside))
    write_explanation(explanation, tmp_path / "out2")
    report = verify_folder(tmp_path / "out2",
                           public_key=load_public_key(outside.with_name("site2.pub.pem")))
    assert report.ok and len(report.signed_runs) == 1


def test_verify_with_a_bad_public_key_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "ledger.jsonl").write_bytes(b"")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    assert cli.main(["verify", str(tmp_path), "--public-key", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not an Ed25519 key" in err and "Traceback" not in err


def test_signature_file_damage_is_reported(ws, tmp_path, site_key):
    _, public = site_key
    out = tmp_path / "audit"
    assert _audit(ws, out, [ws["scans"][0]]).exit_code == 0
    with open(out / SIGNATURES_NAME, "ab") as fh:
        fh.write(b"[" * 50_000 + b"\n")
    report = verify_folder(out, public_key=load_public_key(public))
    assert any(f"{SIGNATURES_NAME} line 2" in p.message for p in report.problems)
    assert report.signed_runs  # the intact signature still counts


# -- SIGKILL of a coordinator with --workers 2: no orphans ---------------------------------


def _children(pid: int) -> set[int]:
    kids: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            kids |= {int(x) for x in (task / "children").read_text().split()}
    return kids


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_killed_coordinator_leaves_no_worker_processes(ws, tmp_path):
    scans = [_scan(tmp_path / "many" / f"case{i:02d}.nii.gz", i) for i in range(12)]
    assert len(scans) == 12
    for round_ in range(10):
        out = tmp_path / f"audit{round_}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "icam_med", "audit", str(tmp_path / "many"), "--config",
             str(ws["config"]), "--out", str(out), "--workers", "2", "--no-progress",
             "--no-report"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                workers = {k for k in _children(proc.pid) if _alive(k)}
                if len(workers) >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None and len(workers) >= 2, "no workers to orphan"
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(30)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], f"round {round_}: orphans {workers}"
