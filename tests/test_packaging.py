"""The wheel works without the checkout: build it, install it into a fresh venv, run it.

The fresh venv lives in a temporary folder and sees the project's heavy dependencies (torch,
MONAI, napari...) through a ``.pth`` line naming this venv's site-packages; ``.pth`` files
inside that folder are not processed, so this checkout's editable install is invisible and
``icam_med`` / ``napari_plugin`` can only come from the wheel. Every command runs from a
temporary working directory, with the user cache redirected to a temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import nibabel as nib
import pytest

REPO = Path(__file__).resolve().parents[1]
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"

pytestmark = pytest.mark.slow


def _source_tree(dest: Path) -> Path:
    """A copy of the files git would ship (tracked, plus new files not ignored), so the
    build never writes build/ or egg-info into the shared checkout."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv python, env, working dir): the wheel installed into a fresh venv."""
    root = tmp_path_factory.mktemp("packaging")
    src = _source_tree(root / "src")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "-w", str(dist), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("icam_med-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    # the heavy dependencies of this venv, after the fresh venv's own packages
    (site / "_icam_med_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-index", "--quiet", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    work = root / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "ICAM_MED_SAMPLE_DIR", "VIRTUAL_ENV")}
    env["XDG_CACHE_HOME"] = str(root / "cache")  # platformdirs' user cache on Linux
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return wheel, python, env, work


def test_wheel_holds_every_package_the_configs_and_the_demo_model(installed):
    wheel, *_ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("icam_med", "napari_plugin"):
        for py in (REPO / folder).rglob("*.py"):
            rel = py.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert rel in names, f"{rel} is missing from the wheel (pyproject packages)"
    import yaml

    for config in (REPO / "configs").glob("*.yaml"):
        assert f"icam_med/configs/{config.name}" in names
        # the weights a packaged config names ship with it (same relative layout)
        weights = (yaml.safe_load(config.read_text()).get("model") or {}).get("weights")
        if weights and (config.parent / weights).is_file():
            shipped = (config.parent / weights).resolve().relative_to(REPO).as_posix()
            assert f"icam_med/{shipped}" in names, f"{config.name}: {shipped} is not in the wheel"
    for name in ("demo_lesion_net.safetensors", "MODEL_CARD.md", "demo_lesion_net.training.json"):
        assert f"icam_med/sample_data/{name}" in names
    assert "icam_med/schemas/audit-record-v1.schema.json" in names
    assert "napari_plugin/napari.yaml" in names
    # generated scans and development files stay out
    assert not [n for n in names if "/scans/" in n or n.startswith(("tests/", "scripts/"))]


def test_cli_explains_with_the_packaged_demo_config_from_any_directory(installed):
    _, python, env, work = installed
    scan = work / "anatomical.nii"
    shutil.copy(ANATOMICAL, scan)
    out = subprocess.run(["icam-med", "explain", str(scan), "--config", "demo",
                          "--out", "out"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert (work / "out" / "cam.nii.gz").is_file()
    record = json.loads((work / "out" / "cam.icam.json").read_text())
    assert record["model"]["name"] == "demo-lesion-cnn"
    # the packaged config was used, from the installed wheel, not from this checkout
    where = subprocess.run(
        [str(python), "-c", "import icam_med.resources as r; print(r.resolve_config('demo'))"],
        cwd=work, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_file() and REPO not in Path(where).parents
    assert str(python.parents[1]) in where
    # a name that is neither a file nor a packaged config: a clear error listing the names
    bad = subprocess.run(["icam-med", "explain", str(scan), "--config", "dmeo", "--out", "o2"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "demo" in bad.stderr and "dmeo" in bad.stderr
    assert not (work / "o2").exists()


PLUGIN_CHECK = """
import json, sys
from pathlib import Path
import icam_med, napari_plugin
from napari_plugin import _sample_data, _widget
from icam_med.resources import sample_scans_dir
choices = [value for _, value in _widget.config_choices(show_templates=True)]
(ct,) = _sample_data.sample_ct()
audit = _sample_data.sample_audit()
print(json.dumps({
    "files": [icam_med.__file__, napari_plugin.__file__, _sample_data.__file__],
    "configs": choices,
    "sample_dir": str(sample_scans_dir()),
    "ct_shape": list(ct[0].shape),
    "ct_path": str(ct[1]["metadata"]["icam_med"]["source_path"]),
    "audit_kinds": [kw["metadata"]["icam_med"]["kind"] for _, kw, _ in audit],
    "audit_weights": [kw["metadata"]["icam_med"]["record"]["model"]["weights_sha256"]
                      for _, kw, _ in audit if kw["metadata"]["icam_med"]["kind"] == "fused"],
}))
"""


def test_plugin_sample_data_and_configs_work_from_the_wheel(installed):
    _, python, env, work = installed
    out = subprocess.run([str(python), "-c", PLUGIN_CHECK], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout.strip().splitlines()[-1])
    for file in found["files"]:
        assert REPO not in Path(file).parents, f"{file} was imported from the checkout"
        assert str(python.parents[1]) in file
    configs = [Path(c) for c in found["configs"][:-1]]
    assert configs[0].name == "demo.yaml"
    assert {c.name for c in configs} == {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert all(c.is_file() and REPO not in c.parents for c in configs)
    # sample scans are built on demand in the per-user cache (XDG_CACHE_HOME here)
    cache = Path(env["XDG_CACHE_HOME"]) / "icam-med" / "sample_scans"
    assert Path(found["sample_dir"]) == cache
    assert found["ct_shape"] == [5, 16, 16] and Path(found["ct_path"]).parent == cache
    # the demo audit is computed there with the packaged demo weights
    assert found["audit_kinds"][0] == "scan" and "fused" in found["audit_kinds"]
    from icam_med.audit.hashing import sha256_file

    assert found["audit_weights"] == [
        sha256_file(REPO / "sample_data" / "demo_lesion_net.safetensors")]
