"""Layer presets on the MONAI model zoo (random weights, 2D and 3D): block outputs only.

A preset must hook what a reader of the architecture calls a stage's output: after the
activation and after the residual add; never a norm output an activation reads next (where
``sum(A) < 0`` breaks the Grad-CAM++ alpha), never a ResNet ``downsample`` branch, never
padding or identity modules, never a segmentation network's output layer.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks import nets
from torch import nn

from icam_med.cam import GradCAM, IntegrativeCAM, SegmentationTarget, make_cam
from icam_med.cam.layers import select_layers

_DENSENET = ["features.relu0", "features.transition1.relu", "features.transition2.relu",
             "features.transition3.relu", "class_layers.relu"]
_RESNET = ["act", "layer1", "layer2", "layer3", "layer4"]

# family -> (builder(dims), input size, expected `stages`, post-ReLU everywhere)
FAMILIES = {
    "densenet121": (lambda d: nets.DenseNet121(spatial_dims=d, in_channels=1, out_channels=2),
                    64, _DENSENET, True),
    "densenet169": (lambda d: nets.DenseNet169(spatial_dims=d, in_channels=1, out_channels=2),
                    64, _DENSENET, True),
    "resnet10": (lambda d: nets.resnet10(spatial_dims=d, n_input_channels=1, num_classes=2),
                 64, _RESNET, True),
    "resnet18": (lambda d: nets.resnet18(spatial_dims=d, n_input_channels=1, num_classes=2),
                 64, _RESNET, True),
    "resnet50": (lambda d: nets.resnet50(spatial_dims=d, n_input_channels=1, num_classes=2),
                 64, _RESNET, True),
    "seresnet50": (lambda d: nets.SEResNet50(spatial_dims=d, in_channels=1, num_classes=2),
                   64, ["layer0.relu1", "layer1", "layer2", "layer3", "layer4"], True),
    # MBConv blocks end in a linear bottleneck (a norm, or a residual sum of one): the block
    # output is the only tensor a stage hands on; `_swish` is shared by every call site.
    "efficientnet-b0": (lambda d: nets.EfficientNetBN("efficientnet-b0", pretrained=False,
                                                      spatial_dims=d, in_channels=1, num_classes=2),
                        64, ["_blocks.0", "_blocks.1", "_blocks.2", "_blocks.4", "_blocks"], False),
    # encoder (down) and decoder (up) stages; the top up-layer produces the output
    "unet": (lambda d: nets.UNet(spatial_dims=d, in_channels=1, out_channels=2,
                                 channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2),
             32, ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.1.submodule",
                  "model.1.submodule.1.submodule", "model.1.submodule"], False),
    "basicunet": (lambda d: nets.BasicUNet(spatial_dims=d, in_channels=1, out_channels=2,
                                           features=(4, 4, 8, 8, 16, 4)),
                  32, ["conv_0", "down_1", "down_2", "down_3", "down_4",
                       "upcat_4", "upcat_3", "upcat_2", "upcat_1"], False),
    # pre-activation residual blocks: the block output is the residual sum
    "segresnet": (lambda d: nets.SegResNet(spatial_dims=d, in_channels=1, out_channels=2,
                                           init_filters=8),
                  32, ["down_layers.0", "down_layers.1", "down_layers.2", "down_layers.3",
                       "up_layers.0", "up_layers.1", "up_layers.2"], False),
}
SEGMENTATION = {"unet", "basicunet", "segresnet"}
_FORBIDDEN_TYPES = ("Pad", "Identity", "Dropout")


def _outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each named module's forward output (cloned at once: later in-place ops cannot touch it)."""
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(
        lambda _m, _i, o, n=n: store.__setitem__(n, o.detach().clone())) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return store


