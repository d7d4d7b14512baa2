"""The demo model's training script: a two-step smoke run, determinism, and the synthesizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from icam_med.config import load_config
from icam_med.evaluation.synthetic import LesionSynthesizer, input_space_synthesizer, normalise
from icam_med.models import load_model
from icam_med.networks import LesionNet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_script(repo_script):
    return repo_script("train_demo_model")


def test_two_training_steps_write_loadable_deterministic_weights(train_script, tmp_path):
    cfg_path = REPO / "configs" / "demo.yaml"
    runs = []
    for name in ("a", "b"):
        report = train_script.train(cfg_path, tmp_path / name, steps=2, batch_size=2,
                                    n_validation=2, n_test=2, threads=1)
        runs.append(report)
        weights = tmp_path / name / train_script.WEIGHTS_NAME
        assert weights.is_file()
        saved = json.loads((tmp_path / name / train_script.REPORT_NAME).read_text())
        assert saved["steps"] == 2 and saved["weights_sha256"] == report["weights_sha256"]
        assert 0.0 <= saved["test"]["accuracy"] <= 1.0
    # Same seed, same data order: bit-identical weights.
    assert runs[0]["weights_sha256"] == runs[1]["weights_sha256"]
    # The weights load through the project's hash-checked loader with the demo config.
    cfg = load_config(cfg_path)
    from dataclasses import replace

    model_cfg = replace(cfg.model, weights=tmp_path / "a" / train_script.WEIGHTS_NAME,
                        weights_sha256=runs[0]["weights_sha256"])
    model, info = load_model(model_cfg)
    assert info.n_parameters == runs[0]["n_parameters"]
    out = model(torch.zeros(1, 1, *cfg.model.spatial_size))
    assert out.shape == (1, 2)
    # Refuses to overwrite without being asked.
    with pytest.raises(FileExistsError):
        train_script.train(cfg_path, tmp_path / "a", steps=1, batch_size=2, n_validation=2,
                           n_test=2, threads=1)


def test_update_config_sha_is_a_targeted_edit(train_script, tmp_path):
    cfg = tmp_path / "demo.yaml"
    text = (REPO / "configs" / "demo.yaml").read_text()
    cfg.write_text(text)
    train_script.update_config_sha(cfg, "ab" * 32)
    new = cfg.read_text()
    assert load_config(cfg).model.weights_sha256 == "ab" * 32
    assert len(new.splitlines()) == len(text.splitlines())


def test_lesionnet_2d_and_3d_shapes_and_biases():
    for dims, shape in ((2, (2, 1, 32, 28)), (3, (2, 1, 16, 20, 12))):
        net = LesionNet(spatial_dims=dims, channels=(4, 8, 8))
        assert net(torch.zeros(shape)).shape == (2, 2)
        convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        assert convs and all(c.bias is not None for c in convs)
    with pytest.raises(ValueError, match="expects input"):
        LesionNet(spatial_dims=3)(torch.zeros(1, 1, 8, 8))


def test_synthesizer_is_deterministic_and_splits_differ():
    rng = np.random.default_rng(0)
    template = np.zeros((24, 24, 24), np.float32)
    template[4:20, 4:20, 4:20] = 100 + 10 * rng.standard_normal((16, 16, 16)).astype(np.float32)
    synth = LesionSynthesizer(template, template > 0, (2.0, 2.0, 2.0), seed=3, max_shift_mm=2,
                              radius_mm=(3.0, 5.0))
    a, b = synth(5, label=1), synth(5, label=1)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.label == 1 and a.mask.any()
    # The lesion is brighter than the same volume without it.
    assert a.image[a.mask].mean() > template[template > 0].mean()
    c = synth(5, split="test", label=1)
    assert not np.array_equal(a.image, c.image)
    healthy = synth(6, label=0)
    assert healthy.label == 0 and not healthy.mask.any()
    assert json.dumps(a.params)  # JSON-serialisable description


def test_input_space_synthesizer_matches_the_config_input():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    synth, intensity = input_space_synthesizer(cfg.preprocessing, seed=0)
    assert synth.shape == tuple(cfg.model.spatial_size)
    assert [s["name"] for s in intensity] == ["NormalizeIntensityd"]
    vol = synth(1, split="test", label=1)
    x = normalise(vol.image, intensity)
    assert x.shape == (1, *cfg.model.spatial_size)
    brain = vol.image != 0
    assert abs(float(x[0][brain].mean())) < 1e-3 and abs(float(x[0][brain].std()) - 1) < 1e-2
