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
from icam_med.evaluation.evaluate import (
    COLUMNS,
    GROUPS,
    EvalVolume,
    MethodSpec,
    SummaryTable,
    evaluate,
    method_rows,
    rank_variants,
    select_rows,
    variant_grid,
)
from icam_med.evaluation.synthetic import EvalSynthesizer, normalise_with_twin
from icam_med.networks import LesionNet

REPO = Path(__file__).resolve().parents[1]
STEPS = [{"name": "NormalizeIntensityd", "nonzero": True}]


@pytest.fixture(scope="module")
def tiny_volumes():
    """Four 24^3 volumes (2 dark, 2 bright) of a box 'brain' with twins and distractors."""
    rng = np.random.default_rng(0)
    template = np.zeros((24, 24, 24), np.float32)
    template[4:18, 4:18, 4:18] = 100 + 10 * rng.standard_normal((14, 14, 14)).astype(np.float32)
    synth = EvalSynthesizer(template, template > 0, (4.0, 4.0, 4.0), seed=0, radius_mm=(6.0, 9.0),
                            distractor_radius_mm=(4.0, 5.0))
    vols = []
    for i in range(4):
        v = synth(i, split="test", label=1, polarity=("hypo", "hyper")[i % 2])
        x, twin = normalise_with_twin(v.image, v.twin, STEPS)
        vols.append(EvalVolume(x=torch.from_numpy(x), mask=torch.from_numpy(v.mask), target=1,
                               spacing=(4.0, 4.0, 4.0), twin=torch.from_numpy(twin),
                               distractor_mask=torch.from_numpy(v.distractor_mask),
                               polarity=v.polarity, name=f"tiny-{i}"))
    return vols


def _model(dims: int = 3) -> LesionNet:
    torch.manual_seed(0)
    return LesionNet(spatial_dims=dims, channels=(4, 8, 8)).eval()


def test_evaluate_tiny_set_reports_every_metric_per_polarity(tiny_volumes):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = select_rows(method_rows(model, (24, 24, 24), default_options={"layer_weighting": "net"}),
                       ["default", "layercam[stages|uniform|sum]",
                        "polycam-prototype[layercam|stages]", "torchcam-layercam[stages]",
                        "layercam @ stem", "controls"])
    result = evaluate(model, tiny_volumes, rows, fractions=(0.0, 0.05, 0.1), n_randomisation=2,
                      n_boot=200)
    assert len(result.rows) == len(tiny_volumes) * len(rows)
    # Cascading randomisation: one column per block, top first (head, stages.1, stages.0, stem).
    assert result.rho_columns == ["rho_head", "rho_stages.1", "rho_stages.0", "rho_stem"]
    for row in result.rows:
        assert row["pointing_game"] in (0.0, 1.0)
        assert 0.0 <= row["energy_in_mask"] <= 1.0
        assert 0.0 <= row["deletion_auc"] <= 1.0
        assert row["distractor_hit"] in (0.0, 1.0)
        assert row["runtime_ms"] >= 0 and row["wall_ms"] > 0
        assert row["p_twin"] is not None and row["polarity"] in ("hypo", "hyper")
        done = int(row["volume"].split("-")[1]) < 2  # only the first 2 volumes are randomised
        assert all((row[c] is not None) == done for c in result.rho_columns)
    # Summaries per method for all / dark / bright volumes, CIs around the mean.
    assert [(s["method"], s["group"]) for s in result.summary] == [
        (r.label, g) for r in rows for g in GROUPS]
    assert {s["n"] for s in result.summary if s["group"] != "all"} == {2}
    for s in result.summary:
        m, lo, hi = s["energy_in_mask_mean"], s["energy_in_mask_ci_low"], s["energy_in_mask_ci_high"]
        assert lo <= m <= hi
    # The model-free controls cannot change with the weights: rho = 1 at every depth.
    for c in result.rho_columns:
        assert result.cell("input intensity (control)", "all", c)[0] == pytest.approx(1.0)
    # The user's model is left exactly as it was.
    assert not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # Tables: CSV per method x group with every column, Markdown with both tables.
    table = list(csv.DictReader(io.StringIO(result.summary_csv())))
    assert len(table) == len(rows) * len(GROUPS)
    assert all(f"{c}_ci_low" in table[0] for c in [*COLUMNS, *result.rho_columns])
    md = result.summary_markdown("tiny")
    assert md.count("\n| ") >= 2 * len(rows) and "Cascading randomisation" in md
    assert len(list(csv.DictReader(io.StringIO(result.rows_csv())))) == len(result.rows)


def test_evaluate_2d_without_twins_or_randomisation(tiny_volumes):
    model = _model(2)
    vols = [EvalVolume(x=v.x[:, :, :, 10], mask=v.mask[:, :, 10] | (v.mask.sum(-1) > 0),
                       target=1, spacing=(4.0, 4.0), polarity=v.polarity, name=v.name)
            for v in tiny_volumes[:2]]
    rows = [MethodSpec("icam", "integrative", {"layer_weighting": "uniform"}, kind="variant")]
    result = evaluate(model, vols, rows, n_randomisation=0, n_boot=100)
    assert len(result.rows) == 2 and not result.rho_columns
    assert all(r["deletion_auc"] is None and r["distractor_hit"] is None for r in result.rows)
    assert math.isnan(result.cell("icam", "all", "deletion_auc")[0])


