"""LRP (Captum with a conv+BN composite): conservation on MONAI DenseNet121 and ResNet18 in
3D, agreement with Captum's own LRP where Captum's rules apply alone, the model left as
found, option checks, and a run through ``icam-med explain``.

Conservation, with the tolerances and what takes the remainder:

* epsilon rule (bias kept in ``z``, Captum's rule): input relevance + the tallied bias
  relevance = the score, to 1e-4 relative; the biases (conv+BN folded shifts) take a
  large share, so the input relevance alone does not sum to the score;
* alpha-beta rule (conv/linear biases left out of ``z``): on ResNet18, where every
  BatchNorm folds into its conv, the input relevance alone sums to the score, to 1e-4
  relative; on DenseNet121 the pre-activation BatchNorms (not folded) keep their shift,
  which absorbs a small tallied share: input + bias = score to 1e-4 (one-sided terms, where
  every contribution to a neuron has one sign, and the 1e-9 stabiliser take the rest).
"""

from __future__ import annotations

import json

import pytest
import torch
from io_helpers import TINY_PREPROCESSING, blob_volume
from monai.networks.nets import DenseNet121, ResNet, resnet18
from torch import nn

from icam_med.audit.schema import validate_record
from icam_med.audit.verify import verify_folder
from icam_med.cam import LRP, METHODS, make_cam
from icam_med.cam.targets import SegmentationTarget
from icam_med.cli import main as cli_main
from icam_med.evaluation.dicom_series import write_dicom_series

pytest.importorskip("captum")

RTOL = 1e-4


def _with_bn_statistics(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random, non-trivial BatchNorm statistics and affine parameters (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def densenet3d():
    torch.manual_seed(0)
    return _with_bn_statistics(DenseNet121(spatial_dims=3, in_channels=1, out_channels=3))


@pytest.fixture(scope="module")
def resnet3d():
    torch.manual_seed(0)
    return _with_bn_statistics(resnet18(spatial_dims=3, n_input_channels=1, num_classes=3))


@pytest.fixture(scope="module")
def volumes():
    return torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(3))


def _close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    return bool(((a - b).abs() <= RTOL * scale).all())


@pytest.mark.parametrize("net", ["densenet3d", "resnet3d"])
def test_epsilon_rule_input_plus_bias_relevance_is_the_score(net, volumes, request):
    model = request.getfixturevalue(net)
    r = LRP(model, rule="epsilon").relevance(volumes)
    with torch.no_grad():
        logits = model(volumes)
    assert torch.allclose(r.scores, logits.gather(1, logits.argmax(1, keepdim=True)).squeeze(1))
    total = r.input.flatten(1).sum(1)
    scale = r.scores.abs() + total.abs() + r.bias.abs()
    assert _close(total + r.bias, r.scores, scale), (total, r.bias, r.scores)
    # the folded conv+BN biases absorb a real share: the input alone is not the score
    assert (r.bias.abs() > 1e-3 * r.scores.abs()).all()


@pytest.mark.parametrize(("net", "alpha", "beta"), [("densenet3d", 1.0, 0.0),
                                                     ("resnet3d", 2.0, 1.0)])
def test_alpha_beta_input_relevance_sums_to_the_score(net, alpha, beta, volumes, request):
    model = request.getfixturevalue(net)
    cam = make_cam("lrp", model, rule="alpha-beta", alpha=alpha, beta=beta)
    result = cam(volumes, targets=[1, 2])
    inp, bias = result.bias_contributions["input"], result.bias_contributions["bias"]
    assert result.target_classes.tolist() == [1, 2]
    scale = result.scores.abs() + inp.abs() + bias.abs()
    assert _close(inp + bias, result.scores, scale), (inp, bias, result.scores)
    assert torch.allclose(inp + bias + result.bias_contributions["lost"], result.scores)
    if net == "resnet3d":  # every BatchNorm folded: nothing but the inputs takes relevance
        assert torch.equal(bias, torch.zeros(2))
        assert _close(inp, result.scores, result.scores.abs())
    else:  # DenseNet's pre-activation BatchNorm shifts take a small share
        assert (bias.abs() < 0.2 * result.scores.abs()).all()
    # the engine's result, as every method gives it: input resolution, [0, 1], options
    assert result.fused.shape == (2, 1, 32, 32, 32)
    assert float(result.fused.min()) == 0.0 and float(result.fused.max()) == 1.0
    assert result.method == "lrp" and result.layer_weights == {}
    assert {"rule": "alpha-beta", "alpha": alpha, "beta": beta, "library": "captum"}.items() \
        <= result.options.items()


@pytest.mark.parametrize("rule", ["epsilon", "alpha-beta"])
def test_conserved_on_2d_monai_networks(rule):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(4))
    for model in (DenseNet121(spatial_dims=2, in_channels=1, out_channels=2),
                  resnet18(spatial_dims=2, n_input_channels=1, num_classes=2)):
        r = LRP(_with_bn_statistics(model), rule=rule).relevance(x)
        total = r.input.flatten(1).sum(1)
        scale = r.scores.abs() + total.abs() + r.bias.abs()
        assert _close(total + r.bias, r.scores, scale), (type(model).__name__, rule)
        assert r.input.shape == x.shape


