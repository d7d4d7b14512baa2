"""Fast start (issue 15 item 4): `verify` and `report` never import torch or MONAI.

Each command runs in a fresh interpreter on a real audit folder; the probe lists the heavy
modules that interpreter imported by the time the command returned.
"""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from _audit_util import write_tiny_lesionnet_config

from icam_med.batch import run_batch

PROBE = """
import json, sys
from icam_med import cli
code = cli.main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "monai", "SimpleITK", "itk", "highdicom") if m in sys.modules)
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def audit_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("fast")
    cfg = write_tiny_lesionnet_config(base)
    rng = np.random.default_rng(0)
    scans = []
    for i in range(2):
        vol = rng.integers(0, 500, (12, 14, 10)).astype(np.int16)
        vol[3:7, 4:9, 3:6] += 600
        p = base / f"case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), str(p))
        scans.append(p)
    out = base / "audit"
    assert run_batch(scans, cfg, out, progress=False).exit_code == 0
    return {"out": out, "config": cfg}


def probe(*args):
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                          text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, proc.stderr
    return json.loads(line[len("PROBE "):])


def test_verify_imports_neither_torch_nor_monai(audit_folder):
    got = probe("verify", audit_folder["out"])
    assert got == {"code": 0, "heavy": []}


@pytest.mark.parametrize("extra", [[], ["--pdf"], ["--config", "CONFIG"]],
                         ids=["html", "pdf", "with-config"])
def test_report_imports_neither_torch_nor_monai(audit_folder, extra):
    out = audit_folder["out"]
    extra = [str(audit_folder["config"]) if a == "CONFIG" else a for a in extra]
    got = probe("report", out, "--overwrite", *extra)
    assert got == {"code": 0, "heavy": []}
    # The maps were still read and drawn (read with nibabel, not skipped).
    html = (out / "report.html").read_text()
    assert html.count('<img alt="map over scan"') == 2  # one montage per scan
    assert "map file missing" not in html and "map file unreadable" not in html