def _modules_returning_output(model: nn.Module, x: torch.Tensor) -> list[str]:
    """The modules whose forward output is the network's output tensor itself."""
    store: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: store.__setitem__(n, o))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [n for n, o in store.items() if o is out]


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_stage_preset_hooks_block_outputs(family, dims):
    build, size, expected, post_relu = FAMILIES[family]
    torch.manual_seed(0)
    model = build(dims).eval()
    shape = (size,) * dims
    cam = IntegrativeCAM(model)
    names = cam.layer_names(shape)
    assert names == expected
    records = {r.name: r for r in cam.layer_records(shape)}
    everything = select_layers(list(records.values()), "all")
    assert set(names) <= set(everything)
    for name in everything:
        rec = records[name]
        assert rec.block_output and rec.calls == 1, name
        assert "downsample" not in name.split("."), name
        assert not any(t in rec.module_type for t in _FORBIDDEN_TYPES), name
        assert not (rec.is_norm and not rec.is_container), name  # never a bare norm output
        assert rec.kind in ("activation", "add", "norm", "other"), (name, rec.kind)
    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(1))
    acts = _outputs(model, names, x)
    for name in names:
        a = acts[name]
        assert a.shape[2:] == records[name].spatial_shape
        if post_relu:  # post-ReLU maps: every entry >= 0, so sum_pos(A_k) >= 0 for the alpha
            assert a.min() >= 0, name
    if family in SEGMENTATION:
        returning = _modules_returning_output(model, x)
        output_layer = max(returning, key=lambda n: n.count("."))
        assert output_layer in ("model.2.1", "final_conv", "conv_final.2.conv"), output_layer
        for name in everything:  # never the output layer, nor anything inside it
            assert name not in returning and not name.startswith(output_layer + "."), name
        target = SegmentationTarget(1)
    else:
        target = 0
    res = cam(x, targets=target)
    assert list(res.layer_maps) == names
    assert res.fused.shape == (1, 1, *shape) and torch.isfinite(res.fused).all()


def test_plain_sequential_cnn_2d_and_3d():
    for dims in (2, 3):
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        bn = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        gap = nn.AdaptiveAvgPool3d if dims == 3 else nn.AdaptiveAvgPool2d
        torch.manual_seed(0)
        model = nn.Sequential(conv(1, 4, 3, padding=1), bn(4), nn.ReLU(inplace=True), pool(2),
                              conv(4, 8, 3, padding=1), bn(8), nn.ReLU(inplace=True), nn.Dropout(),
                              gap(1), nn.Flatten(), nn.Linear(8, 2)).eval()
        cam = IntegrativeCAM(model)
        # the ReLUs (not the BatchNorms they modify in place, not the Dropout after them)
        assert cam.layer_names((16,) * dims) == ["2", "6"]
        res = cam(torch.randn(2, 1, *(16,) * dims))
        assert list(res.layer_maps) == ["2", "6"]


def test_a_container_is_hookable_and_gives_its_forward_output():
    """`layer4` (the layer every ResNet tutorial uses): Grad-CAM on it by hand."""
    torch.manual_seed(0)
    model = nets.resnet18(spatial_dims=3, n_input_channels=1, num_classes=3).eval()
    x = torch.randn(2, 1, 48, 48, 48, generator=torch.Generator().manual_seed(2))
    res = GradCAM(model, target_layers="layer4")(x, targets=[2, 1])
    store = {}
    h = model.layer4.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    out = model(x)
    h.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(out[[0, 1], [2, 1]].sum(), a)
    w = g.flatten(2).mean(-1)
    ref = F.relu((w[:, :, None, None, None] * a).sum(1, keepdim=True)).detach()
    lo = ref.flatten(1).min(1).values.view(-1, 1, 1, 1, 1)
    hi = ref.flatten(1).max(1).values.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(res.layer_maps["layer4"], (ref - lo) / (hi - lo), atol=1e-5, rtol=1e-4)


def test_shared_activation_is_reached_through_its_block():
    torch.manual_seed(0)
    model = nets.EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=2,
                                in_channels=1, num_classes=2).eval()
    cam = IntegrativeCAM(model, target_layers="all")
    names = cam.layer_names((64, 64))
    assert not any(n.endswith("_swish") for n in names)
    records = {r.name: r for r in cam.layer_records((64, 64))}
    assert records["_swish"].calls == 2 and not records["_swish"].block_output
    with pytest.raises(ValueError, match=r"runs more than once.*hook the block that contains it"):
        GradCAM(model, target_layers="_blocks.1.2._swish")(torch.randn(1, 1, 64, 64))


class _TinyViT(nn.Module):
    """Patch embedding (a strided conv) + torch's TransformerEncoder + a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv3d(1, 32, kernel_size=8, stride=8)
        layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(tokens).mean(1))


def test_vision_transformer_is_refused_with_the_reason():
    vit = _TinyViT().eval()
    for method in ("integrative", "gradcam", "layercam"):
        with pytest.raises(ValueError, match=r"self-attention.*no convolutional feature maps"):
            make_cam(method, vit)
    # a hybrid's convolutional part may still be named explicitly
    res = GradCAM(vit, target_layers="patch_embedding")(torch.randn(1, 1, 32, 32, 32))
    assert res.layer_maps["patch_embedding"].shape == (1, 1, 4, 4, 4)


def test_torchscript_model_is_refused_with_the_fix(make_tiny):
    scripted = torch.jit.trace(make_tiny(dims=2), torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"TorchScript.*forward hooks.*eager model"):
        IntegrativeCAM(scripted)