def test_alpha_beta_relevance_is_conserved_at_every_stage(resnet3d, volumes):
    r = LRP(resnet3d, "stages", rule="alpha-beta").relevance(volumes[:1])
    assert list(r.layers) == ["act", "layer1", "layer2", "layer3", "layer4"]
    for name, rel in r.layers.items():
        assert _close(rel.flatten(1).sum(1), r.scores, r.scores.abs()), name


def test_model_is_left_exactly_as_found():
    torch.manual_seed(0)
    model = _with_bn_statistics(ResNet("basic", [1, 1, 1, 1], [4, 8, 16, 32], spatial_dims=3,
                                       n_input_channels=1, num_classes=2))
    model.train()  # a model in training mode stays so; its BatchNorm statistics do not move
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 1, 16, 16, 16)
    for rule in ("epsilon", "alpha-beta"):
        make_cam("lrp", model, target_layers="stages", rule=rule)(x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for m in model.modules():
        assert m.training
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)
        assert not {"rule", "activations", "lrp_add", "forward"} & set(vars(m))


def test_changed_weights_rebuild_the_composite():
    torch.manual_seed(0)
    model = _with_bn_statistics(ResNet("basic", [1, 1, 1, 1], [4, 8, 16, 32], spatial_dims=3,
                                       n_input_channels=1, num_classes=2))
    lrp = LRP(model, rule="alpha-beta")
    x = torch.randn(1, 1, 16, 16, 16)
    before = lrp.relevance(x, targets=0).input
    with torch.no_grad():
        model.fc.weight.mul_(-1.0)  # an in-place update, as an optimiser step makes
    after = lrp.relevance(x, targets=0)
    assert not torch.allclose(before, after.input)
    assert torch.allclose(after.input, LRP(model, rule="alpha-beta").relevance(x, 0).input)


