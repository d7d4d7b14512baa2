"""`BaseCAM.layer_records` and `BaseCAM.output_shape`: the engine's probe of an input size,
public for an explicit list of layers as for a preset (it raised KeyError for a list), on
real MONAI networks (a 3-D UNet and a 2-D ResNet18)."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

from icam_med.cam import GradCAM, IntegrativeCAM, SegmentationTarget


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8),
                     strides=(2,), num_res_units=0).eval()


def _resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return nets.resnet18(spatial_dims=2, n_input_channels=1, num_classes=4).eval()


def _forwards(model: torch.nn.Module) -> list[int]:
    """A counter of the model's forward passes (a hook on the root module)."""
    count = [0]
    model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


@pytest.mark.parametrize(("build", "shape", "layers"), [
    (_unet, (16, 16, 16), ["model.0", "model.1.submodule"]),
    (_resnet, (32, 32), ["layer2", "layer4"]),
])
def test_explicit_layer_list_gives_the_same_records_as_a_preset(build, shape, layers):
    model = build()
    explicit = GradCAM(model, target_layers=layers)
    records = explicit.layer_records(shape)  # raised KeyError before
    preset = GradCAM(model, target_layers="all")
    assert [r.name for r in records] == [r.name for r in preset.layer_records(shape)]
    by_name = {r.name: r for r in records}
    for name in layers:  # each named layer is described, at its own spatial size
        assert by_name[name].spatial_shape, name
    assert explicit.layer_names(shape) == layers


def test_output_shape_is_the_models_own():
    unet, resnet = _unet(), _resnet()
    with torch.no_grad():
        seg = unet(torch.zeros(1, 1, 16, 16, 16))
        cls = resnet(torch.zeros(1, 1, 32, 32))
    assert GradCAM(unet, target_layers=["model.0"]).output_shape((16, 16, 16)) == \
        tuple(seg.shape[1:]) == (3, 16, 16, 16)
    assert IntegrativeCAM(resnet).output_shape([32, 32]) == tuple(cls.shape[1:]) == (4,)


def test_records_come_from_the_probe_the_explanation_uses():
    """One probe pass per input size: after an explanation, asking for the records or the
    output shape runs the model no more; a new size probes once."""
    model = _unet()
    cam = GradCAM(model, target_layers=["model.0", "model.1.submodule"])
    count = _forwards(model)
    x = torch.randn(1, 1, 16, 16, 16)
    cam(x, SegmentationTarget(1))
    after_call = count[0]
    cam.layer_records((16, 16, 16))
    cam.output_shape((16, 16, 16))
    assert count[0] == after_call
    cam.layer_records((8, 16, 16))
    cam.output_shape((8, 16, 16))
    assert count[0] == after_call + 1


def test_a_named_layer_without_a_spatial_output_is_a_clear_error():
    """A Linear head gives no feature map: the same ValueError as an explanation, naming
    the layer, not a KeyError."""
    cam = GradCAM(_resnet(), target_layers=["layer4", "fc"])
    with pytest.raises(ValueError, match="target layer 'fc' produced no spatial feature map"):
        cam.layer_records((32, 32))
