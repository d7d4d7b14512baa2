"""The generalised Grad-CAM++ alpha against autograd, and its continuity (ICAM_SPEC 1).

The reference differentiates ``Y = f(model output)`` with respect to every activation entry
by repeated backward (second and third derivatives, every logit free), then applies the
published alpha ``Y'' / (2 Y'' + sum_pos(A_k) Y''')`` under the engine's continuous guard.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from icam_med.cam import GradCAMPlusPlus, IntegrativeCAM, minmax_normalize
from icam_med.cam.alpha import alpha_from_denominator, alpha_ratio, generalized_alpha


class _SmoothHead(nn.Module):
    """conv -> [A] -> ReLU -> global mean -> linear: the logits are locally linear in A."""

    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(3, n_classes)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def _guard(denom: torch.Tensor) -> torch.Tensor:
    """The continuous guard, written out: 1/d (d >= 1), 1 (0 <= d < 1), 1/(1 - d) (d < 0)."""
    out = torch.empty_like(denom)
    for i, d in enumerate(denom.flatten().tolist()):
        out.view(-1)[i] = 1 / d if d >= 1 else (1.0 if d >= 0 else 1 / (1 - d))
    return out


def _autograd_reference(model: _SmoothHead, x: torch.Tensor, y_of_logits) -> torch.Tensor:
    """The layer map of generalised Grad-CAM++ from autograd third derivatives."""
    a = model.conv(x).detach().requires_grad_(True)
    y = y_of_logits(model.fc(model.act(a).mean((2, 3)))[0])
    (d1,) = torch.autograd.grad(y, a, create_graph=True)
    flat_d1 = d1.flatten()
    d2 = torch.zeros_like(flat_d1)
    d3 = torch.zeros_like(flat_d1)
    for i in range(flat_d1.numel()):
        if not flat_d1[i].requires_grad:
            continue
        (h,) = torch.autograd.grad(flat_d1[i], a, create_graph=True)
        d2_i = h.flatten()[i]
        d2[i] = d2_i.detach()
        if d2_i.requires_grad:
            (t,) = torch.autograd.grad(d2_i, a, retain_graph=True)
            d3[i] = t.flatten()[i]
    d1, d2, d3 = d1.detach(), d2.view_as(a), d3.view_as(a)
    sum_a = a.detach().flatten(2).sum(-1).view(1, -1, 1, 1)
    # alpha = Y'' / (2 Y'' + sum(A) Y''') = 1 / (2 + sum(A) Y'''/Y'')
    ratio = torch.where(d2 != 0, d3 / torch.where(d2 != 0, d2, torch.ones_like(d2)),
                        torch.sign(d3) * 1e30)
    alpha = _guard(2 + sum_a * ratio)
    alpha = torch.where(d1 != 0, alpha, torch.zeros_like(alpha))
    w = (alpha * F.relu(d1)).flatten(2).sum(-1)  # Y' = f'(S) g: a positive multiple of g
    return F.relu((w.view(1, -1, 1, 1) * a.detach()).sum(1, keepdim=True))


_OUTPUT_FUNCTIONS = {
    # name -> (alpha_fn given to the engine, Y as a function of all logits and the class)
    "sigmoid": ("sigmoid", lambda z, c: torch.sigmoid(z[c])),
    "softmax": ("softmax", lambda z, c: torch.softmax(z, 0)[c]),  # every logit free
    "callable exp(2S)": (lambda s: torch.exp(2 * s), lambda z, c: torch.exp(2 * z[c])),
    "callable cubic": (lambda s: s**3 / 6 + s, lambda z, c: z[c] ** 3 / 6 + z[c]),  # r = 1/S
    "callable log-sigmoid": (F.logsigmoid, lambda z, c: F.logsigmoid(z[c])),
}


@pytest.mark.parametrize("n_classes", [2, 4])
@pytest.mark.parametrize("cls", [0, 1])
@pytest.mark.parametrize("fn", sorted(_OUTPUT_FUNCTIONS))
def test_alpha_equals_autograd_third_derivatives(fn, cls, n_classes):
    model = _SmoothHead(n_classes).eval()
    engine_fn, y_of = _OUTPUT_FUNCTIONS[fn]
    for seed in range(3):
        x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(10 * seed + cls))
        ref = _autograd_reference(model, x, lambda z, y_of=y_of: y_of(z, cls))
        res = GradCAMPlusPlus(model, target_layers="conv", alpha_fn=engine_fn)(x, targets=cls)
        torch.testing.assert_close(res.layer_maps["conv"], minmax_normalize(ref), atol=1e-4, rtol=1e-3)


def test_true_softmax_differs_from_frozen_logits_and_costs_one_pass_per_logit():
    model = _SmoothHead(4).eval()
    x = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(5))
    soft = GradCAMPlusPlus(model, target_layers="conv", alpha_fn="softmax")(x, targets=[1, 3])
    assert soft.cost["backward_passes"] == 1 + 4
    assert soft.options["alpha_fn"] == "softmax"
    # the sigmoid of the target logit alone (the old reading, other logits frozen) is another map
    frozen = GradCAMPlusPlus(model, target_layers="conv", alpha_fn="sigmoid")(x, targets=[1, 3])
    assert not torch.allclose(soft.layer_maps["conv"], frozen.layer_maps["conv"], atol=1e-3)
    # batch == single runs
    for i, c in enumerate([1, 3]):
        single = GradCAMPlusPlus(model, target_layers="conv", alpha_fn="softmax")(x[i : i + 1], targets=c)
        torch.testing.assert_close(soft.layer_maps["conv"][i : i + 1], single.layer_maps["conv"],
                                   atol=1e-5, rtol=1e-4)


def test_callable_alpha_is_recorded_and_matches_its_named_twin(make_tiny):
    model = make_tiny(dims=3)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(2))

    def exp_half(s):
        return torch.exp(0.5 * s)

    # the alpha belongs to the Grad-CAM++ activation term
    by_name = IntegrativeCAM(model, activation_term="gradcam++", alpha_fn="exp",
                             alpha_beta=0.5)(x)
    by_callable = IntegrativeCAM(model, activation_term="gradcam++", alpha_fn=exp_half)(x)
    torch.testing.assert_close(by_callable.fused, by_name.fused, atol=1e-5, rtol=1e-4)
    assert by_callable.options["alpha_fn"].startswith("callable:") and "exp_half" in \
        by_callable.options["alpha_fn"]
    with pytest.raises(ValueError, match="does not depend on the score"):
        IntegrativeCAM(model, activation_term="gradcam++", alpha_fn=lambda s: torch.ones_like(s))(x)
    with pytest.raises(ValueError, match=r"not increasing at the score.*f' <= 0"):
        IntegrativeCAM(model, activation_term="gradcam++", alpha_fn=lambda s: -torch.exp(s))(x)
    with pytest.raises(ValueError, match="alpha_fn='cube' is not supported"):
        IntegrativeCAM(model, alpha_fn="cube")


@pytest.mark.parametrize("c", [-3.0, -0.4, 0.3, 1.0, 5.0])
def test_sigmoid_alpha_is_continuous_in_p(c):
    """alpha(p) for g * sum_pos(A) = c: no jump anywhere in (0, 1), also where f'' = 0."""
    p = torch.linspace(1e-4, 1 - 1e-4, 200001, dtype=torch.float32)
    score = torch.log(p) - torch.log1p(-p)
    r = alpha_ratio("sigmoid", score, p)
    alpha = generalized_alpha(torch.ones(p.numel(), 1, 1), torch.full((p.numel(), 1), c), r).flatten()
    assert bool(((alpha >= 0) & (alpha <= 1)).all())
    jump = (alpha[1:] - alpha[:-1]).abs().max()
    assert float(jump) < 5e-3, float(jump)


def test_guard_is_continuous_and_leaves_the_published_range_alone():
    d = torch.linspace(-50, 50, 100001)
    alpha = alpha_from_denominator(d)
    assert float((alpha[1:] - alpha[:-1]).abs().max()) < 1e-2
    big = d >= 1  # the published Grad-CAM++ alpha (post-ReLU, exp): exactly 1/d
    torch.testing.assert_close(alpha[big], 1 / d[big])
    assert math.isclose(float(alpha_from_denominator(torch.tensor(-1e30))), 0.0, abs_tol=1e-12)
    torch.testing.assert_close(_guard(d[::997]), alpha[::997])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_softmax_alpha_is_continuous_in_p(n_classes):
    """The true softmax alpha along a path of logits that sweeps p_c through (0, 1)."""
    from icam_med.cam.alpha import softmax_channel_weights

    steps = 200001
    shift = torch.linspace(-9, 9, steps)
    logits = torch.zeros(steps, n_classes)
    logits[:, 0] = shift
    probs = torch.softmax(logits, 1)
    g = torch.tensor([1.0, -0.5, 0.25][:n_classes]).view(n_classes, 1, 1, 1).expand(n_classes, steps, 1, 1)
    for act_sum in (-2.0, 0.7, 4.0):
        w = softmax_channel_weights(g.contiguous(), torch.full((steps, 1), act_sum), probs,
                                    torch.zeros(steps, dtype=torch.long)).flatten()
        a = (g[0, :, 0, 0] - (probs.t() * g[:, :, 0, 0]).sum(0)).clamp_min(0)
        alpha = torch.where(a > 0, w / a.clamp_min(1e-30), torch.zeros_like(w))
        assert bool(((alpha >= 0) & (alpha <= 1 + 1e-6)).all())
        assert float((alpha[1:] - alpha[:-1]).abs().max()) < 5e-3
