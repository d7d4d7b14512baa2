"""Cross-checks of the engine against independent references (ICAM_SPEC section 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM as MonaiGradCAM
from torch import nn

from icam_med.cam import GradCAM, GradCAMPlusPlus, IntegrativeCAM, minmax_normalize


def _minmax(t: torch.Tensor) -> torch.Tensor:
    return minmax_normalize(t)


@pytest.mark.parametrize("dims,shape,layer", [
    (2, (2, 1, 32, 28), "features.4"),
    (3, (2, 1, 20, 24, 16), "features.4"),
    (3, (3, 1, 16, 16, 16), "features.8"),
])
def test_gradcam_matches_monai_per_sample(make_tiny, dims, shape, layer):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    ours = GradCAM(make_tiny(dims=dims), target_layers=layer)
    classes = [i % 3 for i in range(shape[0])]  # different classes within one batch
    res = ours(x, targets=classes)
    for i, c in enumerate(classes):
        # MONAI scores logits[:, class_idx] for the whole batch: take it one sample at a time,
        # on a fresh model (MONAI leaves hooks behind and flips in-place flags).
        monai_cam = MonaiGradCAM(nn_module=make_tiny(dims=dims), target_layers=layer)
        raw = monai_cam.compute_map(x[i : i + 1], class_idx=c)
        assert raw.shape == res.layer_maps[layer][i : i + 1].shape
        torch.testing.assert_close(res.layer_maps[layer][i : i + 1], _minmax(raw), atol=1e-5, rtol=1e-5)
        # and at input size: our fused map equals min-max of MONAI's upsampled raw map
        mode = "bilinear" if dims == 2 else "trilinear"
        up = F.interpolate(raw, size=shape[2:], mode=mode, align_corners=False)
        torch.testing.assert_close(res.fused[i : i + 1], _minmax(up), atol=1e-5, rtol=1e-5)


def _acts_and_grads(model: nn.Module, layer: str, x: torch.Tensor, cls: int):
    store = {}
    mod = dict(model.named_modules())[layer]
    h = mod.register_forward_hook(lambda _m, _i, o: store.__setitem__("a", o))
    out = model(x)
    h.remove()
    a = store["a"]
    (g,) = torch.autograd.grad(out[:, cls].sum(), a)
    return a.detach(), g.detach(), out.detach()


@pytest.mark.parametrize("dims", [2, 3])
def test_gradcampp_exp_equals_published_formula(make_tiny, dims):
    torch.manual_seed(1)
    model = make_tiny(dims=dims)
    x = torch.randn(1, 1, *([16] * dims))
    # The published formula was derived for non-negative (post-ReLU) activations, where the
    # spec's guards (negative denominators -> 1/2, clip to [0, 1]) never trigger.
    layer = "features.6"
    a, g, _ = _acts_and_grads(model, layer, x, cls=2)
    # Chattopadhyay et al. 2018, eq. 19 with Y = exp(S): alpha = g^2 / (2 g^2 + sum(A) g^3)
    sum_a = a.flatten(2).sum(-1).view(1, -1, *([1] * dims))
    num = g**2
    den = 2 * g**2 + sum_a * g**3
    alpha = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)),
                        torch.zeros_like(den))
    w = (alpha * F.relu(g)).flatten(2).sum(-1)  # exp(S) is a shared positive factor
    ref = F.relu((w.view(1, -1, *([1] * dims)) * a).sum(1, keepdim=True))
    pos = alpha[g > 0]  # only positive gradients enter the weights
    assert (a >= 0).all() and (pos >= 0).all() and (pos <= 1).all()
    res = GradCAMPlusPlus(model, target_layers=layer, alpha_fn="exp")(x, targets=2)
    assert ref.max() > 0
    torch.testing.assert_close(res.layer_maps[layer], _minmax(ref), atol=1e-5, rtol=1e-4)


class _SmoothHead(nn.Module):
    """conv -> [A] -> ReLU -> global mean -> linear: the score is locally linear in A."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _autograd_alpha_weights(model: _SmoothHead, x: torch.Tensor, cls: int, f_name: str):
    """alpha = Y'' / (2 Y'' + sum(A) Y''') with Y'' and Y''' from double/triple backward."""
    a = model.conv(x).detach().requires_grad_(True)

    def y_of(act: torch.Tensor) -> torch.Tensor:
        logits = model.fc(model.act(act).mean((2, 3)))
        s = logits[0, cls]
        if f_name == "sigmoid":
            return torch.sigmoid(s)
        # softmax probability of the target as a function of its own logit (the spec's
        # reading: the other logits are constants)
        others = logits.detach().clone()
        others[0, cls] = s
        mixed = torch.where(torch.arange(4) == cls, logits[0], others[0])
        return torch.softmax(mixed, 0)[cls]

    y = y_of(a)
    (d1,) = torch.autograd.grad(y, a, create_graph=True)
    flat_d1 = d1.flatten()
    d2 = torch.zeros_like(flat_d1)
    d3 = torch.zeros_like(flat_d1)
    for i in range(flat_d1.numel()):
        (h,) = torch.autograd.grad(flat_d1[i], a, create_graph=True)
        d2_i = h.flatten()[i]
        d2[i] = d2_i.detach()
        if d2_i.requires_grad:
            (t,) = torch.autograd.grad(d2_i, a, retain_graph=True)
            d3[i] = t.flatten()[i]
    d1, d2, d3 = d1.detach(), d2.view_as(a), d3.view_as(a)
    sum_a = a.detach().flatten(2).sum(-1).view(1, -1, 1, 1)
    den = 2 * d2 + sum_a * d3
    alpha = torch.where(d1 != 0, d2 / den, torch.zeros_like(den))
    bad = (d1 != 0) & ((den / d2.sign().where(d2 != 0, torch.ones_like(d2))) <= 0)
    alpha = torch.where(bad, torch.full_like(alpha, 0.5), alpha).clamp(0, 1)
    g = d1  # f'(S) g: a positive multiple of g
    w = (alpha * F.relu(g)).flatten(2).sum(-1)
    return F.relu((w.view(1, -1, 1, 1) * a.detach()).sum(1, keepdim=True))


