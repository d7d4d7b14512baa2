"""Cross-checks of the engine against independent references (ICAM_SPEC section 6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM as MonaiGradCAM
from torch import nn

from icam_med.cam import GradCAM, GradCAMPlusPlus, IntegrativeCAM, make_cam, minmax_normalize


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


def test_integrative_layer_fusion_follows_the_spec(make_tiny):
    """Recompute the fused map by hand from per-layer maps and relevance scores."""
    torch.manual_seed(5)
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 20, 12)
    # the spec's section 3 formula: score relevance, weighted sum (the previous default)
    res = IntegrativeCAM(model, activation_term="gradcam++", bias_weight=1.0, layer_weighting="score", fusion="weighted")(x)
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


def _hooked_acts_and_grads(model: nn.Module, names: list[str], x: torch.Tensor, cls: int):
    """Each named module's output and dS/dA (S = class logit summed over the batch), by hand."""
    modules = dict(model.named_modules())
    store = {}
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: store.__setitem__(n, o))
               for n in names]
    out = model(x)
    for h in handles:
        h.remove()
    grads = torch.autograd.grad(out[:, cls].sum(), [store[n] for n in names])
    return {n: (store[n].detach(), g.detach()) for n, g in zip(names, grads, strict=True)}, out


def test_net_and_per_position_relevance_by_hand(make_tiny):
    model = make_tiny(dims=3, seed=3)  # a class every layer contributes to positively
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    net = IntegrativeCAM(model, layer_weighting="net")(x, targets=2)
    per = IntegrativeCAM(model, layer_weighting="per_position")(x, targets=2)
    ag, _ = _hooked_acts_and_grads(model, list(net.layer_maps), x, cls=2)
    assert bool((torch.stack([(g * a).sum() for a, g in ag.values()]) > 0).all())
    s_net = torch.stack([(g * a).flatten(1).sum(1).clamp_min(0) for a, g in ag.values()])
    s_per = torch.stack([F.relu((g * a).sum(1)).flatten(1).mean(1) for a, g in ag.values()])
    for j, name in enumerate(net.layer_maps):
        torch.testing.assert_close(net.layer_scores[name], s_net[j], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(per.layer_scores[name], s_per[j], atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(net.layer_weights[name], s_net[j] / s_net.sum(0), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(per.layer_weights[name], s_per[j] / s_per.sum(0), atol=1e-6, rtol=1e-4)
    # the per-layer maps do not depend on the weighting
    for name in net.layer_maps:
        torch.testing.assert_close(net.layer_maps[name], per.layer_maps[name])


@pytest.mark.parametrize("dims", [2, 3])
def test_multiplicative_fusion_is_coarse_to_fine_gating(make_tiny, dims):
    """Poly-CAM style: start from the coarsest map, upsample, multiply by the next finer one."""
    model = make_tiny(dims=dims)
    x = torch.randn(2, 1, *([16] * dims), generator=torch.Generator().manual_seed(6))
    res = make_cam("layercam", model, fusion="multiplicative")(x, targets=0)
    mode = "bilinear" if dims == 2 else "trilinear"
    maps = sorted(res.layer_maps.values(), key=lambda m: m[0, 0].numel())  # coarse -> fine
    acc = _minmax(maps[0])
    for m in maps[1:]:
        up = F.interpolate(acc, size=m.shape[2:], mode=mode, align_corners=False)
        acc = _minmax(up * _minmax(m))
    ref = _minmax(F.interpolate(acc, size=x.shape[2:], mode=mode, align_corners=False))
    torch.testing.assert_close(res.fused, ref, atol=1e-5, rtol=1e-4)
    # the prototype of issue 11: the engine's LayerCAM maps fused multiplicatively, reached
    # through Integrative CAM's options too
    icam = IntegrativeCAM(model, activation_term="layercam", bias_weight=0.0,
                          layer_weighting="uniform", fusion="multiplicative")(x, targets=0)
    torch.testing.assert_close(icam.fused, res.fused)
    assert icam.options["activation_term"] == "layercam" and icam.options["fusion"] == "multiplicative"


def test_counterfactual_weights_by_hand(make_tiny):
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(8))
    keep = 0.2
    res = IntegrativeCAM(model, layer_weighting="counterfactual", counterfactual_keep=keep)(
        x, targets=[0, 2])
    n_layers = len(res.layer_maps)
    assert res.cost == {"forward_passes": 1, "backward_passes": 1,
                        "extra_forward_samples": (n_layers + 1) * 2}
    base = x.flatten(2).mean(-1)[:, :, None, None, None].expand_as(x)
    k = round(keep * 16**3)
    with torch.no_grad():
        s_base = model(base)[[0, 1], [0, 2]]
        gains = []
        for m in res.layer_maps.values():
            up = F.interpolate(m, size=x.shape[2:], mode="trilinear", align_corners=False)
            thr = up.flatten(1).topk(k, 1).values[:, -1].view(-1, 1, 1, 1, 1)
            mask = (up >= thr) & (up > 0)
            kept = torch.where(mask, x, base)
            gains.append(model(kept)[[0, 1], [0, 2]] - s_base)
    gains = torch.stack(gains)  # (L, N)
    pos = gains.clamp_min(0)
    for j, name in enumerate(res.layer_maps):
        torch.testing.assert_close(res.layer_scores[name], gains[j], atol=1e-4, rtol=1e-4)
        # layers weighted by the score their region keeps; alike where none keeps any
        want = torch.where(pos.sum(0) > 0, pos[j] / pos.sum(0).clamp_min(1e-30),
                           torch.full_like(pos[j], 1 / n_layers))
        torch.testing.assert_close(res.layer_weights[name], want, atol=1e-5, rtol=1e-4)
