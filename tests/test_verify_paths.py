"""verify's path guard on the files a ledger names: a symbolic link loop on the way is
refused like a path leading out of the folder (never followed, never a traceback), and a
missing file inside the folder is reported as missing."""

from __future__ import annotations

import os
import shutil

from _audit_util import tiny_model_config, write_scan_outputs

from icam_med import cli
from icam_med.audit import resolve_inside, verify_folder


def test_a_symlink_loop_on_a_logged_path_is_refused_not_followed(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    write_scan_outputs(out, "scan-1", model_cfg=tiny_model_config(tmp_path))
    assert verify_folder(out).ok
    shutil.move(out / "scan-1", tmp_path / "moved")
    os.symlink("scan-1", out / "scan-1")  # a link to itself
    assert resolve_inside(out, "scan-1/icam.nii.gz") is None
    report = verify_folder(out)
    assert not report.ok
    assert "record: path 'scan-1/icam.icam.json' is not a relative path inside the folder" \
        in str(report.first_problem)
    assert cli.main(["verify", str(out)]) == 1
    assert "BROKEN" in capsys.readouterr().err


def test_a_missing_file_inside_the_folder_is_reported_missing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_scan_outputs(out, "scan-1", model_cfg=tiny_model_config(tmp_path))
    (out / "scan-1" / "icam.nii.gz").unlink()
    assert resolve_inside(out, "scan-1/icam.nii.gz") == out.resolve() / "scan-1" / "icam.nii.gz"
    report = verify_folder(out)
    assert "output (map-nifti) 'scan-1/icam.nii.gz' is missing" in str(report.first_problem)
