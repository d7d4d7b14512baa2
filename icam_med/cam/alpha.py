"""The Grad-CAM++ alpha, generalised to any smooth output function (ICAM_SPEC section 1).

For a network that is piecewise linear after the hooked layer, ``S`` is locally linear in
the activation ``A``; with ``Y = f(S)`` and ``g = dS/dA``::

    alpha = f''(S) g^2 / (2 f''(S) g^2 + sum_pos(A_k) f'''(S) g^3)
          = 1 / (2 + r * g * sum_pos(A_k)),      r = f'''(S) / f''(S)

Each named output function is described by the pair ``(d2, d3)`` proportional to
``(f''(S), f'''(S))`` with the same positive factor, so ``r = d3 / d2`` never needs
``exp(S)`` itself and ``f'' = 0`` (sigmoid at p = 0.5) is handled without a division by zero.
A callable ``f`` gets ``f''`` and ``f'''`` by autograd on the scalar score.

``softmax`` is the probability of the target class with **every** logit free: its
derivatives along a per-element direction ``v`` (the per-logit gradients ``g_j = dz_j/dA``
at that element) are, with ``m = sum_j p_j v_j``, ``a = v_c - m``, the variance
``s2 = sum_j p_j (v_j - m)^2`` and third central moment ``k3 = sum_j p_j (v_j - m)^3``::

    Y' = p_c a,   Y'' = p_c (a^2 - s2),   Y''' = p_c (a^3 - 3 a s2 - k3)

(the quadratic and cubic forms of the softmax's logit Hessian and third derivative with
the per-logit gradients). It needs every logit's gradient, so it costs one backward pass
per logit (see :class:`~icam_med.cam.methods.GradCAMPlusPlus`).

The exact alpha ``1 / (2 + t)`` has a pole where ``2 + t`` crosses 0; clipping it jumps
from 1 to 0 (or to the old fall-back 1/2) there. The guard used here is continuous in
``t`` (and so in ``p``): ``1/(2+t)`` where ``2 + t >= 1`` (every case of the published
method with post-ReLU activations), 1 where ``0 <= 2 + t < 1``, and ``1 / (1 - (2 + t))``
where ``2 + t < 0``, which tends to 0 as ``t -> -inf`` exactly as the exact alpha does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "ALPHA_FUNCTIONS",
    "alpha_channel_weights",
    "alpha_from_denominator",
    "alpha_ratio",
    "callable_ratio",
    "generalized_alpha",
    "softmax_channel_weights",
]

# name -> (d2, d3) as functions of (score S, probability p, beta), each of shape (N,)
_Derivs = Callable[[torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def _exp(s: torch.Tensor, p: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # f = exp(beta S): f'' = beta^2 f, f''' = beta^3 f  ->  r = beta
    one = torch.ones_like(s)
    return one, one * beta


def _identity(s: torch.Tensor, p: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # f = S: the limit r -> 0 gives alpha = 1/2 (Grad-CAM on positive gradients).
    return torch.ones_like(s), torch.zeros_like(s)


def _logistic(s: torch.Tensor, p: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # f' = p(1-p), f'' = p(1-p)(1-2p), f''' = p(1-p)(1-6p+6p^2); the common factor drops out.
    return 1.0 - 2.0 * p, 1.0 - 6.0 * p + 6.0 * p * p


def _softmax_marker(s: torch.Tensor, p: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    raise RuntimeError("alpha_fn='softmax' uses every logit's gradient: see softmax_channel_weights")


#: The named output functions of the generalised alpha (option ``alpha_fn``). A callable
#: ``f`` (a smooth scalar function of the score, written in torch) is accepted too.
ALPHA_FUNCTIONS: dict[str, _Derivs] = {
    "exp": _exp,
    "identity": _identity,
    "sigmoid": _logistic,
    "softmax": _softmax_marker,
}


def _safe_ratio(d2: torch.Tensor, d3: torch.Tensor) -> torch.Tensor:
    tiny = torch.finfo(torch.float32).tiny ** 0.5
    # f'' = 0 (p = 0.5 exactly): r is +-inf; keep its sign and make it huge.
    safe_d2 = torch.where(d2.abs() < tiny, torch.where(d2 < 0, -tiny, tiny), d2)
    return d3 / safe_d2


def alpha_ratio(name: str, score: torch.Tensor, prob: torch.Tensor | None,
                beta: float = 1.0) -> torch.Tensor:
    """``r = f'''(S) / f''(S)`` per sample, in float32.

    Args:
        name: one of :data:`ALPHA_FUNCTIONS` except ``softmax``.
        score: target scores ``(N,)``.
        prob: ``(N,)`` probability used by ``sigmoid`` (ignored otherwise).
        beta: temperature of ``exp(beta * S)``.
    """
    score = score.float()
    p = prob.float() if prob is not None else torch.zeros_like(score)
    d2, d3 = ALPHA_FUNCTIONS[name](score, p, beta)
    return _safe_ratio(d2, d3)


def callable_ratio(fn: Callable[[torch.Tensor], torch.Tensor], score: torch.Tensor) -> torch.Tensor:
    """``r = f'''(S) / f''(S)`` per sample for a smooth callable ``f``, by autograd.

    ``f`` is applied to each sample's scalar score (in float64), and differentiated three
    times by repeated backward. ``f`` must increase at the score (``f' > 0``): then
    ``f'(S)`` is a positive factor of ``Y' = f'(S) g`` that drops out of the channel weights.

    Raises:
        ValueError: ``f`` does not return one value per score, leaves autograd, does not
            increase at a score, or has non-finite derivatives there.
    """
    s = score.detach().double().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(s)
        if not isinstance(y, torch.Tensor) or y.shape != s.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"alpha_fn callable returned {got} for scores of shape {tuple(s.shape)}; "
                             "it must map each score to one value, element-wise, in torch.")
        if not y.requires_grad:
            raise ValueError("alpha_fn callable does not depend on the score through torch "
                             "autograd; write it with torch operations (e.g. lambda s: torch.exp(2 * s)).")
        (d1,) = torch.autograd.grad(y.sum(), s, create_graph=True)
        if not d1.requires_grad:  # f'' = 0 everywhere: the limit r -> 0 (alpha = 1/2)
            d2 = d3 = torch.zeros_like(s)
        else:
            (d2,) = torch.autograd.grad(d1.sum(), s, create_graph=True)
            if not d2.requires_grad:
                d3 = torch.zeros_like(d2)
            else:
                (d3,) = torch.autograd.grad(d2.sum(), s)
    if not bool((d1.detach() > 0).all()):
        bad = score[(d1.detach() <= 0).cpu()].tolist()
        raise ValueError(f"alpha_fn callable is not increasing at the score(s) {bad} (f' <= 0): an "
                         "output function must grow with the score it explains (like exp or "
                         "sigmoid), or the explanation's sign is reversed.")
    if not bool(torch.isfinite(d2).all() & torch.isfinite(d3).all()):
        raise ValueError("alpha_fn callable has non-finite second or third derivatives at the "
                         f"scores {score.tolist()}; use a smooth function that is finite there.")
    return _safe_ratio(d2.detach().float(), d3.detach().float())


def alpha_from_denominator(denom: torch.Tensor) -> torch.Tensor:
    """The guarded alpha ``1 / denom``, continuous everywhere, in ``[0, 1]`` (module docstring)."""
    return torch.where(denom >= 1.0, 1.0 / denom.clamp_min(1.0),
                       torch.where(denom >= 0.0, torch.ones_like(denom),
                                   1.0 / (1.0 - denom.clamp_max(0.0))))


def generalized_alpha(grad: torch.Tensor, act_sum: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Generalised Grad-CAM++ alpha with the continuous guard, in float32.

    Args:
        grad: ``G`` of shape ``(N, K, *s)``.
        act_sum: ``sum_pos(A)`` of shape ``(N, K)``.
        ratio: ``r`` of shape ``(N,)`` from :func:`alpha_ratio` or :func:`callable_ratio`.

    Returns:
        alpha of the shape of ``grad``, in ``[0, 1]``, 0 where ``grad == 0``.
    """
    g = grad.float()
    extra = (1,) * (g.ndim - 2)
    denom = 2.0 + ratio.view(-1, 1, *extra) * g * act_sum.float().view(*act_sum.shape, *extra)
    alpha = alpha_from_denominator(denom)
    return torch.where(g == 0, torch.zeros_like(alpha), alpha)


def alpha_channel_weights(grad: torch.Tensor, act_sum: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """Channel weights ``w_k = sum_pos(alpha * relu(G))`` of shape ``(N, K)``, in float32.

    Equal to ``(generalized_alpha(G, sum_pos(A), r) * relu(G)).flatten(2).sum(-1)`` but in
    fewer passes over the (large) gradient: only positions with ``G > 0`` contribute, and
    there the denominator ``2 + r * g * sum_pos(A)`` can be formed from ``relu(G)``. Where
    every ``r * sum_pos(A_k) >= 0`` (post-ReLU activations with ``exp``: the published
    method) the denominator is at least 2, the guard never acts, and
    ``w_k = sum_pos(relu(g) / (2 + c_k relu(g)))`` is taken in four passes.
    """
    gp = torch.relu(grad.float())
    n, k = gp.shape[:2]
    coef = (ratio.view(-1, 1) * act_sum.float()).view(n, k, *(1,) * (gp.ndim - 2))
    denom = gp * coef
    denom.add_(2.0)
    if bool((coef >= 0).all()):
        return gp.div_(denom).flatten(2).sum(-1)
    return alpha_from_denominator(denom).mul_(gp).flatten(2).sum(-1)


def softmax_channel_weights(grads: torch.Tensor, act_sum: torch.Tensor, probs: torch.Tensor,
                            classes: torch.Tensor) -> torch.Tensor:
    """Channel weights of the true softmax alpha, ``(N, K)``, in float32.

    Args:
        grads: per-logit gradients ``dz_j/dA`` stacked as ``(J, N, K, *s)`` (J logits).
        act_sum: ``sum_pos(A)`` of shape ``(N, K)``.
        probs: softmax probabilities ``(N, J)``.
        classes: the explained class per sample ``(N,)``.

    Returns:
        ``w_k = sum_pos(alpha * relu(Y'))`` with ``Y' = p_c a`` (``p_c`` drops out) and
        ``alpha = Y'' / (2 Y'' + sum_pos(A_k) Y''')`` under the continuous guard.
    """
    g = grads.float()
    n_logits, n = g.shape[:2]
    extra = (1,) * (g.ndim - 2)
    p = probs.float().t().reshape(n_logits, n, *extra)  # (J, N, 1, ...)
    m = (p * g).sum(0)
    d = g - m
    s2 = (p * d * d).sum(0)
    k3 = (p * d * d * d).sum(0)
    idx = classes.view(1, n, *extra).expand(1, *g.shape[1:])
    a = g.gather(0, idx).squeeze(0) - m
    y2 = a * a - s2
    y3 = a * a * a - 3.0 * a * s2 - k3
    sum_a = act_sum.float().view(*act_sum.shape, *extra[1:])
    t = sum_a * _safe_ratio(y2, y3)
    alpha = alpha_from_denominator(2.0 + t)
    alpha = torch.where(a == 0, torch.zeros_like(alpha), alpha)
    return (alpha * torch.relu(a)).flatten(2).sum(-1)
