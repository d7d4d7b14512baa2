"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they do bite.

``make test`` runs ``lint-imports`` before pytest; this test runs it too, on the code as it
is, and on a copy of the code with three boundary-breaking imports added, which must fail
and name each broken contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.is_file(),
                                reason="import-linter is not installed (the test extra)")


def _lint(cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_code_keeps_every_contract():
    out = _lint(REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BROKEN" not in out.stdout and "0 broken" in out.stdout


def test_a_broken_boundary_fails_lint_imports(tmp_path):
    for package in ("icam_med", "napari_plugin"):
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    injected = {
        "icam_med/io/atomic.py": "import icam_med.cam.methods  # injected: io -> engine\n",
        "icam_med/explain.py": "import napari  # injected: core -> GUI\n",
        "icam_med/report/build.py": "import icam_med.batch  # injected: report -> batch\n",
    }
    for name, line in injected.items():
        with (tmp_path / name).open("a", encoding="utf-8") as f:
            f.write("\n" + line)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}  # the copy, ahead of the checkout
    out = _lint(tmp_path, env)
    report = " ".join(out.stdout.split())
    assert out.returncode != 0, report
    assert "3 broken" in report, report
    for broken in ("icam_med.io is not allowed to import icam_med.cam",
                   "icam_med is not allowed to import napari",
                   "icam_med.report is not allowed to import icam_med.batch"):
        assert broken in report, report
    # the copy really was analysed (its injected lines are quoted back)
    assert "icam_med.explain -> napari" in report
