"""Each metric of icam_med.evaluation.metrics on hand-made cases whose answer is known (2D and 3D)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from icam_med.evaluation import metrics
from icam_med.evaluation.baselines import edge_map, polycam_fusion


def _blob_mask(shape: tuple[int, ...], centre: tuple[int, ...], radius: float) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    d2 = sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True))
    return d2 <= radius**2


def _perfect(mask: torch.Tensor) -> torch.Tensor:
    return mask.float()


def _inverted(mask: torch.Tensor) -> torch.Tensor:
    return (~mask).float()


def _uniform(mask: torch.Tensor) -> torch.Tensor:
    return torch.ones(mask.shape)


SHAPES = [(24, 20), (16, 14, 12)]


class LesionDetector(nn.Module):
    """A fixed "model" whose evidence is exactly the mean intensity inside a known mask.

    logit(present) = 20 * (mean of x over the mask - 0.5); logit(absent) = 0. Whatever is
    outside the mask cannot change its output, so the faithfulness metrics have a known
    answer: removing the mask's voxels first is the fastest way to kill the score.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.float())
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x[:, 0] * self.mask).flatten(1).sum(1) / self.mask.sum()
        present = self.scale * (inside - 0.5)
        return torch.stack([torch.zeros_like(present), present], dim=1)


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_pointing_game_perfect_inverted_uniform(shape):
    mask = _blob_mask(shape, tuple(n // 2 for n in shape), 3)
    assert metrics.pointing_game(_perfect(mask), mask) == 1.0
    assert metrics.pointing_game(_inverted(mask), mask) == 0.0
    # A constant map's peak is everywhere: not on target unless the mask covers the image.
    assert metrics.pointing_game(_uniform(mask), mask) == 0.0
    assert metrics.pointing_game(_uniform(mask), torch.ones(shape, dtype=torch.bool)) == 1.0


def test_pointing_game_tolerance_is_in_millimetres():
    shape = (20, 20, 20)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[10, 10, 10] = True
    sal = torch.zeros(shape)
    sal[10, 10, 13] = 1.0  # 3 voxels away along the last axis
    assert metrics.pointing_game(sal, mask, spacing=(1, 1, 1), tolerance_mm=2.0) == 0.0
    assert metrics.pointing_game(sal, mask, spacing=(1, 1, 1), tolerance_mm=3.0) == 1.0
    # Anisotropic voxels: 3 voxels of 2 mm are 6 mm.
    assert metrics.pointing_game(sal, mask, spacing=(1, 1, 2), tolerance_mm=5.0) == 0.0
    assert metrics.pointing_game(sal, mask, spacing=(1, 1, 2), tolerance_mm=6.0) == 1.0


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_energy_inside_mask_known_values(shape):
    mask = _blob_mask(shape, tuple(n // 2 for n in shape), 3)
    assert metrics.energy_inside_mask(_perfect(mask), mask) == pytest.approx(1.0)
    assert metrics.energy_inside_mask(_inverted(mask), mask) == pytest.approx(0.0)
    # Uniform map: the mask's share of the image.
    share = float(mask.float().mean())
    assert metrics.energy_inside_mask(_uniform(mask), mask) == pytest.approx(share)
    assert metrics.energy_inside_mask(torch.zeros(shape), mask) == 0.0


def test_metrics_refuse_mismatched_shapes_and_empty_masks():
    with pytest.raises(ValueError, match="same grid"):
        metrics.energy_inside_mask(torch.ones(4, 4), torch.ones(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask is empty"):
        metrics.pointing_game(torch.ones(4, 4), torch.zeros(4, 4, dtype=torch.bool))


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_deletion_and_insertion_rank_perfect_uniform_inverted(shape):
    mask = _blob_mask(shape, tuple(n // 2 for n in shape), 3)
    model = LesionDetector(mask).eval()
    x = torch.ones(1, *shape)  # the "lesion" (mean 1 inside the mask) is clearly present
    base = metrics.constant_baseline(x, 0.0)
    fr = np.linspace(0, 1, 21)
    auc = {}
    for name, sal in (("perfect", _perfect(mask)), ("uniform", _uniform(mask)),
                      ("inverted", _inverted(mask))):
        f, d = metrics.perturbation_curve(model, x, sal, 1, mode="deletion", baseline=base,
                                          fractions=fr)
        _, i = metrics.perturbation_curve(model, x, sal, 1, mode="insertion", baseline=base,
                                          fractions=fr)
        # The curves start at the original / the baseline and end at the other.
        assert d[0] == pytest.approx(i[-1]) and d[-1] == pytest.approx(i[0])
        auc[name] = (metrics.area_under_curve(f, d), metrics.area_under_curve(f, i))
    share = float(mask.float().mean())
    # Perfect: the score collapses once the mask's share is removed; inverted: only at the end.
    assert auc["perfect"][0] < share + 0.06
    assert auc["inverted"][0] > 1 - share - 0.06
    assert auc["perfect"][0] < auc["uniform"][0] < auc["inverted"][0]
    assert auc["perfect"][1] > auc["uniform"][1] > auc["inverted"][1]
    assert auc["perfect"][1] > 1 - share - 0.06


def test_area_under_curve_trapezoid_on_uneven_steps():
    assert metrics.area_under_curve([0, 0.1, 1.0], [1, 1, 1]) == pytest.approx(1.0)
    assert metrics.area_under_curve([0, 0.5, 1.0], [1, 0, 0]) == pytest.approx(0.25)
    assert metrics.area_under_curve([0, 1.0], [0, 1]) == pytest.approx(0.5)


def test_perturbation_curve_only_touches_the_domain():
    shape = (12, 12)
    mask = _blob_mask(shape, (6, 6), 2)
    model = LesionDetector(mask).eval()
    x = torch.ones(1, *shape)
    # Domain = outside the lesion: deleting all of it never changes the score.
    _, d = metrics.perturbation_curve(model, x, _uniform(mask), 1, mode="deletion",
                                      baseline=torch.zeros_like(x), domain=~mask)
    assert np.allclose(d, d[0])


def test_saliency_order_breaks_ties_reproducibly_at_random():
    s = torch.zeros(100)
    a = metrics.saliency_order(s, seed=1)
    b = metrics.saliency_order(s, seed=1)
    c = metrics.saliency_order(s, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, torch.arange(100))  # not a raster scan
    s[37] = 1.0
    assert int(metrics.saliency_order(s, seed=1)[0]) == 37


@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "3d"])
def test_confidence_change_perfect_uniform_inverted(shape):
    mask = _blob_mask(shape, tuple(n // 2 for n in shape), 3)
    model = LesionDetector(mask).eval()
    x = torch.ones(1, *shape)
    base = torch.zeros_like(x)
    drop_perfect, _ = metrics.confidence_change(model, x, _perfect(mask), 1, baseline=base)
    drop_uniform, _ = metrics.confidence_change(model, x, _uniform(mask), 1, baseline=base)
    drop_inverted, inc_inverted = metrics.confidence_change(model, x, _inverted(mask), 1,
                                                            baseline=base)
    assert drop_perfect == pytest.approx(0.0, abs=1e-9)
    assert drop_uniform == pytest.approx(0.0, abs=1e-9)  # a uniform map keeps the whole image
    # Inverted: the lesion is gone, the probability falls from sigmoid(10) to sigmoid(-10).
    p_full, p_none = torch.sigmoid(torch.tensor(10.0)), torch.sigmoid(torch.tensor(-10.0))
    assert drop_inverted == pytest.approx(float((p_full - p_none) / p_full), rel=1e-4)
    assert inc_inverted == 0.0
    # Increase: counted when the explanation image scores higher than the input. Here the
    # map hides the (faint) lesion and the baseline is brighter there, so the score rises.
    x_dim = torch.full((1, *shape), 0.6)
    drop, inc = metrics.confidence_change(model, x_dim, _inverted(mask), 1,
                                          baseline=torch.full_like(x_dim, 2.0))
    assert inc == 1.0 and drop == 0.0


def test_blurred_baseline_preserves_constants_and_smooths_2d_3d():
    x2 = torch.zeros(1, 21, 21)
    x2[0, 10, 10] = 1.0
    b2 = metrics.blurred_baseline(x2, 2.0)
    assert b2.shape == x2.shape
    assert float(b2.sum()) == pytest.approx(1.0, rel=1e-4)
    assert float(b2.max()) < 0.1
    x3 = torch.full((2, 9, 9, 9), 3.0)
    b3 = metrics.blurred_baseline(x3, [1.0, 0.0, 1.0])
    assert torch.allclose(b3[:, 3:6, 3:6, 3:6], x3[:, 3:6, 3:6, 3:6])


def test_rank_correlation_identity_inversion_and_constant():
    a = torch.rand(6, 7, 8, generator=torch.Generator().manual_seed(0))
    assert metrics.rank_correlation(a, a) == pytest.approx(1.0)
    assert metrics.rank_correlation(a, -a) == pytest.approx(-1.0)
    assert metrics.rank_correlation(a, 2 * a + 1) == pytest.approx(1.0)  # ranks only
    assert metrics.rank_correlation(a, torch.zeros_like(a)) == 0.0


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                                      nn.Conv3d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def test_randomize_parameters_changes_a_copy_only():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rand = metrics.randomize_parameters(model, seed=3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    w0 = model.features[0].weight
    assert not torch.equal(rand.features[0].weight, w0)
    again = metrics.randomize_parameters(model, seed=3)
    assert torch.equal(again.features[0].weight, rand.features[0].weight)
    assert not rand.training


def test_randomisation_check_flags_an_edge_detector_and_passes_a_model_dependent_map():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.zeros(1, 12, 12, 12)
    x[0, 3:9, 3:9, 3:9] = 1.0
    x += 0.05 * torch.randn_like(x)

    def edges(m: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        return edge_map(m, inp.unsqueeze(0))[0, 0]

    flagged = metrics.randomisation_check(edges, model, x, seed=1)
    assert flagged["flagged"] and flagged["rank_correlation"] == pytest.approx(1.0)

    def first_layer_response(m: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        # Depends on the weights: the first conv's channel-0 response.
        return m.features[0](inp.unsqueeze(0))[0, 0].detach().abs()

    passed = metrics.randomisation_check(first_layer_response, model, x, seed=1)
    assert not passed["flagged"]
    assert passed["rank_correlation"] < 0.5


def test_bootstrap_ci_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.normal(1.0, 1.0, size=20)
    large = rng.normal(1.0, 1.0, size=2000)
    m, lo, hi = metrics.bootstrap_ci(small, seed=0)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = metrics.bootstrap_ci(large, seed=0)
    assert (hi2 - lo2) < (hi - lo)
    assert lo2 < 1.0 < hi2
    assert metrics.bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
    assert all(np.isnan(v) for v in metrics.bootstrap_ci([float("nan")]))


# ----------------------------------------------------------------------------- issue 11 metrics


def _twin_case(shape=(12, 12, 12)):
    """A lesion volume, its healthy twin (bright lesion removed) and a model reading the lesion."""
    torch.manual_seed(0)
    mask = _blob_mask(shape, tuple(n // 2 for n in shape), 2)
    twin = torch.full((1, *shape), 0.2) + 0.01 * torch.randn(1, *shape)
    x = torch.where(mask, torch.tensor(1.0), twin)
    return x, twin, mask, LesionDetector(mask).eval()


def test_counterfactual_deletion_orders_oracle_random_anti_oracle():
    x, twin, mask, model = _twin_case()
    fractions = metrics.deletion_fractions(0.2, 0.02)
    oracle = mask.float()
    anti = (~mask).float()
    random_map = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1))
    aucs = {}
    for name, sal in (("oracle", oracle), ("random", random_map), ("anti", anti)):
        fr, curve, auc = metrics.counterfactual_deletion(model, x[0:1], twin[0:1], sal, 1,
                                                         fractions=fractions)
        assert curve.shape == fr.shape and curve[0] == pytest.approx(curve.max())
        aucs[name] = auc
    assert aucs["oracle"] < aucs["random"] < aucs["anti"]
    # The anti-oracle never touches the lesion within 20 % of the volume: no change at all.
    p0 = torch.softmax(model(x[None]), 1)[0, 1].item()
    assert aucs["anti"] == pytest.approx(p0)
    # Removing the whole lesion gives the twin's score: the oracle ends there.
    _, curve, _ = metrics.counterfactual_deletion(model, x, twin, oracle, 1, fractions=fractions)
    p_twin = torch.softmax(model(twin[None]), 1)[0, 1].item()
    assert curve[-1] == pytest.approx(p_twin)


def test_counterfactual_deletion_refuses_bad_inputs():
    x, twin, mask, model = _twin_case()
    with pytest.raises(ValueError, match="twin shape"):
        metrics.counterfactual_deletion(model, x, twin[:, :6], mask.float(), 1)
    with pytest.raises(ValueError, match="fractions"):
        metrics.counterfactual_deletion(model, x, twin, mask.float(), 1, fractions=(0.1, 0.2))
    with pytest.raises(ValueError, match="step"):
        metrics.deletion_fractions(0.01, 0.05)
    assert metrics.deletion_fractions(0.05, 0.0025)[-1] == pytest.approx(0.05)
    assert len(metrics.deletion_fractions(0.05, 0.0025)) == 21


def test_distractor_hit_peak_on_the_distractor_only():
    shape = (16, 16, 16)
    distractor = _blob_mask(shape, (3, 3, 3), 1.5)
    on = distractor.float()
    off = _blob_mask(shape, (12, 12, 12), 2).float()
    assert metrics.distractor_hit(on, distractor) == 1.0
    assert metrics.distractor_hit(off, distractor) == 0.0
    # Within the tolerance counts: a peak one voxel beside the distractor (1 mm spacing).
    beside = torch.zeros(shape)
    beside[3, 3, 6] = 1.0
    assert metrics.distractor_hit(beside, distractor) == 0.0
    assert metrics.distractor_hit(beside, distractor, (1.0, 1.0, 1.0), tolerance_mm=2.0) == 1.0
    assert np.isnan(metrics.distractor_hit(on, torch.zeros(shape, dtype=torch.bool)))


def test_cascading_randomisation_goes_top_down_and_leaves_the_model():
    from icam_med.networks import LesionNet

    torch.manual_seed(0)
    model = LesionNet(spatial_dims=3, channels=(4, 8, 8, 8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    groups = metrics.cascade_groups(model)
    assert [g[0] for g in groups] == ["head", "stages.2", "stages.1", "stages.0", "stem"]
    cascade = metrics.cascading_randomisation(model, seed=1)
    assert [label for label, _ in cascade] == [g[0] for g in groups]
    order = ["head", "stages.2", "stages.1", "stages.0", "stem"]
    for depth, (_, copy_) in enumerate(cascade):
        state = copy_.state_dict()
        for block_index, block in enumerate(order):
            keys = [k for k in state if k.startswith(block + ".") and "num_batches" not in k]
            changed = any(not torch.equal(state[k], before[k]) for k in keys)
            # Blocks above and at this depth are re-initialised, the ones below are not.
            assert changed == (block_index <= depth), (depth, block)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = metrics.cascading_randomisation(model, seed=1)
    assert torch.equal(again[2][1].stages[1][0].conv.weight, cascade[2][1].stages[1][0].conv.weight)


def test_cascade_groups_of_a_monai_resnet():
    from monai.networks.nets import resnet10

    model = resnet10(spatial_dims=3, n_input_channels=1, num_classes=2, widen_factor=0.25)
    labels = [g[0] for g in metrics.cascade_groups(model)]
    assert labels == ["fc", "layer4", "layer3", "layer2", "layer1", "stem"]


def test_polycam_fusion_gates_fine_maps_with_coarse_ones():
    fine = torch.zeros(1, 1, 8, 8)
    fine[0, 0, 1, 1] = 1.0  # a fine detail where the coarse map says nothing
    fine[0, 0, 6, 6] = 0.5  # a weaker one inside the coarse map's region
    coarse = torch.zeros(1, 1, 2, 2)
    coarse[0, 0, 1, 1] = 1.0
    fused = polycam_fusion({"fine": fine, "coarse": coarse}, (8, 8))
    assert fused.shape == (1, 1, 8, 8)
    assert fused[0, 0, 6, 6] == pytest.approx(1.0) and fused[0, 0, 1, 1] == pytest.approx(0.0)
