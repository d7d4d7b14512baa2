"""icam_med.evaluation.evaluate and `icam-med evaluate` end to end on tiny sets (seconds)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from icam_med.cli import main
from icam_med.evaluation.evaluate import COLUMNS, EvalVolume, default_methods, evaluate
from icam_med.evaluation.synthetic import LesionSynthesizer
from icam_med.networks import LesionNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_volumes():
    rng = np.random.default_rng(0)
    template = np.zeros((20, 20, 20), np.float32)
    template[3:17, 3:17, 3:17] = 1.0 + 0.1 * rng.standard_normal((14, 14, 14)).astype(np.float32)
    synth = LesionSynthesizer(template, template > 0, (4.0, 4.0, 4.0), seed=0,
                              radius_mm=(6.0, 9.0), max_shift_mm=0.0)
    vols = []
    for i in range(3):
        v = synth(i, split="test", label=1)
        x = torch.from_numpy((v.image - v.image[v.image > 0].mean()) / v.image[v.image > 0].std())
        vols.append(EvalVolume(x=x[None] * (torch.from_numpy(v.image) > 0), mask=torch.from_numpy(v.mask),
                               target=1, spacing=(4.0, 4.0, 4.0),
                               domain=torch.from_numpy(v.image > 0), name=f"tiny-{i}"))
    return vols


def test_evaluate_tiny_set_end_to_end(tiny_volumes):
    torch.manual_seed(0)
    model = LesionNet(spatial_dims=3, channels=(4, 8, 8)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model, tiny_volumes, fractions=(0.0, 0.1, 0.5, 1.0), n_boot=200)
    methods = default_methods()
    assert len(result.rows) == len(tiny_volumes) * len(methods)
    assert [r["method"] for r in result.summary] == [m.label for m in methods]
    for row in result.rows:
        assert row["pointing_game"] in (0.0, 1.0)
        assert 0.0 <= row["energy_in_mask"] <= 1.0
        assert 0.0 <= row["deletion_auc"] <= 1.0 and 0.0 <= row["insertion_auc"] <= 1.0
        assert 0.0 <= row["average_drop"] <= 1.0 and row["increase_in_confidence"] in (0.0, 1.0)
        assert -1.0 <= row["randomisation_rho"] <= 1.0
        assert row["runtime_ms"] > 0
    by_label = {r["method"]: r for r in result.summary}
    # The model-free control cannot change with the weights: caught by the sanity check.
    control = by_label["input-edges (control)"]
    assert control["randomisation_rho_mean"] == pytest.approx(1.0)
    assert control["randomisation_flagged"]
    for s in result.summary:
        m, lo, hi = s["energy_in_mask_mean"], s["energy_in_mask_ci_low"], s["energy_in_mask_ci_high"]
        assert lo <= m <= hi
    # The user's model is left exactly as it was.
    assert not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # Tables: CSV with every column's mean and CI, Markdown with one row per method.
    rows = list(csv.DictReader(io.StringIO(result.summary_csv())))
    assert len(rows) == len(methods) and all(f"{c}_ci_low" in rows[0] for c in COLUMNS)
    md = result.summary_markdown()
    assert md.count("\n| ") >= len(methods) and "**flagged**" in md
    per_volume = list(csv.DictReader(io.StringIO(result.rows_csv())))
    assert len(per_volume) == len(result.rows)


def test_evaluate_2d(tiny_volumes):
    torch.manual_seed(0)
    model = LesionNet(spatial_dims=2, channels=(4, 8)).eval()
    vols = [EvalVolume(x=v.x[:, :, :, 10], mask=v.mask[:, :, 10] | (v.mask.sum(-1) > 0),
                       target=1, spacing=(4.0, 4.0), name=v.name) for v in tiny_volumes[:2]]
    specs = [m for m in default_methods() if m.label in ("integrative", "gradcam")]
    result = evaluate(model, vols, specs, fractions=(0.0, 0.5, 1.0), n_boot=100,
                      randomisation=False)
    assert len(result.rows) == 4
    assert all(r["randomisation_rho"] is None for r in result.rows)
    assert all(math.isnan(s["randomisation_rho_mean"]) for s in result.summary)


def test_evaluate_refuses_empty_masks_and_bad_options(tiny_volumes):
    model = LesionNet(spatial_dims=3, channels=(4, 8, 8)).eval()
    v = tiny_volumes[0]
    empty = EvalVolume(x=v.x, mask=torch.zeros_like(v.mask), target=1, spacing=v.spacing)
    with pytest.raises(ValueError, match="mask is empty"):
        evaluate(model, [empty], default_methods()[:1], fractions=(0.0, 1.0))
    with pytest.raises(ValueError, match="baseline"):
        evaluate(model, [v], default_methods()[:1], baseline="noise")


def test_cli_evaluate_demo_model_on_two_volumes(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out),
            "--n-volumes", "2", "--steps", "4", "--n-boot", "100",
            "--methods", "integrative,integrative-no-bias,gradcam,input-edges (control)"]
    assert main(args) == 0
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["method"] for r in summary] == ["integrative", "integrative-no-bias", "gradcam",
                                            "input-edges (control)"]
    assert summary[-1]["randomisation_flagged"] == "True"
    settings = json.loads((out / "settings.json").read_text())
    assert settings["n_volumes"] == 2 and settings["baseline"] == "blur"
    assert settings["model"]["weights_sha256"]
    assert "Integrative" in (out / "summary.md").read_text() or "integrative" in (out / "summary.md").read_text()
    # Existing outputs are refused before any work, unless --overwrite.
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_cli_evaluate_rejects_unknown_method(tmp_path, capsys):
    rc = main(["evaluate", "--out", str(tmp_path / "e"), "--methods", "integrative,nope",
               "--config", str(REPO / "configs" / "demo.yaml")])
    assert rc == 2
    assert "unknown row" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
