"""Model and method comparison (issue 14 item 9): `icam-med compare AUDIT_A AUDIT_B --out DIR`.

Two real audits of the same small scans, explained by two different tiny LesionNets; the
second audit names one scan differently and lacks another, so matching by voxel hash and
the unmatched list are exercised. Figures are checked against direct computations on the
maps as written (nibabel, scipy).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from _audit_util import write_tiny_lesionnet_config
from PIL import Image
from render_helpers import screenshot_html
from scipy.stats import spearmanr

from icam_med import cli
from icam_med.audit import AuditRecord, Ledger
from icam_med.batch import run_batch
from icam_med.report.compare import map_agreement, peak_distance_mm, top_overlap

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


@pytest.fixture(scope="module")
def audits(tmp_path_factory):
    base = tmp_path_factory.mktemp("compare")
    rng = np.random.default_rng(3)
    scans = []
    for i in range(3):
        vol = rng.integers(0, 500, (12, 14, 10)).astype(np.int16)
        vol[3 + i:7 + i, 4:9, 3:6] += 600  # a bright "lesion", moving from scan to scan
        p = base / f"case{i:02d}.nii.gz"
        nib.save(nib.Nifti1Image(vol, AFFINE), str(p))
        scans.append(p)
    # Audit B gets scan 1 under another name (matched by voxel hash, not id) and no scan 2.
    renamed = base / "b_inputs" / "other_name.nii.gz"
    renamed.parent.mkdir()
    shutil.copy(scans[1], renamed)
    (base / "ma").mkdir()
    (base / "mb").mkdir()
    cfg_a = write_tiny_lesionnet_config(base / "ma", name="model-alpha")
    cfg_b = write_tiny_lesionnet_config(base / "mb", name="model-beta", head_scale=-3.0)
    out_a, out_b = base / "audit_a", base / "audit_b"
    assert run_batch(scans, cfg_a, out_a, progress=False).exit_code == 0
    assert run_batch([scans[0], renamed], cfg_b, out_b, progress=False).exit_code == 0
    return {"base": base, "a": out_a, "b": out_b, "scans": scans}


def records(folder):
    out = {}
    for e in Ledger(folder).entries():
        if e.kind == "scan":
            rec = AuditRecord.load(folder / e.record.path, root=folder)
            out[rec.scan_id] = rec
    return out


def read_map(rec):
    img = nib.load(str(rec.map_path))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


def run_cli(argv, capsys):
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def test_two_models_compared_by_voxel_hash(audits, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc, stdout, err = run_cli(["compare", audits["a"], audits["b"], "--out", out], capsys)
    assert rc == 0, err
    assert "compared 2 shared scan(s) (1 only in A, 0 only in B)" in stdout
    doc = json.loads((out / "comparison.json").read_text())
    assert doc["audit_a"]["models"][0].startswith("model-alpha")
    assert doc["audit_b"]["models"][0].startswith("model-beta")
    assert doc["audit_a"]["methods"] == ["integrative"]
    assert [u["scan_id"] for u in doc["only_a"]] == ["case02"]
    assert doc["only_b"] == []
    rec_a, rec_b = records(audits["a"]), records(audits["b"])
    pairs = {(r["scan_id_a"], r["scan_id_b"]): r for r in doc["scans"]}
    assert set(pairs) == {("case00", "case00"), ("case01", "other_name")}
    for (sa, sb), row in pairs.items():
        ra, rb = rec_a[sa], rec_b[sb]
        assert ra.input.voxel_sha256 == rb.input.voxel_sha256 == row["voxel_sha256"]
        ma, _ = read_map(ra)
        mb, _ = read_map(rb)
        assert row["spearman"] == pytest.approx(spearmanr(ma.ravel(), mb.ravel())[0], abs=1e-9)
        for p in (1, 5, 10):
            n = int(np.ceil(ma.size * p / 100))
            ta = set(np.argsort(-ma.ravel(), kind="stable")[:n].tolist())
            tb = set(np.argsort(-mb.ravel(), kind="stable")[:n].tolist())
            assert row[f"dice_top{p}"] == pytest.approx(2 * len(ta & tb) / (2 * n))
            assert row[f"iou_top{p}"] == pytest.approx(len(ta & tb) / len(ta | tb))
        pa = np.array(np.unravel_index(np.argmax(ma), ma.shape))
        pb = np.array(np.unravel_index(np.argmax(mb), mb.shape))
        assert row["peak_distance_mm"] == pytest.approx(
            float(np.linalg.norm((pa - pb) * np.array([2.0, 2.0, 3.0]))))
        # Prediction agreement from the records' own predictions.
        assert row["predicted_a"] == ra.method.predicted.name
        assert row["predicted_b"] == rb.method.predicted.name
        assert row["same_prediction"] == (row["predicted_a"] == row["predicted_b"])
        assert 0.0 <= row["probability_a"] <= 1.0 and 0.0 <= row["probability_b"] <= 1.0
    # Summary means are the means of the rows; the CSV holds the same rows.
    assert doc["summary"]["mean_spearman"] == pytest.approx(
        np.mean([r["spearman"] for r in doc["scans"]]))
    with open(out / "comparison.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["scan_id_a"], float(r["spearman"])) for r in rows] == [
        (r["scan_id_a"], pytest.approx(r["spearman"])) for r in doc["scans"]]
    html = (out / "comparison.html").read_text()
    assert "model-alpha" in html and "model-beta" in html and "case02" in html
    assert html.count("<img alt='maps A and B side by side'") == 2
    assert "BROKEN" not in html


def test_identical_maps_agree_perfectly(audits, tmp_path, capsys):
    rc, _, err = run_cli(["compare", audits["a"], audits["a"], "--out", tmp_path / "c"],
                         capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert len(doc["scans"]) == 3
    for row in doc["scans"]:
        assert row["spearman"] == pytest.approx(1.0)
        assert row["dice_top1"] == row["iou_top10"] == 1.0
        assert row["peak_distance_mm"] == 0.0 and row["same_prediction"] is True


def test_peak_distance_for_a_known_shift():
    vol = np.zeros((20, 20, 12), np.float32)
    vol[5, 6, 4] = 1.0
    shifted = np.roll(vol, (3, -2, 2), axis=(0, 1, 2))
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -4.0],
                       [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1.0]])  # permuted, flipped, anisotropic
    # Voxel shift (3, -2, 2) -> world shift (1.5*2, 2*3, 3*2) = (3, 6, 6) mm: 9 mm.
    assert peak_distance_mm(vol, affine, shifted, affine) == pytest.approx(9.0)
    got = map_agreement(vol, affine, shifted, affine)
    assert got["peak_distance_mm"] == pytest.approx(9.0)
    assert top_overlap(vol, vol, 1) == (1.0, 1.0)
    with pytest.raises(ValueError, match="different grids"):
        map_agreement(vol, affine, vol[:-1], affine)


def test_refuses_to_overwrite(audits, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli(["compare", audits["a"], audits["b"], "--out", out], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc, _, err = run_cli(["compare", audits["a"], audits["b"], "--out", out], capsys)
    assert rc == 2 and "already exists" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_broken_audit_refused_or_bannered(audits, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(audits["b"], broken)
    rec = records(broken)["case00"]
    with open(rec.map_path, "r+b") as fh:  # tamper with one map
        fh.seek(40)
        fh.write(b"\x00\x01")
    rc, _, err = run_cli(["compare", audits["a"], broken, "--out", tmp_path / "x"], capsys)
    assert rc == 2 and "does not verify" in err and "--allow-broken" in err
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert not (tmp_path / "x").exists()  # nothing written
    rc, _, err = run_cli(["compare", audits["a"], broken, "--out", tmp_path / "y",
                          "--allow-broken"], capsys)
    assert rc == 1 and "BROKEN" in err
    assert "class='broken'>BROKEN: audit B" in (tmp_path / "y" / "comparison.html").read_text()


def test_bad_inputs_one_line(audits, tmp_path, capsys):
    rc, _, err = run_cli(["compare", tmp_path / "nope", audits["b"], "--out", tmp_path / "o"],
                         capsys)
    assert rc == 2 and "holds no ledger.jsonl" in err and "Traceback" not in err
    other = tmp_path / "other"
    cfg = write_tiny_lesionnet_config(tmp_path)
    vol = np.random.default_rng(9).integers(0, 500, (12, 14, 10)).astype(np.int16)
    scan = tmp_path / "lone.nii.gz"
    nib.save(nib.Nifti1Image(vol, AFFINE), str(scan))
    assert run_batch([scan], cfg, other, progress=False).exit_code == 0
    rc, _, err = run_cli(["compare", audits["a"], other, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and "share no scan" in err
    assert not (tmp_path / "o").exists()


PROBE = """
import json, sys
from icam_med import cli
code = cli.main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "monai", "SimpleITK", "itk", "highdicom") if m in sys.modules)
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
"""


def test_compare_imports_neither_torch_nor_monai(audits, tmp_path):
    proc = subprocess.run([sys.executable, "-c", PROBE, "compare", str(audits["a"]),
                           str(audits["b"]), "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, proc.stderr
    assert json.loads(line[len("PROBE "):]) == {"code": 0, "heavy": []}


def test_chromium_renders_comparison(audits, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run_cli(["compare", audits["a"], audits["b"], "--out", out], capsys)[0] == 0
    shot = screenshot_html(out / "comparison.html", tmp_path / "shot.png", height=1600)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    grey = img.mean(axis=2)
    assert grey.std() > 10, "the page is (nearly) one flat colour"
    # The montages' inferno colours are on screen (red-orange pixels: the maps are drawn).
    warm = (img[..., 0] > 150) & (img[..., 2] < 100) & (img[..., 1] < 180)
    assert warm.sum() > 200


def test_two_methods_on_one_model(audits, tmp_path, capsys):
    cfg_a = audits["base"] / "ma" / "tiny.yaml"
    text = cfg_a.read_text()
    assert "method: {name: integrative" in text
    cfg_g = audits["base"] / "ma" / "gradcam.yaml"  # same weights file, same model
    cfg_g.write_text(text.replace("method: {name: integrative", "method: {name: gradcam"))
    out_g = tmp_path / "audit_gradcam"
    assert run_batch(audits["scans"][:2], cfg_g, out_g, progress=False).exit_code == 0
    rc, _, err = run_cli(["compare", audits["a"], out_g, "--out", tmp_path / "c"], capsys)
    assert rc == 0, err
    doc = json.loads((tmp_path / "c" / "comparison.json").read_text())
    assert doc["audit_a"]["methods"] == ["integrative"]
    assert doc["audit_b"]["methods"] == ["gradcam"]
    assert doc["audit_a"]["models"] == doc["audit_b"]["models"]  # one model, two methods
    assert len(doc["scans"]) == 2
    # One model: the predictions agree whatever the method; the maps are compared.
    assert all(r["same_prediction"] for r in doc["scans"])
    assert all(r["spearman"] is not None and -1.0 <= r["spearman"] <= 1.0
               for r in doc["scans"])
    html = (tmp_path / "c" / "comparison.html").read_text()
    assert "<td class='l'>integrative</td><td class='l'>gradcam</td>" in html
