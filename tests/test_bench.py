"""The benchmark command runs and reports what it claims (figures themselves are not tested)."""

from __future__ import annotations

import math

import pytest

from icam_med import cli
from icam_med.commands import bench as bench_command
from icam_med.evaluation.bench import (
    NETWORKS,
    _memory_in_subprocess,
    format_table,
    run_benchmark,
)


def test_benchmark_rows_are_relative_to_forward_backward():
    rows = run_benchmark(["densenet121-2d"], repeats=1, memory=False,
                         cases=["fwd+bwd", "integrative/stages", "monai-gradcam"])
    assert [r.case for r in rows] == ["fwd+bwd", "integrative/stages", "monai-gradcam"]
    assert rows[0].ratio == 1.0
    for r in rows:
        assert r.median_s > 0 and math.isfinite(r.ratio) and 0 < r.best_s <= r.median_s
        assert math.isclose(r.ratio, r.median_s / rows[0].median_s)
    table = format_table(rows)
    assert "| densenet121-2d | integrative/stages |" in table


def test_zoo_networks_torchcam_peer_and_costly_variants_run():
    cases = ["fwd+bwd", "torchcam-layercam/stages", "layercam/stages", "monai-gradcam",
             "integrative+counterfactual/stages", "layercam+multiplicative/stages"]
    rows = run_benchmark(["resnet18-3d", "unet-3d"], repeats=1, memory=False, cases=cases, size=32)
    by_net = {}
    for r in rows:
        by_net.setdefault(r.network, []).append(r.case)
        assert r.median_s > 0 and math.isfinite(r.ratio)
    assert by_net["resnet18-3d"] == cases
    # MONAI's Grad-CAM scores class logits: it does not apply to a segmentation output
    assert by_net["unet-3d"] == [c for c in cases if c != "monai-gradcam"]
    table = format_table(rows)
    assert "| unet-3d | torchcam-layercam/stages |" in table
    assert "| resnet18-3d | integrative+counterfactual/stages |" in table


def test_memory_measurement_sees_the_case_allocate():
    # a training-style step on DenseNet121-2D allocates tens of MB above the loaded model
    # (in a fresh process with glibc returning large blocks, as the command does)
    peak = _memory_in_subprocess("densenet121-2d", "fwd+bwd", "cpu", 1)
    assert peak is not None and peak > 10


def test_bench_cli_refuses_unknown_case(capsys):
    assert cli.main(["bench", "--case", "scorecam/all"]) == 2
    assert "unknown --case" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--network", "resnet"])
    assert list(NETWORKS) == bench_command._NETWORKS  # the CLI lists every bench network