@pytest.mark.parametrize("f_name", ["sigmoid", "softmax"])
@pytest.mark.parametrize("cls", [0, 1, 3])
def test_smooth_alpha_equals_autograd_derivation(f_name, cls):
    model = _SmoothHead().eval()
    x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(cls))
    ref = _autograd_alpha_weights(model, x, cls, f_name)
    res = GradCAMPlusPlus(model, target_layers="conv", alpha_fn=f_name)(x, targets=cls)
    torch.testing.assert_close(res.layer_maps["conv"], _minmax(ref), atol=1e-4, rtol=1e-3)


def test_integrative_layer_fusion_follows_the_spec(make_tiny):
    """Recompute the fused map by hand from per-layer maps and relevance scores."""
    torch.manual_seed(5)
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 20, 12)
    res = IntegrativeCAM(model)(x)
    s = torch.stack([res.layer_scores[k] for k in res.layer_maps], 1)  # (N, L)
    omega = s / s.sum(1, keepdim=True)
    acc = torch.zeros_like(res.fused)
    for j, (_name, m) in enumerate(res.layer_maps.items()):
        acc += omega[:, j].view(-1, 1, 1, 1, 1) * F.interpolate(
            m, size=x.shape[2:], mode="trilinear", align_corners=False)
    torch.testing.assert_close(res.fused, _minmax(acc), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack(list(res.layer_weights.values()), 1), omega)


@pytest.mark.parametrize("ratio", [1.0, 0.0, 3.5, -2.0])
def test_fast_alpha_weights_equal_the_guarded_alpha(ratio):
    from icam_med.cam.alpha import alpha_channel_weights, generalized_alpha

    gen = torch.Generator().manual_seed(11)
    g = torch.randn(2, 5, 6, 7, 3, generator=gen)
    g[0, 0] = 0  # a channel without gradient
    a = torch.randn(2, 5, 6, 7, 3, generator=gen)  # signed: negative denominators occur
    a_sum = a.flatten(2).sum(-1)
    r = torch.full((2,), ratio)
    slow = (generalized_alpha(g, a_sum, r) * F.relu(g)).flatten(2).sum(-1)
    torch.testing.assert_close(alpha_channel_weights(g, a_sum, r), slow)