class _Small2D(nn.Module):
    """A chain Captum's own rule table covers in 2D (no BatchNorm, no residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).view(x.shape[0], -1))


def test_equals_captums_lrp_where_its_rules_apply_alone():
    from captum.attr import LRP as CaptumLRP
    from captum.attr._utils.lrp_rules import Alpha1_Beta0_Rule

    torch.manual_seed(0)
    model = _Small2D().eval()
    x = torch.rand(2, 1, 16, 16) + 0.1  # non-negative: Captum's alpha1-beta0 rule assumes it
    ours = LRP(model, rule="epsilon").relevance(x, targets=[0, 2])
    ref = CaptumLRP(model).attribute(x.clone().requires_grad_(True), target=[0, 2])
    assert torch.allclose(ours.input, ref, rtol=1e-4, atol=1e-7)

    ours = LRP(model, rule="alpha-beta").relevance(x, targets=[0, 2])
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.rule = Alpha1_Beta0_Rule(set_bias_to_zero=True)
    ref = CaptumLRP(model).attribute(x.clone().requires_grad_(True), target=[0, 2])
    assert torch.allclose(ours.input, ref, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("options", "message"), [
    ({"rule": "alpha-beta", "alpha": 2.0, "beta": 0.0}, "alpha - beta = 1"),
    ({"rule": "alpha-beta", "alpha": 0.0, "beta": -1.0}, "beta >= 0"),
    ({"rule": "z-plus"}, "use one of ['epsilon', 'alpha-beta']"),
    ({"rule": "epsilon", "alpha": 2.0, "beta": 1.0}, "apply to rule='alpha-beta' only"),
    ({"rule": "epsilon", "epsilon": 0.0}, "must be > 0"),
    ({"rule": "epsilon", "zero_bias": True}, "diverges"),
    ({"rule": "alpha-beta", "epsilon": 0.25}, "applies to rule='epsilon' only"),
])
def test_bad_options_are_refused_when_built(options, message):
    model = _Small2D().eval()
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_cam("lrp", model, **options)


def test_unsupported_models_and_targets_are_refused_before_the_pass():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)
            return self.fc((h * h.sigmoid()).mean((2, 3)))

    with pytest.raises(ValueError, match="outside any layer"):
        LRP(Gated())(torch.rand(1, 1, 8, 8))
    grouped = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"layer '1' \(GroupNorm\)"):
        LRP(grouped)
    with pytest.raises(ValueError, match="one class of a classifier"):
        LRP(_Small2D().eval())(torch.rand(1, 1, 8, 8), targets=SegmentationTarget(1))
    with pytest.raises(ValueError, match="out of range"):
        LRP(_Small2D().eval())(torch.rand(1, 1, 8, 8), targets=5)


def test_registered_and_explained_through_the_cli(tmp_path, capsys):
    import yaml

    assert METHODS["lrp"] is LRP
    config = {
        "model": {"name": "tiny-resnet", "architecture": "ResNet",
                  "args": {"block": "basic", "layers": [1, 1, 1, 1],
                           "block_inplanes": [4, 8, 16, 32], "spatial_dims": 3,
                           "n_input_channels": 1, "num_classes": 2},
                  "labels": ["absent", "present"],
                  "input": {"channels": 1, "spatial_size": [16, 16, 16]}},
        "preprocessing": TINY_PREPROCESSING,
        "method": {"name": "lrp", "rule": "alpha-beta", "alpha": 2.0, "beta": 1.0,
                   "target_layers": "stages"},
    }
    cfg = tmp_path / "lrp.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    write_dicom_series(blob_volume((10, 24, 20), centre_zyx=(4, 12, 8)), tmp_path / "scan",
                       spacing=(0.9, 1.2, 2.5), origin=(-20, 10, 30), modality="MR",
                       patient_name="Doe^Jane", patient_id="MRN-0042")
    out = tmp_path / "out"
    rc = cli_main(["explain", str(tmp_path / "scan"), "--config", str(cfg), "--out", str(out),
                   "--layer-maps"])
    assert rc == 0, capsys.readouterr().err
    assert "method: lrp" in capsys.readouterr().out
    record = json.loads((out / "cam.icam.json").read_text())
    validate_record(record)
    method = record["method"]
    assert method["name"] == "lrp"
    assert {"rule": "alpha-beta", "alpha": 2.0, "beta": 1.0}.items() <= method["options"].items()
    assert verify_folder(out).ok
    summary = json.loads((out / "cam_summary.json").read_text())
    assert summary["result"]["method"] == "lrp"
    assert any(o["role"].startswith("layer_map:") for o in record["outputs"])
