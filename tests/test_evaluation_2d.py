"""The 2-D evaluation (issue 13 item 3): `icam-med evaluate --suite radiographs` on the real
2-D demo model (configs/demo2d.yaml) and held-out synthetic radiographs with a known finding.

The metrics must be able to fail: a map peaked away from the finding scores 0 on the
pointing game and ~0 energy, an oracle map on the finding scores 1, through the same
``evaluate`` run the table uses.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from icam_med.cli import main
from icam_med.config import load_config
from icam_med.evaluation import radiograph_suite as rs
from icam_med.evaluation.evaluate import (
    MethodSpec,
    engine_default_options,
    evaluate,
    method_rows,
    select_rows,
)
from icam_med.evaluation.synthetic import normalise_with_twin
from icam_med.models import load_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "demo2d.yaml"
TRAINING_RECORD = REPO / "sample_data" / "demo2d" / "demo2d_finding_net.training.json"


@pytest.fixture(scope="module")
def demo2d():
    cfg = load_config(CONFIG)
    model, info = load_model(cfg.model)
    return cfg, model, info


@pytest.fixture(scope="module")
def cases(demo2d):
    cfg, _, info = demo2d
    return list(rs.radiograph_volumes(cfg.preprocessing, info.spatial_size, 3,
                                      target=info.labels.index("present"), split="test"))


def test_streams_are_held_out_from_the_demo_models_training():
    # The demo model trained on default_rng([seed, step]) for every step (plus 8 batches
    # re-estimating BatchNorm) and was checked on [seed, 10**6]; the sample radiographs use
    # [0, i]. No stream of either split, positive or negative, may give the same generator
    # (NumPy ignores trailing zero words: [0, 5, 0] is [0, 5]).
    record = json.loads(TRAINING_RECORD.read_text())
    seed, steps = record["seed"], record["steps"]
    used = {tuple(np.random.SeedSequence([seed, s]).generate_state(4))
            for s in [*range(steps + 8), 10 ** 6]}
    used |= {tuple(np.random.SeedSequence([0, i]).generate_state(4)) for i in range(8)}
    mine = {}
    for split in rs.SPLITS:
        for positive in (True, False):
            for i in range(200):
                words = rs.stream(i, split=split, positive=positive, seed=seed)
                mine[tuple(np.random.SeedSequence(words).generate_state(4))] = words
    assert len(mine) == 2 * 2 * 200  # validation, test, positives and negatives all distinct
    assert not used & mine.keys()
    with pytest.raises(ValueError, match="split"):
        rs.stream(0, split="train")


def test_cases_put_the_finding_where_it_was_drawn_on_the_model_grid(demo2d, cases):
    _, model, _ = demo2d
    case = rs.draw_case(0, (256, 256), split="test")
    # The twin is the same radiograph without the finding (same body, texture and noise):
    # it differs only by the finding's soft edge away from it, and by the finding on it.
    far = np.hypot(*np.meshgrid(np.arange(256) - case.centre[0], np.arange(256) - case.centre[1],
                                indexing="ij")) > case.radius + 40
    assert np.abs(case.image - case.twin)[far].max() < 0.01  # of 4095
    assert (case.image - case.twin)[case.disc].mean() > 0.2 * 4095
    vol = cases[0]
    assert vol.x.shape == (1, 64, 64) and vol.twin.shape == (1, 64, 64)
    assert vol.spacing == pytest.approx((1.6, 1.6))  # 4 x the nominal 0.4 mm
    # MONAI's 2-D layout is (columns, rows): the mask's centroid is the drawn (column, row)
    # scaled to the model's grid (pixel centres: 4 drawn pixels per model pixel).
    cols, rows = torch.nonzero(vol.mask, as_tuple=True)
    expect_col, expect_row = (case.centre[1] - 1.5) / 4, (case.centre[0] - 1.5) / 4
    assert float(cols.float().mean()) == pytest.approx(expect_col, abs=0.5)
    assert float(rows.float().mean()) == pytest.approx(expect_row, abs=0.5)
    assert int(vol.mask.sum()) == pytest.approx(np.pi * (case.radius / 4) ** 2, rel=0.25)
    # z-scored over the whole image (the config's NormalizeIntensityd); the twin with the
    # image's statistics: equal to x wherever the raw radiographs agree after the resize.
    assert abs(float(vol.x.mean())) < 1e-4 and abs(float(vol.x.std()) - 1) < 1e-3
    image, twin = (np.asarray(a.T, np.float32) for a in (case.image, case.twin))
    x, x_twin = normalise_with_twin(image, twin, [{"name": "NormalizeIntensityd"}])
    same = image == twin
    assert same.any() and np.array_equal(x[0][same], x_twin[0][same])
    np.testing.assert_allclose(x_twin[0], (twin - image.mean()) / image.std(), atol=1e-4)
    # The real model sees the finding on these held-out cases.
    with torch.no_grad():
        p = torch.softmax(model(torch.stack([v.x for v in cases])), 1)[:, 1]
        p_twin = torch.softmax(model(torch.stack([v.twin for v in cases])), 1)[:, 1]
    assert (p > 0.5).all() and (p_twin < p).all()


def _reference_rows(cases):
    """Three maps looked up by the input they are asked about: the finding's disc (an oracle
    for localisation), the finding's own profile ``|x - twin|`` (an oracle for the
    counterfactual deletion: it removes the finding, soft edge included, first) and a blob
    in the corner farthest from the finding."""
    by_input = {}
    xx, yy = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    for v in cases:
        cx, cy = (float(t.float().mean()) for t in torch.nonzero(v.mask, as_tuple=True))
        ax, ay = (0.0 if cx > 32 else 63.0), (0.0 if cy > 32 else 63.0)
        away = torch.exp(-((xx - ax) ** 2 + (yy - ay) ** 2) / 50.0)
        key = hashlib.sha256(v.x.numpy().tobytes()).hexdigest()
        by_input[key] = (v.mask.float(), (v.x - v.twin).abs()[0], away)

    def factory(which):
        def make(model):
            def explain(x, target):
                key = hashlib.sha256(x[0].detach().cpu().numpy().tobytes()).hexdigest()
                return by_input[key][which][None, None]
            return explain
        return make

    return [MethodSpec(label, None, factory=factory(i), kind="control")
            for i, label in enumerate(("disc", "profile", "away"))]


def test_metrics_can_fail_oracle_scores_one_and_a_map_away_scores_zero(demo2d, cases):
    _, model, _ = demo2d
    rows = _reference_rows(cases) + select_rows(
        method_rows(model, (64, 64), default_options=engine_default_options(), variants=[]),
        ["default"])
    result = evaluate(model, cases, rows, tolerance_mm=1.6, n_randomisation=1, n_boot=200)
    assert result.cell("disc", "all", "pointing_game")[0] == 100.0
    assert result.cell("disc", "all", "energy_in_mask")[0] == pytest.approx(1.0)
    assert result.cell("profile", "all", "pointing_game")[0] == 100.0
    assert result.cell("away", "all", "pointing_game")[0] == 0.0
    assert result.cell("away", "all", "energy_in_mask")[0] < 1e-6
    per = {(r["volume"], r["method"]): r for r in result.rows}
    # Deletion can only bring the model down to what it says on the healthy twin: on the
    # cases whose twin it calls absent, removing the finding first drops its belief, and
    # removing a far corner does not.
    clear = [v.name for v in cases if per[(v.name, "away")]["p_twin"] < 0.5]
    assert clear, "no case whose healthy twin the model calls absent"
    for name in clear:
        assert per[(name, "profile")]["deletion_auc"] < per[(name, "away")]["deletion_auc"] - 0.3
        assert per[(name, "away")]["deletion_auc"] > 0.8
    # Model-free maps survive randomisation of every block (rho = 1); the engine's map of
    # the trained model does not once the blocks are re-initialised.
    assert result.rho_columns == ["rho_head", "rho_stages.1", "rho_stages.0", "rho_stem"]
    assert result.cell("disc", "all", "rho_stem")[0] == pytest.approx(1.0)
    assert result.cell("integrative (default)", "all", "rho_stem")[0] < 0.5
    # The real default lands on the finding of these cases (the model sees it in each).
    assert result.cell("integrative (default)", "all", "pointing_game")[0] == 100.0
    assert result.cell("integrative (default)", "all", "energy_in_mask")[0] > 0.3
    md = result.summary_markdown("tiny", by_polarity=False)
    assert "| Pointing % ↑ | Deletion AUC ↓ | Energy in finding ↑ | CPU ms ↓ |" in md
    assert "dark" not in md.split("Cascading")[0]


def test_cli_evaluate_radiographs_end_to_end(tmp_path, capsys):
    out = tmp_path / "eval2d"
    # No --suite: the 2-D config chooses the radiograph suite.
    args = ["evaluate", "--config", str(CONFIG), "--out", str(out), "--n-volumes", "2",
            "--n-negatives", "3", "--n-randomisation", "1", "--n-boot", "50",
            "--deletion-max", "0.01", "--deletion-step", "0.005",
            "--methods", "default,gradcam @ stages,input intensity (control)"]
    assert main(args) == 0
    folder = out / "demo2d-finding-cnn"
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["suite"] == "radiographs" and settings["n_volumes"] == 2
    assert settings["tolerance_mm"] == pytest.approx(1.6)  # one model pixel
    assert settings["data"]["split"] == "test"
    assert settings["data"]["streams"]["positive"].startswith(f"[0, {rs.STREAM_TAG}, 2, 1,")
    assert settings["negatives"]["n"] == 3
    summary = list(csv.DictReader((folder / "summary.csv").open()))
    assert [r["method"] for r in summary][::3] == [
        "integrative (default)", "gradcam @ stages", "input intensity (control)"]
    assert {r["n"] for r in summary if r["group"] == "hyper"} == {"2"}
    per_volume = list(csv.DictReader((folder / "per_volume.csv").open()))
    assert len(per_volume) == 2 * 3 and all(r["deletion_auc"] for r in per_volume)
    negatives = list(csv.DictReader((folder / "negatives.csv").open()))
    assert [r["case"] for r in negatives] == [f"test-negative-{i:04d}" for i in range(3)]
    assert all(0.0 <= float(r["p_present"]) <= 1.0 for r in negatives)
    assert settings["negatives"]["model_said_absent"] == sum(r["predicted"] == "0"
                                                             for r in negatives)
    md = (folder / "summary.md").read_text()
    assert "radiographs with a finding" in md and "Energy in finding" in md
    # Existing outputs (negatives.csv included) are refused before any work.
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "message"), [
    (["--suite", "brains", "--config", str(CONFIG)], "--suite radiographs"),
    (["--suite", "radiographs", "--config", str(REPO / "configs" / "demo.yaml")],
     "--suite brains"),
    (["--n-negatives", "2", "--config", str(REPO / "configs" / "demo.yaml")],
     "radiograph suite"),
])
def test_cli_refuses_a_suite_that_does_not_fit_the_model(tmp_path, capsys, extra, message):
    out = tmp_path / "eval"
    assert main(["evaluate", "--out", str(out), "--n-volumes", "1", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
