"""The CLI's promise: bad input gives one clear line on stderr and exit 2, never a traceback.

Every command (explain, audit, verify, report, bench, evaluate) is driven with wrong argument
types, missing files and bad options; a few cases also run as a real subprocess so that what
the user's terminal shows is checked byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from io_helpers import write_tiny_config

from icam_med import cli


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``icam-med argv`` in this process; argparse's own exits are returned as codes."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str, command: str, expect: str | None = None) -> None:
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert "Traceback" not in err and 'File "' not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error message at all"
    # argparse: usage + one 'error:' line; ours: one 'icam-med CMD: error:' line (a series
    # listing may follow, indented).
    error_lines = [ln for ln in lines if "error:" in ln]
    assert len(error_lines) == 1, err
    assert command in error_lines[0], err
    if expect is not None:
        assert expect in err, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    scan = d / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((12, 12, 8), dtype=np.float32),
                             np.diag([2.0, 2.0, 2.0, 1.0])), scan)
    cfg = write_tiny_config(d)
    bad_yaml = d / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n", encoding="utf-8")
    quoted = d / "quoted.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["geometry"] = {"allow_nonfinite": "false"}
    quoted.write_text(yaml.safe_dump(data), encoding="utf-8")
    typo = d / "typo.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["model"]["weight_sha256"] = "0" * 64
    typo.write_text(yaml.safe_dump(data), encoding="utf-8")
    evil = d / "evil.yaml"
    data = yaml.safe_load(cfg.read_text())
    data["model"]["architecture"] = "subprocess:Popen"
    evil.write_text(yaml.safe_dump(data), encoding="utf-8")
    binary = d / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00model")
    text_scan = d / "notes.txt"
    text_scan.write_text("not a scan", encoding="utf-8")
    fake_dcm = d / "fake.dcm"
    fake_dcm.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00" * 7)
    empty = d / "empty"
    empty.mkdir()
    garbage_folder = d / "garbage_out"
    garbage_folder.mkdir()
    (garbage_folder / "ledger.jsonl").write_text("{not json\n[1,2]\n", encoding="utf-8")
    csv = d / "scans.csv"
    csv.write_text("nopath,label\nx,1\n", encoding="utf-8")
    return {"scan": scan, "cfg": cfg, "bad_yaml": bad_yaml, "quoted": quoted, "typo": typo,
            "evil": evil, "binary": binary, "text_scan": text_scan, "fake_dcm": fake_dcm,
            "empty": empty, "garbage": garbage_folder, "csv": csv, "dir": d}


# (argv template, command, expected text); {name} is replaced by the fixture's path.
CASES = [
    # explain
    (["explain", "{scan}", "--config", "{dir}/missing.yaml", "--out", "{out}"], "explain",
     "does not exist"),
    (["explain", "{dir}/missing.nii.gz", "--config", "{cfg}", "--out", "{out}"], "explain",
     "does not exist"),
    (["explain", "{scan}", "--config", "{bad_yaml}", "--out", "{out}"], "explain", "not valid YAML"),
    (["explain", "{scan}", "--config", "{binary}", "--out", "{out}"], "explain", "not UTF-8"),
    (["explain", "{scan}", "--config", "{quoted}", "--out", "{out}"], "explain",
     "geometry.allow_nonfinite' must be true or false"),
    (["explain", "{scan}", "--config", "{typo}", "--out", "{out}"], "explain",
     "did you mean 'weights_sha256'"),
    (["explain", "{scan}", "--config", "{evil}", "--out", "{out}"], "explain",
     "not an allowed source of networks"),
    (["explain", "{scan}", "--config", "{dir}", "--out", "{out}"], "explain", None),
    (["explain", "{text_scan}", "--config", "{cfg}", "--out", "{out}"], "explain",
     "neither a DICOM file"),
    (["explain", "{fake_dcm}", "--config", "{cfg}", "--out", "{out}"], "explain", None),
    (["explain", "{empty}", "--config", "{cfg}", "--out", "{out}"], "explain", "holds no files"),
    (["explain", "{scan}", "--config", "{cfg}"], "explain", "--out DIR is required"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--volume-index", "x"],
     "explain", "--volume-index"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--volume-index", "-1"],
     "explain", "--volume-index"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--volume-index", "5"],
     "explain", "out of range"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--option", "novalue"],
     "explain", "KEY=VALUE"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--device", "gpu9"],
     "explain", "not a torch device"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--series-uid", "1.2.3"],
     "explain", "series_uid applies to DICOM only"),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{scan}"], "explain", None),
    (["explain", "{scan}", "--config", "{cfg}", "--out", "{out}", "--bogus"], "icam-med", None),
    (["explain", "{empty}", "--config", "{cfg}", "--list-series"], "explain", "holds no files"),
    # audit
    (["audit", "{scan}", "--config", "{dir}/missing.yaml", "--out", "{out}"], "audit",
     "does not exist"),
    (["audit", "{scan}", "--config", "{bad_yaml}", "--out", "{out}"], "audit", "not valid YAML"),
    (["audit", "{scan}", "--config", "{cfg}", "--out", "{out}", "--workers", "-1"], "audit",
     "--workers"),
    (["audit", "{scan}", "--config", "{cfg}", "--out", "{out}", "--workers", "two"], "audit",
     "--workers"),
    (["audit", "{scan}", "--config", "{cfg}", "--out", "{out}", "--seed", "1.5"], "audit",
     "--seed"),
    (["audit", "{scan}", "--config", "{cfg}", "--out", "{out}", "--device", "tpu"], "audit",
     "not a torch device"),
    (["audit", "{csv}", "--config", "{cfg}", "--out", "{out}"], "audit", None),
    (["audit", "{scan}", "--config", "{cfg}"], "icam-med", "--out"),
    # verify
    (["verify", "{dir}/nowhere"], "verify", None),
    (["verify", "{scan}"], "verify", None),
    (["verify", "{empty}"], "verify", None),
    (["verify", "{empty}", "--anchor", "xyz"], "verify", "SHA-256"),
    # report
    (["report", "{dir}/nowhere"], "report", None),
    (["report", "{empty}", "--per-page", "0"], "report", "--per-page"),
    (["report", "{empty}", "--per-page", "many"], "report", "--per-page"),
    (["report", "{empty}", "--anchor", "0" * 63], "report", "SHA-256"),
    (["report", "{empty}", "--config", "{quoted}"], "report", "allow_nonfinite"),
    # bench
    (["bench", "--repeats", "0"], "bench", "--repeats"),
    (["bench", "--repeats", "three"], "bench", "--repeats"),
    (["bench", "--batch", "0"], "bench", "--batch"),
    (["bench", "--network", "resnet"], "bench", "--network"),
    (["bench", "--case", "nope"], "bench", "unknown --case"),
    (["bench", "--device", "cuda:x"], "bench", "not a torch device"),
    (["bench", "--json", "{dir}/no/such/folder/rows.json"], "bench", "--json"),
    # evaluate
    (["evaluate", "--out", "{out}", "--n-volumes", "0"], "evaluate", "--n-volumes"),
    (["evaluate", "--out", "{out}", "--steps", "-3"], "evaluate", "--steps"),
    (["evaluate", "--out", "{out}", "--tolerance-mm", "nan"], "evaluate", "--tolerance-mm"),
    (["evaluate", "--out", "{out}", "--blur-sigma-mm", "0"], "evaluate", "--blur-sigma-mm"),
    (["evaluate", "--out", "{out}", "--baseline", "noise"], "evaluate", "--baseline"),
    (["evaluate", "--out", "{out}", "--config", "{dir}/missing.yaml"], "evaluate",
     "does not exist"),
    (["evaluate", "--out", "{out}", "--config", "{typo}"], "evaluate", "weights_sha256"),
    (["evaluate", "--config", "{cfg}"], "icam-med", "--out"),
    # compare
    (["compare", "{empty}", "{empty}", "--out", "{out}"], "compare", "holds no ledger.jsonl"),
    (["compare", "{dir}/nowhere", "{scan}", "--out", "{out}"], "compare", "holds no ledger.jsonl"),
    (["compare", "{empty}", "{empty}"], "icam-med", "--out"),
    # no command at all / unknown command
    (["frobnicate"], "icam-med", "invalid choice"),
]


def _fill(argv: list[str], files: dict, out: Path) -> list[str]:
    names = {k: str(v) for k, v in files.items()} | {"out": str(out)}
    return [a.format(**names) for a in argv]


@pytest.mark.parametrize(("argv", "command", "expect"), CASES,
                         ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, command, expect, files, tmp_path, capsys):
    rc, _out, err = run_cli(_fill(argv, files, tmp_path / "out"), capsys)
    assert_clean_error(rc, err, command, expect)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), \
        "nothing may be written for refused input"


def test_malformed_ledger_is_reported_not_a_crash(files, capsys):
    rc, _out, err = run_cli(["verify", str(files["garbage"])], capsys)
    assert rc in (1, 2)
    assert "Traceback" not in err and err.strip()


def test_unexpected_error_is_one_line_with_a_debug_hint(monkeypatch, capsys):
    from icam_med.commands import verify

    def boom(args):
        raise KeyError("internal lookup")

    monkeypatch.setattr(verify, "run", boom)
    rc, _out, err = run_cli(["verify", "x"], capsys)
    assert rc == 1
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert "internal error: KeyError" in err and "--debug" in err
    # --debug (before or after the command) shows the real traceback instead.
    for argv in (["--debug", "verify", "x"], ["verify", "x", "--debug"]):
        with pytest.raises(KeyError):
            cli.main(argv)


def test_user_error_under_debug_raises(files):
    with pytest.raises(ValueError, match="not valid YAML"):
        cli.main(["--debug", "report", str(files["empty"]), "--config", str(files["bad_yaml"])])


@pytest.mark.parametrize("argv", [
    ["explain", "{scan}", "--config", "{quoted}", "--out", "{out}"],
    ["verify", "{garbage}"],
    ["bench", "--repeats", "zero"],
])
def test_terminal_sees_no_traceback(argv, files, tmp_path):
    """The real executable, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "icam_med", *_fill(argv, files, tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode in (1, 2), proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.strip()


def test_every_command_is_driven():
    assert {c[0][0] for c in CASES} >= set(cli.COMMANDS)