def test_evaluate_refuses_empty_masks_duplicate_rows_and_unknown_names(tiny_volumes):
    model = _model()
    v = tiny_volumes[0]
    rows = [MethodSpec("a", "gradcam", {"target_layers": "last"})]
    empty = EvalVolume(x=v.x, mask=torch.zeros_like(v.mask), target=1, spacing=v.spacing)
    with pytest.raises(ValueError, match="mask is empty"):
        evaluate(model, [empty], rows, n_randomisation=0)
    with pytest.raises(ValueError, match="unique"):
        evaluate(model, [v], rows * 2, n_randomisation=0)
    with pytest.raises(ValueError, match="unknown row"):
        select_rows(method_rows(model, (24, 24, 24)), ["variants", "nope"])


def test_variant_grid_and_ranking_rule():
    grid = variant_grid()
    # Factorial without bias (2 terms x 5 weightings x 2 fusions) + the bias screen.
    assert len([g for g in grid if g["bias_weight"] == 0]) == 20
    assert all(g["target_layers"] == "stages" for g in grid)

    def table(values):  # label -> (pg dark, pg bright, del dark, del bright, ms)
        rows = []
        for label, (pd, pb, dd, db, ms) in values.items():
            for group, pg, de in (("all", (pd + pb) / 2, (dd + db) / 2), ("hypo", pd, dd),
                                  ("hyper", pb, db)):
                row = {"method": label, "kind": "variant", "group": group, "n": 10}
                for col, v in (("pointing_game", pg), ("deletion_auc", de), ("runtime_ms", ms)):
                    row.update({f"{col}_mean": v, f"{col}_ci_low": v, f"{col}_ci_high": v})
                rows.append(row)
        return SummaryTable(rows)

    a = table({"A": (90, 80, 0.2, 0.3, 50), "B": (50, 90, 0.5, 0.35, 10), "C": (90, 80, 0.2, 0.3, 20)})
    ranking = rank_variants([("m1", a), ("m2", a)])
    # A and C tie on every ranking (mean rank 1.75); C is faster, so C wins; B is last.
    assert [r["label"] for r in ranking] == ["C", "A", "B"]
    assert ranking[0]["mean_rank"] == pytest.approx(1.75)
    assert len(ranking[0]["ranks"]) == 8


def test_cli_evaluate_demo_model_on_two_volumes(tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out),
            "--n-volumes", "2", "--n-boot", "50", "--n-randomisation", "1",
            "--deletion-max", "0.01", "--deletion-step", "0.005", "--split", "validation",
            "--default-options", '{"layer_weighting": "uniform", "fusion": "multiplicative"}',
            "--methods", "default,icam[layercam|net|mult|bias0],input intensity (control)"]
    assert main(args) == 0
    folder = out / "demo-lesion-cnn"
    summary = list(csv.DictReader((folder / "summary.csv").open()))
    assert [r["method"] for r in summary][::3] == [
        "integrative (default)", "icam[layercam|net|mult|bias0]", "input intensity (control)"]
    assert [r["group"] for r in summary[:3]] == ["all", "hypo", "hyper"]
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["n_volumes"] == 2 and settings["n_by_polarity"] == {"hypo": 1, "hyper": 1}
    assert settings["deletion_fractions"] == [0.0, 0.005, 0.01]
    assert settings["model"]["weights_sha256"] and settings["data"]["split"] == "validation"
    default = next(m for m in settings["methods"] if m["label"] == "integrative (default)")
    assert default["options"] == {"layer_weighting": "uniform", "fusion": "multiplicative"}
    assert len(list(csv.DictReader((folder / "per_volume.csv").open()))) == 6
    # The run's summary ranks the one variant row; the ranking names each ranking.
    assert "Variants ranked" in (out / "summary.md").read_text()
    assert (out / "ranking.csv").read_text().splitlines()[1].startswith("1,")
    # Existing outputs are refused before any work, unless --overwrite.
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_cli_evaluate_default_row_without_options_uses_the_engine_default(tmp_path):
    # `make evaluate` names no --default-options: the table must still carry the default row,
    # with the engine's current defaults written out option by option.
    from icam_med.cam import IntegrativeCAM

    out = tmp_path / "eval"
    assert main(["evaluate", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(out),
                 "--n-volumes", "2", "--n-boot", "20", "--no-randomisation",
                 "--deletion-max", "0.005", "--deletion-step", "0.005", "--split", "validation",
                 "--methods", "default"]) == 0
    settings = json.loads((out / "demo-lesion-cnn" / "settings.json").read_text())
    assert [m["label"] for m in settings["methods"]] == ["integrative (default)"]
    assert settings["methods"][0]["options"] == {
        "target_layers": "stages",
        "activation_term": IntegrativeCAM.default_activation_term,
        "layer_weighting": IntegrativeCAM.default_layer_weighting,
        "fusion": IntegrativeCAM.default_fusion,
        "bias_weight": IntegrativeCAM.default_bias_weight}


def test_cli_evaluate_rejects_unknown_rows_and_retired_options(tmp_path, capsys):
    cfg = str(REPO / "configs" / "demo.yaml")
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--methods", "variants,nope",
                 "--config", cfg]) == 2
    assert "unknown row" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--steps", "4", "--config", cfg]) == 2
    err = capsys.readouterr().err
    assert "--steps was retired" in err and "--deletion-step" in err
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--default-options", "[1]",
                 "--config", cfg]) == 2
    assert "JSON object" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_single_layer_rows_hook_exactly_their_layer():
    """LesionNet's last stage is the module 'stages', also a preset name: the row must hook
    that one module, not the multi-layer preset."""
    from icam_med.cam import make_cam

    model = _model()
    rows = [r for r in method_rows(model, (24, 24, 24)) if " @ " in r.label]
    assert {r.label.split(" @ ")[1] for r in rows} == {"stem", "stages.0", "stages"}
    for row in rows:
        layer = row.label.split(" @ ")[1]
        cam = make_cam(row.method, model, **row.options)
        assert cam.layer_names((24, 24, 24)) == [layer]
