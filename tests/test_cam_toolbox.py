"""The rest of the CAM toolbox (issue 16): SmoothGrad, vanilla gradient, guided backprop,
Guided Grad-CAM and Score-CAM on the engine: reference tests against MONAI's
``monai.visualize`` in 3D, the model left exactly as found, Score-CAM's chunked forwards, and
the methods through ``icam-med explain`` into a valid audit record."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import nibabel as nib
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet, resnet10
from monai.visualize import GuidedBackpropGrad, SmoothGrad, VanillaGrad
from torch import nn

from icam_med.cam import METHODS, SegmentationTarget, make_cam, minmax_normalize

ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
NEW = ("scorecam", "gradient", "guided-backprop", "guided-gradcam", "smoothgrad")


def _densenet() -> nn.Module:
    torch.manual_seed(0)
    return DenseNet(spatial_dims=3, in_channels=1, out_channels=2, init_features=8,
                    growth_rate=4, block_config=(2, 2)).eval()


def _resnet() -> nn.Module:
    torch.manual_seed(1)
    return resnet10(spatial_dims=3, n_input_channels=1, num_classes=2).eval()


def _volume(seed: int = 0, n: int = 1, size: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, size, generator=g)


def _norm_abs(t: torch.Tensor) -> torch.Tensor:
    return minmax_normalize(t.abs().amax(1, keepdim=True).float())


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": {n: m.training for n, m in model.named_modules()},
        "inplace": {n: getattr(m, "inplace", None) for n, m in model.named_modules()},
        "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                      len(getattr(m, "_backward_pre_hooks", {})))
                  for n, m in model.named_modules()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def _assert_untouched(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    for key in ("training", "inplace", "hooks", "types", "requires_grad"):
        assert before[key] == after[key], key
    assert all(g is None for g in after["grads"])


# ------------------------------------------------------------------ reference tests vs MONAI


def _monai_guided(model: nn.Module, x: torch.Tensor, index: int, relu_name: str) -> torch.Tensor:
    """MONAI's guided backprop. ``GuidedBackpropGrad`` swaps the modules whose *name*
    contains "relu" for its guided ReLU: MONAI's own ResNet names them ``act``, so there it
    guides nothing. For such a network the same swap is made on the right name."""
    monai_model = copy.deepcopy(model)  # MONAI swaps modules and flips in-place flags
    if relu_name == "relu":
        return GuidedBackpropGrad(monai_model)(x.clone(), index=index)
    from monai.networks.utils import replace_modules_temp
    from monai.visualize.gradient_based import _GradReLU

    with replace_modules_temp(monai_model, relu_name, _GradReLU(), strict_match=False):
        return VanillaGrad(monai_model)(x.clone(), index=index)


@pytest.mark.parametrize(("build", "relu_name"), [(_densenet, "relu"), (_resnet, "act")],
                         ids=["densenet", "resnet"])
def test_guided_backprop_equals_monai_guided_backprop_grad_3d(build, relu_name):
    model = build()
    x = _volume(3)
    ours = make_cam("guided-backprop", model)(x, targets=1)
    ref = _monai_guided(model, x, 1, relu_name)
    assert ref.shape == x.shape
    torch.testing.assert_close(ours.fused, _norm_abs(ref), atol=1e-5, rtol=1e-4)
    # the guided rule is really applied: the plain gradient is a different map, and equals
    # MONAI's VanillaGrad
    plain = make_cam("gradient", model)(x, targets=1)
    vanilla = VanillaGrad(copy.deepcopy(model))(x.clone(), index=1)
    torch.testing.assert_close(plain.fused, _norm_abs(vanilla), atol=1e-5, rtol=1e-4)
    assert (plain.fused - ours.fused).abs().max() > 0.05


@pytest.mark.parametrize(("aggregate", "magnitude"), [("mean", False), ("rms", True)])
def test_smoothgrad_of_the_gradient_equals_monai_smoothgrad_3d(aggregate, magnitude):
    model = _densenet()
    x = _volume(4) * 3 + 1
    n, sigma, seed = 7, 0.2, 11
    torch.manual_seed(seed)  # MONAI draws from the global generator, copy after copy
    ref = SmoothGrad(copy.deepcopy(model), stdev_spread=sigma, n_samples=n, magnitude=magnitude,
                     verbose=False)(x.clone(), index=0)
    ours = make_cam("smoothgrad", model, base="gradient", n_samples=n, sigma=sigma, seed=seed,
                    chunk=3, aggregate=aggregate)(x, targets=0)
    torch.testing.assert_close(ours.fused, _norm_abs(ref), atol=2e-4, rtol=1e-3)
    # the noise matters: the plain gradient is a different map
    plain = make_cam("gradient", model)(x, targets=0)
    assert (plain.fused - ours.fused).abs().max() > 0.05


# ------------------------------------------------------------------ SmoothGrad around the engine


def test_smoothgrad_runs_one_pass_per_chunk_and_does_not_depend_on_the_chunk(tiny3d):
    x = _volume(5, n=2, size=16)
    cam3 = make_cam("smoothgrad", tiny3d, base="gradient", n_samples=7, chunk=3)
    cam1 = make_cam("smoothgrad", tiny3d, base="gradient", n_samples=7, chunk=1)
    for cam in (cam3, cam1):  # the engine's one-off probe of a new input shape
        cam.layer_names(x.shape[2:])
    sizes: list[int] = []
    h = tiny3d.register_forward_pre_hook(lambda _m, inp: sizes.append(inp[0].shape[0]))
    try:
        r3 = cam3(x, targets=[0, 2])
        clean_and_chunks = list(sizes)
        sizes.clear()
        r1 = cam1(x, targets=[0, 2])
    finally:
        h.remove()
    # one clean forward of the batch, then ceil(7/3) = 3 passes of <= 3 copies per sample
    assert clean_and_chunks == [2, 6, 6, 2]
    assert sizes == [2] + [2] * 7
    assert r3.cost == {"forward_passes": 3, "backward_passes": 3, "extra_forward_samples": 2}
    torch.testing.assert_close(r3.fused, r1.fused, atol=1e-5, rtol=1e-4)
    # a batch gives what single-sample calls give
    cam = make_cam("smoothgrad", tiny3d, base="gradient", n_samples=7, chunk=3)
    for i, t in enumerate([0, 2]):
        torch.testing.assert_close(cam(x[i:i + 1], targets=t).fused, r3.fused[i:i + 1],
                                   atol=1e-5, rtol=1e-4)


def test_smoothgrad_wraps_any_engine_method_and_records_its_options(tiny3d):
    x = _volume(6, size=16)
    base = make_cam("integrative", tiny3d, layer_weighting="net", fusion="weighted")
    # no noise: every copy is the input itself, so the average is the base map exactly
    still = make_cam("smoothgrad", tiny3d, sigma=0.0, n_samples=3, chunk=2,
                     layer_weighting="net", fusion="weighted")(x)
    ref = base(x)
    torch.testing.assert_close(still.fused, ref.fused, atol=1e-5, rtol=1e-4)
    assert list(still.layer_maps) == list(ref.layer_maps)
    torch.testing.assert_close(still.scores, ref.scores)
    noisy = make_cam("smoothgrad", tiny3d, n_samples=4, chunk=4, sigma=0.3, seed=2,
                     target_layers="stages", layer_weighting="net")(x)
    assert (noisy.fused - ref.fused).abs().max() > 0.01
    o = noisy.options
    assert (o["method"], o["base"], o["n_samples"], o["sigma"], o["chunk"], o["seed"],
            o["aggregate"]) == ("smoothgrad", "integrative", 4, 0.3, 4, 2, "mean")
    assert o["base_options"]["method"] == "integrative"
    assert o["base_options"]["layer_weighting"] == "net"
    assert o["target_layers"] == list(ref.layer_maps)
    json.dumps(o)  # what the audit record stores
    # the clean input's prediction is explained and reported
    assert torch.equal(noisy.target_classes, ref.target_classes)
    torch.testing.assert_close(noisy.logits, ref.logits)
    assert noisy.cost["forward_passes"] == 1 and noisy.cost["backward_passes"] == 1
    # the same seed gives the same map; another seed another one
    again = make_cam("smoothgrad", tiny3d, n_samples=4, chunk=1, sigma=0.3, seed=2,
                     layer_weighting="net")(x)
    torch.testing.assert_close(again.fused, noisy.fused, atol=1e-5, rtol=1e-4)


def test_smoothgrad_refuses_bad_options_before_any_work(tiny3d):
    for opts, needle in [({"base": "smoothgrad"}, "base='smoothgrad'"), ({"base": "nope"}, "nope"),
                         ({"n_samples": 0}, "n_samples"), ({"sigma": -1.0}, "sigma"),
                         ({"chunk": 0}, "chunk"), ({"aggregate": "max"}, "aggregate"),
                         ({"base": "gradient", "alpha_fn": "exp"}, "invalid option")]:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
            make_cam("smoothgrad", tiny3d, **opts)
    calls: list[int] = []
    h = tiny3d.register_forward_pre_hook(lambda _m, inp: calls.append(1))
    try:  # the input is checked by the engine before the model runs
        with pytest.raises(ValueError, match="2 channel"):
            make_cam("smoothgrad", tiny3d, base="gradient")(torch.randn(1, 2, 8, 8, 8))
    finally:
        h.remove()
    assert not calls


# ------------------------------------------------------------------ guided backprop and the model


class _FunctionalReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(self.act(self.conv(x))))  # the second ReLU is functional
        return self.fc(h.mean((2, 3, 4)))


class _PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.act = nn.PReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3, 4)))


@pytest.mark.parametrize("method", ["guided-backprop", "guided-gradcam", "gradient"])
def test_the_model_is_left_exactly_as_found(method, make_tiny):
    model = make_tiny(dims=3, inplace=True).train()  # in-place ReLUs, training mode
    before = _snapshot(model)
    cam = make_cam(method, model)
    r = cam(_volume(7, n=2, size=16), targets=[1, 0])
    _assert_untouched(model, before)
    # it ran in eval mode: the same map as on an eval-mode copy
    ref = make_cam(method, copy.deepcopy(model).eval())(_volume(7, n=2, size=16), targets=[1, 0])
    torch.testing.assert_close(r.fused, ref.fused)


def test_guided_backprop_refuses_functional_relu_and_relu_free_models():
    model = _FunctionalReLU().eval()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="applies ReLU functionally"):
        make_cam("guided-backprop", model)(_volume(8, size=8))
    _assert_untouched(model, before)  # hooks removed after the refusal too
    with pytest.raises(ValueError, match=r"no nn\.ReLU module"):
        make_cam("guided-backprop", _PReLUNet().eval())(_volume(8, size=8))
    # the plain gradient needs no ReLU rule
    assert make_cam("gradient", model)(_volume(8, size=8)).fused.shape == (1, 1, 8, 8, 8)


def test_input_gradient_methods_hook_no_layer(tiny3d):
    assert make_cam("gradient", tiny3d, target_layers="stages").layer_names() == []
    with pytest.raises(ValueError, match="hooks no layer"):
        make_cam("guided-backprop", tiny3d, target_layers="features.2")
    with pytest.raises(ValueError, match="rectify"):
        make_cam("gradient", tiny3d, rectify="square")


@pytest.mark.parametrize(("cam", "options"), [
    ("gradcam", {"target_layers": "last"}),
    ("integrative", {"target_layers": "stages"}),  # a fused multi-layer map
    ("scorecam", {"target_layers": "last", "chunk": 8}),
])
def test_guided_gradcam_is_guided_backprop_times_the_cam(cam, options):
    model = _densenet()
    x = _volume(9)
    result = make_cam("guided-gradcam", model, cam=cam, **options)(x, targets=1)
    cam_map = make_cam(cam, model, **options)(x, targets=1).fused
    guided = GuidedBackpropGrad(copy.deepcopy(model))(x.clone(), index=1)
    expected = minmax_normalize(guided.abs().amax(1, keepdim=True) * cam_map)
    torch.testing.assert_close(result.fused, expected, atol=1e-5, rtol=1e-4)
    assert result.options["cam"] == cam and result.method == "guided-gradcam"
    assert result.options["target_layers"] == list(result.layer_maps)
    with pytest.raises(ValueError, match="not a CAM of the engine"):
        make_cam("guided-gradcam", model, cam="gradient")


# ------------------------------------------------------------------ Score-CAM


def _scorecam_by_hand(model: nn.Module, x: torch.Tensor, layer: str, target: int) -> torch.Tensor:
    """The published algorithm, one masked forward per channel."""
    store = {}
    h = dict(model.named_modules())[layer].register_forward_hook(
        lambda _m, _i, o: store.__setitem__("a", o.detach().clone()))
    with torch.no_grad():
        model(x)
        h.remove()
        a = store["a"]
        scores = []
        for k in range(a.shape[1]):
            up = F.interpolate(a[:, k:k + 1], size=x.shape[2:], mode="trilinear",
                               align_corners=False)
            lo, hi = up.min(), up.max()
            mask = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
            scores.append(model(x * mask)[0, target])
        w = torch.softmax(torch.stack(scores), 0)
        cam = torch.relu((w.view(1, -1, 1, 1, 1) * a).sum(1, keepdim=True))
    return minmax_normalize(F.interpolate(minmax_normalize(cam), size=x.shape[2:],
                                          mode="trilinear", align_corners=False))


def test_scorecam_equals_the_published_algorithm_at_every_chunk_size(tiny3d):
    x = _volume(10, size=16)
    ref = _scorecam_by_hand(tiny3d, x, "features.6", target=2)
    for chunk in (1, 3, 64):
        cam = make_cam("scorecam", tiny3d, target_layers="features.6", chunk=chunk)
        cam(x, targets=2)  # the first call runs the one-off probe of the input shape
        sizes: list[int] = []
        h = tiny3d.register_forward_pre_hook(
            lambda _m, inp, seen=sizes: seen.append(inp[0].shape[0]))
        try:
            r = cam(x, targets=2)
        finally:
            h.remove()
        # memory is bounded by the chunk: no forward sees more than `chunk` masked inputs
        assert sizes[0] == 1 and max(sizes[1:]) == min(chunk, 6)
        assert len(sizes) - 1 == math.ceil(6 / chunk)
        assert r.cost == {"forward_passes": 1, "backward_passes": 0, "extra_forward_samples": 6}
        torch.testing.assert_close(r.fused, ref, atol=1e-5, rtol=1e-4)
    assert r.options["chunk"] == 64 and r.options["weights"] == "softmax"


def test_scorecam_batches_fuses_layers_and_needs_no_gradient(tiny3d):
    x = _volume(11, n=3, size=16)
    cam = make_cam("scorecam", tiny3d, target_layers="stages", chunk=4)
    before = _snapshot(tiny3d)
    with torch.no_grad():  # gradient-free: runs where autograd is off
        r = cam(x, targets=[0, 1, 2])
    _assert_untouched(tiny3d, before)
    assert list(r.layer_maps) == ["features.2", "features.6", "features"]
    for i, t in enumerate([0, 1, 2]):
        torch.testing.assert_close(cam(x[i:i + 1], targets=t).fused, r.fused[i:i + 1],
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs gradients"):
        make_cam("scorecam", tiny3d, layer_weighting="score")
    with pytest.raises(ValueError, match="no bias term"):
        make_cam("scorecam", tiny3d, bias_weight=1.0)


def test_scorecam_and_smoothgrad_take_segmentation_targets():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8, 16),
               strides=(2, 2), num_res_units=1).eval()
    x = _volume(12, n=2, size=16)
    mask = torch.zeros(2, 16, 16, 16)
    mask[0, 4:8, 4:8, 4:8] = 1
    mask[1, 8:12, 8:12, 8:12] = 1
    target = SegmentationTarget(1, mask)
    s = make_cam("scorecam", net, target_layers="last", chunk=5)(x, targets=target)
    sg = make_cam("smoothgrad", net, base="gradient", n_samples=3, chunk=2)(x, targets=target)
    for r in (s, sg):
        assert r.fused.shape == (2, 1, 16, 16, 16) and r.target_classes is None
        torch.testing.assert_close(r.scores, target(net(x)).detach(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ registry and the CLI


def test_every_new_method_is_registered_and_records_its_name(tiny3d):
    x = _volume(13, size=16)
    for name in NEW:
        assert name in METHODS
        r = make_cam(name, tiny3d, target_layers="stages")(x)
        assert r.method == name and r.options["method"] == name
        assert r.fused.shape == (1, 1, 16, 16, 16)
        assert float(r.fused.min()) >= 0.0 and float(r.fused.max()) <= 1.0
        json.dumps(r.options)


@pytest.mark.parametrize(("method", "options"), [
    ("smoothgrad", ["base=gradient", "n_samples=3", "chunk=2"]),
    ("guided-gradcam", []),
    ("scorecam", ["chunk=16"]),
])
def test_cli_explain_writes_a_valid_record_naming_the_method(method, options, tmp_path):
    from icam_med.audit import validate_record, verify_folder
    from icam_med.cli import main as cli_main

    out = tmp_path / "out"
    args = ["explain", str(ANATOMICAL), "--config", "demo", "--out", str(out), "--method", method]
    for o in options:
        args += ["--option", o]
    assert cli_main(args) == 0
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    assert record["method"]["name"] == method
    assert record["method"]["options"]["method"] == method
    for o in options:
        key, _, value = o.partition("=")
        assert str(record["method"]["options"][key]) == value
    # the map is on the scan's grid
    cam = nib.load(str(out / "cam.nii.gz"))
    scan = nib.load(str(ANATOMICAL))
    assert cam.shape[:3] == scan.shape[:3]
    assert abs(cam.affine - scan.affine).max() < 1e-4
    assert verify_folder(out).ok


# ------------------------------------------------------------------ evaluation rows


def test_evaluation_scores_every_toolbox_row_in_its_own_group():
    import numpy as np

    from icam_med.evaluation.evaluate import EvalVolume, evaluate, method_rows, select_rows
    from icam_med.evaluation.synthetic import EvalSynthesizer, normalise_with_twin
    from icam_med.networks import LesionNet

    torch.manual_seed(0)
    model = LesionNet(spatial_dims=3, channels=(4, 8, 8)).eval()
    rows = method_rows(model, (24, 24, 24), default_options={"layer_weighting": "net"})
    toolbox = select_rows(rows, ["toolbox"])
    methods = {r.method for r in toolbox}
    assert {"gradient", "guided-backprop", "smoothgrad", "guided-gradcam", "scorecam"} <= methods
    assert all(r.kind == "toolbox" and " @ " not in r.label for r in toolbox)
    # the existing groups select what they selected before
    for group in ("default", "baselines", "single-layer", "controls", "variants"):
        assert not {r.label for r in select_rows(rows, [group])} & {r.label for r in toolbox}
    rng = np.random.default_rng(0)
    template = np.zeros((24, 24, 24), np.float32)
    template[4:18, 4:18, 4:18] = 100 + 10 * rng.standard_normal((14, 14, 14)).astype(np.float32)
    synth = EvalSynthesizer(template, template > 0, (4.0, 4.0, 4.0), seed=0,
                            radius_mm=(6.0, 9.0), distractor_radius_mm=(4.0, 5.0))
    v = synth(0, split="test", label=1, polarity="hypo")
    x, twin = normalise_with_twin(v.image, v.twin, [{"name": "NormalizeIntensityd",
                                                     "nonzero": True}])
    vol = EvalVolume(x=torch.from_numpy(x), mask=torch.from_numpy(v.mask), target=1,
                     spacing=(4.0, 4.0, 4.0), twin=torch.from_numpy(twin), polarity="hypo")
    cheap = [r for r in toolbox if not r.label.startswith("smoothgrad[gradient")]
    result = evaluate(model, [vol], cheap, fractions=(0.0, 0.05), n_randomisation=0, n_boot=50)
    assert [r["method"] for r in result.rows] == [r.label for r in cheap]
    for row in result.rows:
        assert row["pointing_game"] in (0.0, 1.0) and 0.0 <= row["deletion_auc"] <= 1.0
