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


# ----------------------------------------------------------------------------- issue 11 benchmark


@pytest.fixture(scope="module")
def eval_synth():
    from icam_med.evaluation.synthetic import EvalSynthesizer

    cfg = load_config(REPO / "configs" / "eval_lesionnet.yaml")
    synth, intensity = input_space_synthesizer(cfg.preprocessing, seed=0,
                                               synthesizer=EvalSynthesizer)
    return synth, intensity


def test_eval_generator_draws_both_polarities_one_or_two_lesions(eval_synth):
    synth, _ = eval_synth
    vols = [synth(i, split="validation", label=1, with_twin=False) for i in range(40)]
    polarities = [v.polarity for v in vols]
    assert 12 <= polarities.count("hypo") <= 28 and polarities.count("hyper") == 40 - polarities.count("hypo")
    assert {v.n_lesions for v in vols} == {1, 2}
    brain_mean = synth.template[synth.brain_mask].mean()
    for v in vols[:12]:
        inside = v.image[v.mask].mean()
        # Dark lesions are darker than the brain, bright ones brighter.
        assert (inside < brain_mean) if v.polarity == "hypo" else (inside > brain_mean)
    # Forcing the polarity flips the lesion only; the label may be forced too.
    a = synth(3, split="validation", label=1, polarity="hypo")
    b = synth(3, split="validation", label=1, polarity="hyper")
    assert np.array_equal(a.mask, b.mask) and np.array_equal(a.twin, b.twin)
    assert a.image[a.mask].mean() < a.twin[a.mask].mean() < b.image[b.mask].mean()
    with pytest.raises(ValueError, match="polarity"):
        synth(0, polarity="grey")


def test_eval_twin_differs_only_at_the_lesion(eval_synth):
    from scipy import ndimage

    synth, _ = eval_synth
    for i in range(6):
        v = synth(i, split="test", label=1)
        diff = v.image != v.twin
        assert diff[v.mask].mean() > 0.9  # the lesion itself changed
        # Nothing changes beyond the lesion's soft rim and the blur's reach (5 voxels).
        assert not (diff & ~ndimage.binary_dilation(v.mask, iterations=5)).any()
        assert np.abs(v.image - v.twin)[v.mask].sum() > 0.6 * np.abs(v.image - v.twin).sum()
        healthy = synth(i, split="test", label=0)
        assert healthy.label == 0 and not healthy.mask.any()
        assert np.array_equal(healthy.image, v.twin)  # the twin is the healthy volume


def test_eval_distractors_lie_outside_the_brain_and_ignore_the_label(eval_synth):
    from scipy import ndimage

    synth, _ = eval_synth
    near_brain = ndimage.binary_dilation(synth.brain_mask, iterations=1)
    counts = []
    for i in range(10):
        with_lesion = synth(i, split="train", label=1, with_twin=False)
        without = synth(i, split="train", label=0, with_twin=False)
        assert with_lesion.distractor_mask.any()
        assert not (with_lesion.distractor_mask & near_brain).any()
        # Same distractors whatever the label (their own random stream).
        assert np.array_equal(with_lesion.distractor_mask, without.distractor_mask)
        assert with_lesion.params["distractors"] == without.params["distractors"]
        # As bright as a bright lesion: above the brain's mean by >= 2 SD at their centre.
        assert with_lesion.image[with_lesion.distractor_mask].max() > \
            synth.brain_mean + 2 * synth.brain_sd
        counts.append(len(with_lesion.params["distractors"]))
    assert set(counts) == {1, 2}


def test_eval_splits_are_disjoint_streams(eval_synth):
    synth, _ = eval_synth
    a = synth(7, split="train", label=1, with_twin=False)
    b = synth(7, split="validation", label=1, with_twin=False)
    c = synth(7, split="test", label=1, with_twin=False)
    assert not np.array_equal(a.image, b.image) and not np.array_equal(b.image, c.image)
    again = synth(7, split="test", label=1, with_twin=False)
    assert np.array_equal(c.image, again.image)


def test_fast_normalise_and_twin_normalisation_match_monai(eval_synth):
    from icam_med.evaluation.synthetic import normalise_with_twin
    from icam_med.evaluation.training import fast_normalise

    synth, intensity = eval_synth
    v = synth(2, split="test", label=1)
    monai_x = normalise(v.image, intensity)
    np.testing.assert_allclose(fast_normalise(v.image, intensity), monai_x, atol=1e-5)
    x, twin = normalise_with_twin(v.image, v.twin, intensity)
    assert np.array_equal(x, monai_x)
    # Where the raw volumes agree, the normalised ones are identical (shared statistics).
    assert not ((x != twin)[0] & (v.image == v.twin)).any()
    assert (x != twin)[0][v.mask].all()


def test_eval_training_two_steps_is_deterministic(repo_script, tmp_path):
    script = repo_script("train_eval_models")
    cfg = REPO / "configs" / "eval_resnet.yaml"
    reports = [script.train(cfg, tmp_path / n, steps=2, batch_size=2, n_validation=4, n_test=4,
                            recalibration_batches=1) for n in ("a", "b")]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]
    test = reports[0]["test"]
    assert test["n_hypo"] == 1 and test["n_hyper"] == 1
    assert set(test) >= {"accuracy", "sensitivity_hypo", "sensitivity_hyper", "specificity"}
    with pytest.raises(FileExistsError):
        script.train(cfg, tmp_path / "a", steps=1, batch_size=2)
