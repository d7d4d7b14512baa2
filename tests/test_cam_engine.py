"""Engine behaviour a CAM user relies on: batches, model state, devices, shapes, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from icam_med.cam import (
    METHODS,
    GradCAM,
    IntegrativeCAM,
    SegmentationTarget,
    make_cam,
)
from icam_med.cam.layers import effective_bias


def _all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dims,spatial", [(2, (24, 20)), (3, (16, 12, 20))])
def test_batch_equals_single_runs(make_tiny, method, dims, spatial):
    model = make_tiny(dims=dims)
    x = torch.randn(3, 1, *spatial, generator=torch.Generator().manual_seed(7))
    targets = [0, 2, 1]  # a different class for each sample
    cam = make_cam(method, model)
    batch = cam(x, targets=targets)
    for i in range(3):
        single = cam(x[i : i + 1], targets=[targets[i]])
        torch.testing.assert_close(batch.fused[i : i + 1], single.fused, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(batch.scores[i : i + 1], single.scores)
        for name in batch.layer_maps:
            torch.testing.assert_close(batch.layer_maps[name][i : i + 1], single.layer_maps[name],
                                       atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.layer_weights[name][i : i + 1],
                                       single.layer_weights[name], atol=1e-6, rtol=1e-4)
    assert batch.fused.shape == (3, 1, *spatial)
    assert batch.fused.min() >= 0 and batch.fused.max() <= 1
    assert torch.equal(batch.target_classes, torch.tensor(targets))


@pytest.mark.parametrize("options", [
    {"layer_weighting": "net"},
    {"layer_weighting": "per_position"},
    {"layer_weighting": "counterfactual"},
    {"fusion": "multiplicative"},
    {"activation_term": "layercam", "fusion": "multiplicative", "layer_weighting": "counterfactual"},
])
def test_batch_equals_single_runs_for_every_weighting_and_fusion(make_tiny, options):
    model = make_tiny(dims=3, seed=1)
    x = torch.randn(3, 1, 16, 12, 20, generator=torch.Generator().manual_seed(9))
    targets = [0, 2, 1]
    cam = IntegrativeCAM(model, **options)
    batch = cam(x, targets=targets)
    for key, value in options.items():
        assert batch.options[key] == value
    for i in range(3):
        single = cam(x[i : i + 1], targets=[targets[i]])
        torch.testing.assert_close(batch.fused[i : i + 1], single.fused, atol=1e-5, rtol=1e-4)
        for name in batch.layer_maps:
            torch.testing.assert_close(batch.layer_weights[name][i : i + 1],
                                       single.layer_weights[name], atol=1e-5, rtol=1e-4)
    total = torch.stack(list(batch.layer_weights.values())).sum(0)
    torch.testing.assert_close(total, torch.ones(3))
    assert batch.fused.min() >= 0 and batch.fused.max() <= 1


def test_option_registries_are_exported_and_reach_make_cam(make_tiny):
    from icam_med.cam import ACTIVATION_TERMS, BIAS_MODES, FUSIONS, LAYER_WEIGHTINGS

    assert {"score", "net", "per_position", "counterfactual", "uniform", "softmax"} <= set(LAYER_WEIGHTINGS)
    assert set(FUSIONS) == {"weighted", "multiplicative"}
    assert {"gradcam++", "layercam"} <= set(ACTIVATION_TERMS)
    assert {"signed", "abs"} <= set(BIAS_MODES)
    assert all(isinstance(v, str) and v for v in (*LAYER_WEIGHTINGS.values(), *FUSIONS.values()))
    model = make_tiny(dims=2)
    x = torch.randn(1, 1, 16, 16)
    for weighting in LAYER_WEIGHTINGS:
        for fusion in FUSIONS:
            for term in ACTIVATION_TERMS:
                res = make_cam("integrative", model, layer_weighting=weighting, fusion=fusion,
                               activation_term=term)(x)
                assert (res.options["layer_weighting"], res.options["fusion"],
                        res.options["activation_term"]) == (weighting, fusion, term)
                assert torch.isfinite(res.fused).all()
    # the fusion and weighting are engine options: every method has them
    res = make_cam("layercam", model, fusion="multiplicative", layer_weighting="net")(x)
    assert res.options["fusion"] == "multiplicative" and res.options["layer_weighting"] == "net"


def test_model_state_restored_after_normal_and_failing_calls(make_tiny):
    model = make_tiny(dims=3)
    model.train()
    model.features[1].eval()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}
    model.fc.weight.requires_grad_(False)
    rg = {n: p.requires_grad for n, p in model.named_parameters()}
    state = copy.deepcopy(model.state_dict())
    cam = IntegrativeCAM(model)
    x = torch.randn(2, 1, 16, 16, 16)
    res = cam(x)
    assert res.fused.shape == (2, 1, 16, 16, 16)

    def boom(_out):
        raise RuntimeError("target failed")

    with pytest.raises(RuntimeError, match="target failed"):
        cam(x, targets=boom)
    assert _all_hooks(model) == 0
    assert {n: m.training for n, m in model.named_modules()} == flags
    assert {n: p.requires_grad for n, p in model.named_parameters()} == rg
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():  # BatchNorm statistics untouched (run in eval)
        assert torch.equal(v, state[k]), k


def test_costly_options_also_leave_the_model_as_it_was(make_tiny):
    model = make_tiny(dims=3, inplace=True)
    model.train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    for options in ({"bias_mode": "complete"}, {"layer_weighting": "counterfactual"},
                    {"alpha_fn": "softmax"}, {"fusion": "multiplicative", "target_layers": "all"}):
        res = IntegrativeCAM(model, **options)(x)
        assert torch.isfinite(res.fused).all(), options
        assert _all_hooks(model) == 0, options
        assert model.training and all(m.training for m in model.modules()), options
        assert all(p.grad is None for p in model.parameters()), options
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), (options, k)


def test_inplace_relu_model_gives_same_maps(make_tiny):
    plain = make_tiny(dims=3, inplace=False)
    inplace = make_tiny(dims=3, inplace=True)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    for method in ("integrative", "gradcam"):
        a = make_cam(method, plain, target_layers="all")(x)
        b = make_cam(method, inplace, target_layers="all")(x)
        assert list(a.layer_maps) == list(b.layer_maps)
        torch.testing.assert_close(a.fused, b.fused, atol=1e-5, rtol=1e-4)
    assert all(m.inplace for m in inplace.modules() if isinstance(m, nn.ReLU))


def test_engine_never_converts_to_numpy(make_tiny, monkeypatch):
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16)
    cam = IntegrativeCAM(model, target_layers="all")

    def forbidden(*_a, **_k):
        raise AssertionError("the engine converted a tensor to numpy")

    monkeypatch.setattr(torch.Tensor, "numpy", forbidden)
    monkeypatch.setattr(torch.Tensor, "__array__", forbidden)
    res = cam(x)
    assert res.fused.shape == (2, 1, 16, 16, 16)


def test_anisotropic_volume_keeps_exact_shape_and_axis_order(make_tiny):
    model = make_tiny(dims=3)
    x = torch.zeros(1, 1, 40, 96, 80)
    x[0, 0, 5:15, 60:90, 10:30] = 3.0  # bright block placed asymmetrically
    res = IntegrativeCAM(model)(x)
    assert res.fused.shape == (1, 1, 40, 96, 80)
    for name, m in res.layer_maps.items():
        assert m.ndim == 5 and m.shape[:2] == (1, 1), name
    # maps at native resolution shrink with the pooling, axis by axis
    shapes = [tuple(m.shape[2:]) for m in res.layer_maps.values()]
    assert shapes[0] == (40, 96, 80) and shapes[-1] == (10, 24, 20)


def test_stage_and_all_layer_presets(make_tiny):
    model = make_tiny(dims=3)
    cam = IntegrativeCAM(model)
    # the block output (after the activation) before each change of size; the last one is
    # the whole `features` block, whose output is its final ReLU's
    assert cam.layer_names((16, 16, 16)) == ["features.2", "features.6", "features"]
    all_cam = IntegrativeCAM(model, target_layers="all")
    # every block output: never a norm output that an activation reads next
    assert all_cam.layer_names((16, 16, 16)) == ["features.2", "features.6", "features"]
    last = GradCAM(model, target_layers="last")
    assert last.layer_names((16, 16, 16)) == ["features"]


def test_effective_bias_of_batchnorm_and_conv(make_tiny):
    model = make_tiny(dims=3)
    bn = model.features[1]
    expected = bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(effective_bias(bn), expected.detach())
    torch.testing.assert_close(effective_bias(model.features[0]), model.features[0].bias.detach())
    assert effective_bias(model.features[2]) is None  # ReLU carries no bias


def test_bias_term_vanishes_without_biases(make_tiny):
    model = make_tiny(dims=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv3d):
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm3d):
                m.bias.copy_(m.weight * m.running_mean / torch.sqrt(m.running_var + m.eps))
    x = torch.randn(2, 1, 16, 16, 16)
    with_bias = IntegrativeCAM(model, bias_weight=1.0)(x)
    without = IntegrativeCAM(model, bias_weight=0.0)(x)
    torch.testing.assert_close(with_bias.fused, without.fused, atol=1e-5, rtol=1e-4)
    # ...while with real biases the term changes the map
    other = make_tiny(dims=3)
    a = IntegrativeCAM(other, bias_weight=1.0)(x).fused
    b = IntegrativeCAM(other, bias_weight=0.0)(x).fused
    assert (a - b).abs().max() > 1e-3


def test_layer_weighting_modes(make_tiny):
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16)
    uni = IntegrativeCAM(model, layer_weighting="uniform")(x)
    for w in uni.layer_weights.values():
        torch.testing.assert_close(w, torch.full((2,), 1 / 3))
    sharp = IntegrativeCAM(model, layer_weighting="softmax", tau=0.05)(x)
    score = IntegrativeCAM(model, layer_weighting="score")(x)
    soft1 = IntegrativeCAM(model, layer_weighting="softmax", tau=1.0)(x)
    for k in score.layer_weights:  # softmax(log s / 1) == s / sum(s)
        torch.testing.assert_close(score.layer_weights[k], soft1.layer_weights[k])
    top = max(score.layer_weights, key=lambda k: float(score.layer_weights[k][0]))
    assert float(sharp.layer_weights[top][0]) > float(score.layer_weights[top][0])
    total = torch.stack(list(sharp.layer_weights.values())).sum(0)
    torch.testing.assert_close(total, torch.ones(2))


def test_zero_gradient_gives_zero_map_not_nan(make_tiny):
    model = make_tiny(dims=3)
    with torch.no_grad():
        model.fc.weight[1].zero_()  # class 1 no longer depends on the input ("dead" class)
    res = IntegrativeCAM(model)(torch.randn(2, 1, 16, 16, 16), targets=1)
    assert torch.isfinite(res.fused).all()
    assert res.fused.abs().max() == 0
    for name, m in res.layer_maps.items():
        assert torch.isfinite(m).all() and m.abs().max() == 0, name
    assert all(torch.isfinite(w).all() for w in res.layer_weights.values())


def test_segmentation_target_on_a_segmentation_output():
    torch.manual_seed(0)
    seg = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(),
                        nn.Conv3d(4, 2, 1)).eval()
    x = torch.randn(2, 1, 12, 12, 12)
    mask = torch.zeros(2, 12, 12, 12)
    mask[:, 2:6, 2:6, 2:6] = 1
    res = IntegrativeCAM(seg)(x, targets=SegmentationTarget(1, mask))
    out = seg(x)
    torch.testing.assert_close(res.scores, (out[:, 1] * mask).flatten(1).sum(1).detach())
    assert res.target_classes is None and res.fused.shape == (2, 1, 12, 12, 12)
    with pytest.raises(ValueError, match="predicted class of a classifier"):
        IntegrativeCAM(seg)(x)


class _Counter:
    def __init__(self, model: nn.Module) -> None:
        self.batches: list[int] = []
        model.register_forward_pre_hook(lambda _m, inp: self.batches.append(inp[0].shape[0]))


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(1, 16, 16, 16), r"4 dims\).*expects 5 dims \(N, C, D, H, W\).*x\[None\]"),
    (torch.zeros(2, 2, 16, 16, 16), r"2 channel\(s\).*expects 1"),
    (torch.full((2, 1, 16, 16, 16), float("nan")), "NaN or Inf"),
    ("not a tensor", "must be a torch.Tensor"),
])
def test_bad_input_is_refused_before_any_work(make_tiny, bad, match):
    model = make_tiny(dims=3)
    counter = _Counter(model)
    with pytest.raises(ValueError, match=match):
        IntegrativeCAM(model)(bad)
    assert counter.batches == []


def test_target_class_out_of_range_is_refused_before_the_explained_pass(make_tiny):
    model = make_tiny(dims=3, n_classes=3)
    counter = _Counter(model)
    with pytest.raises(ValueError, match=r"target class 5 is out of range.*3 classes.*0\.\.2"):
        IntegrativeCAM(model)(torch.zeros(4, 1, 16, 16, 16), targets=[0, 1, 5, 2])
    assert 4 not in counter.batches  # at most the one-sample shape probe ran
    with pytest.raises(ValueError, match="2 entries but the batch has 4"):
        IntegrativeCAM(model)(torch.zeros(4, 1, 16, 16, 16), targets=[0, 1])


def test_unknown_layer_lists_close_matches(make_tiny):
    with pytest.raises(ValueError, match=r"'features.10'.*Close matches: \['features.1'"):
        IntegrativeCAM(make_tiny(dims=3), target_layers=["features.10"])
    with pytest.raises(ValueError, match="no spatial feature map"):
        IntegrativeCAM(make_tiny(dims=3), target_layers="fc")(torch.zeros(1, 1, 16, 16, 16))


def test_model_without_spatial_layers_is_refused():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    with pytest.raises(ValueError, match="no convolution layer"):
        IntegrativeCAM(mlp)


def test_bad_options_are_refused(make_tiny):
    model = make_tiny(dims=2)
    with pytest.raises(ValueError, match="alpha_fn='cube'"):
        IntegrativeCAM(model, alpha_fn="cube")
    with pytest.raises(ValueError, match="layer_weighting='max'"):
        IntegrativeCAM(model, layer_weighting="max")
    # (scorecam became a method with issue 16: an unknown name is refused, naming the choices)
    with pytest.raises(ValueError, match=r"unknown CAM method 'ablationcam'.*scorecam"):
        make_cam("ablationcam", model)
    with pytest.raises(ValueError, match="invalid option"):
        make_cam("gradcam", model, alpha_fn="exp")
    with pytest.raises(ValueError, match="move the model first"):
        IntegrativeCAM(model, device="meta")
    with pytest.raises(ValueError, match=r"fusion='sum' is not supported.*multiplicative"):
        IntegrativeCAM(model, fusion="sum")
    with pytest.raises(ValueError, match=r"activation_term='scorecam'.*layercam"):
        IntegrativeCAM(model, activation_term="scorecam")
    with pytest.raises(ValueError, match=r"counterfactual_keep=1\.5 must be a fraction"):
        IntegrativeCAM(model, layer_weighting="counterfactual", counterfactual_keep=1.5)
    with pytest.raises(ValueError, match="invalid option"):
        make_cam("layercam", model, activation_term="layercam")


def test_options_are_recorded_and_json_serialisable(make_tiny):
    import json

    res = IntegrativeCAM(make_tiny(dims=3), alpha_fn="sigmoid", bias_mode="abs")(
        torch.randn(1, 1, 16, 16, 16))
    opts = json.loads(json.dumps(res.options))
    assert opts["method"] == "integrative" and opts["alpha_fn"] == "sigmoid"
    # the defaults chosen by the evaluation (docs/evaluation.md) are what the record names;
    # naming a bias mode turns the bias term on
    assert opts["bias_mode"] == "abs" and opts["bias_weight"] == 1.0
    assert opts["layer_weighting"] == "counterfactual" and opts["target_layers_spec"] == "stages"
    assert opts["target_layers"] == ["features.2", "features.6", "features"]
    assert opts["fusion"] == "multiplicative" and opts["activation_term"] == "layercam"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(make_tiny):  # pragma: no cover - runs where a GPU exists
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16)
    cpu = IntegrativeCAM(model)(x)
    gpu = IntegrativeCAM(copy.deepcopy(model).cuda())(x.cuda())
    assert gpu.fused.device.type == "cuda"
    torch.testing.assert_close(gpu.fused.cpu(), cpu.fused, atol=1e-4, rtol=1e-3)


def test_mixed_precision_forward_keeps_float32_reductions(make_tiny):
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16)
    ref = IntegrativeCAM(model)(x)
    amp = IntegrativeCAM(model, amp_dtype="bfloat16")(x)
    assert amp.fused.dtype == torch.float32 and amp.scores.dtype == torch.float32
    assert all(w.dtype == torch.float32 for w in amp.layer_weights.values())
    assert amp.options["amp_dtype"] == "bfloat16"
    # bfloat16 activations: same map up to low-precision noise
    corr = torch.corrcoef(torch.stack([ref.fused.flatten(), amp.fused.flatten()]))[0, 1]
    assert corr > 0.95
    with pytest.raises(ValueError, match="amp_dtype='int8'"):
        IntegrativeCAM(model, amp_dtype="int8")


def test_shared_module_called_twice_is_a_clear_error():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.fc = nn.Linear(1, 2)

        def forward(self, x):
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    model = Twice().eval()
    with pytest.raises(ValueError, match="runs more than once"):
        GradCAM(model, target_layers="conv")(torch.randn(1, 1, 8, 8))
    assert _all_hooks(model) == 0
