"""The bias term: folded conv+BatchNorm biases, and FullGrad's completeness (ICAM_SPEC 2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

from icam_med.cam import GradCAMPlusPlus, IntegrativeCAM, minmax_normalize
from icam_med.cam.layers import effective_bias, own_bias


def _randomise_biases(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and biases (MONAI initialises them to 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            if isinstance(m, (nn.Linear, nn.Conv3d, nn.Conv2d)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("family,size", [("densenet121", 32), ("resnet18", 32)])
def test_complete_bias_contributions_sum_to_the_score(family, size):
    torch.manual_seed(0)
    if family == "densenet121":
        model = nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=3)
        head = "class_layers.out"
    else:
        model = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3)
        head = "fc"
    _randomise_biases(model)
    x = torch.randn(2, 1, size, size, size, generator=torch.Generator().manual_seed(1))
    targets = [0, 2]
    res = IntegrativeCAM(model, bias_mode="complete")(x, targets=targets)
    total = torch.stack(list(res.bias_contributions.values())).sum(0)
    # FullGrad's completeness: input-gradient term + every bias's contribution = the logit
    torch.testing.assert_close(total, res.scores, atol=1e-4, rtol=1e-4)
    carriers = {n for n, m in model.named_modules() if own_bias(m) is not None}
    assert set(res.bias_contributions) == carriers | {"input"}
    # the final Linear bias reaches the logit with gradient 1: its contribution is b_c
    bias = dict(model.named_modules())[head].bias
    torch.testing.assert_close(res.bias_contributions[head], bias[targets].detach())
    # the biases are no rounding error: without them the input term alone misses the score
    assert float((res.bias_contributions["input"] - res.scores).abs().max()) > 1e-2
    assert res.options["bias_mode"] == "complete" and res.cost["backward_passes"] == 1
    plain = IntegrativeCAM(model, bias_weight=0.0)(x, targets=targets)
    assert (res.fused - plain.fused).abs().max() > 1e-3
    assert res.fused.min() >= 0 and res.fused.max() <= 1


def test_batchnorm_bias_folds_the_conv_bias(make_tiny):
    model = make_tiny(dims=3)
    conv, bn = model.features[0], model.features[1]
    want = bn.bias + bn.weight * (conv.bias - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(effective_bias(bn, conv), want.detach())
    assert (effective_bias(bn, conv) - effective_bias(bn)).abs().max() > 1e-3


def test_signed_bias_term_of_a_block_by_hand(make_tiny):
    """Stage `features.2` (ReLU) carries the folded bias of BatchNorm `features.1`, taken with
    the gradient at the BatchNorm's output."""
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    layer = "features.2"
    res = IntegrativeCAM(model, target_layers=[layer], activation_term="gradcam++",
                         bias_weight=1.0)(x, targets=1)
    act_only = GradCAMPlusPlus(model, target_layers=[layer])(x, targets=1)
    store = {}
    h = model.features[1].register_forward_hook(lambda _m, _i, o: store.__setitem__("z", o))
    out = model(x)
    h.remove()
    (g,) = torch.autograd.grad(out[:, 1].sum(), store["z"])
    b = effective_bias(model.features[1], model.features[0])
    bias_map = F.relu((g * b.view(1, -1, 1, 1, 1)).sum(1, keepdim=True))
    assert bias_map.max() > 0
    want = minmax_normalize(act_only.layer_maps[layer] + minmax_normalize(bias_map))
    torch.testing.assert_close(res.layer_maps[layer], want, atol=1e-5, rtol=1e-4)


def test_resnet_block_bias_is_its_last_norm_not_the_shortcut():
    torch.manual_seed(0)
    model = _randomise_biases(nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=2))
    cam = IntegrativeCAM(model)
    records = {r.name: r for r in cam.layer_records((64, 64))}
    assert records["act"].bias_sources == ("bn1",)
    assert records["layer1"].bias_sources == ("layer1.1.bn2",)
    # the first block of layer2 has a downsample branch: both branches of its add carry bias
    assert records["layer2.0"].bias_sources == ("layer2.0.bn2", "layer2.0.downsample.1")
