"""The Grad-CAM++ alpha, generalised to any smooth output function (ICAM_SPEC section 1).

For a network that is piecewise linear after the hooked layer, ``S`` is locally linear in
the activation ``A``; with ``Y = f(S)`` and ``g = dS/dA``::

    alpha = f''(S) g^2 / (2 f''(S) g^2 + sum_pos(A_k) f'''(S) g^3)
          = 1 / (2 + r * g * sum_pos(A_k)),      r = f'''(S) / f''(S)

Each output function is described by the pair ``(d2, d3)`` proportional to
``(f''(S), f'''(S))`` with the same positive factor, so ``r = d3 / d2`` never needs
``exp(S)`` itself and ``f'' = 0`` (sigmoid at p = 0.5) is handled without a division by zero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["ALPHA_FUNCTIONS", "alpha_channel_weights", "alpha_ratio", "generalized_alpha"]

ALPHA_EPS = 1e-7

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


ALPHA_FUNCTIONS: dict[str, _Derivs] = {
    "exp": _exp,
    "identity": _identity,
    "sigmoid": _logistic,
    "softmax": _logistic,
}


def alpha_ratio(name: str, score: torch.Tensor, prob: torch.Tensor | None,
                beta: float = 1.0) -> torch.Tensor:
    """``r = f'''(S) / f''(S)`` per sample, in float32.

    Args:
        name: one of :data:`ALPHA_FUNCTIONS`.
        score: target scores ``(N,)``.
        prob: ``(N,)`` probability used by ``sigmoid``/``softmax`` (ignored otherwise).
        beta: temperature of ``exp(beta * S)``.
    """
    score = score.float()
    p = prob.float() if prob is not None else torch.zeros_like(score)
    d2, d3 = ALPHA_FUNCTIONS[name](score, p, beta)
    tiny = torch.finfo(torch.float32).tiny ** 0.5
    # f'' = 0 (p = 0.5 exactly): r is +-inf; keep its sign and make it huge.
    safe_d2 = torch.where(d2.abs() < tiny, torch.where(d2 < 0, -tiny, tiny), d2)
    return d3 / safe_d2


def generalized_alpha(grad: torch.Tensor, act_sum: torch.Tensor, ratio: torch.Tensor,
                      eps: float = ALPHA_EPS) -> torch.Tensor:
    """Generalised Grad-CAM++ alpha with the spec's guards, in float32.

    Args:
        grad: ``G`` of shape ``(N, K, *s)``.
        act_sum: ``sum_pos(A)`` of shape ``(N, K)``.
        ratio: ``r`` of shape ``(N,)`` from :func:`alpha_ratio`.
        eps: denominators ``<= eps`` (or negative) fall back to alpha = 1/2.

    Returns:
        alpha of the shape of ``grad``, in ``[0, 1]``, 0 where ``grad == 0``.
    """
    g = grad.float()
    extra = (1,) * (g.ndim - 2)
    denom = 2.0 + ratio.view(-1, 1, *extra) * g * act_sum.float().view(*act_sum.shape, *extra)
    safe = torch.where(denom > eps, denom, torch.ones_like(denom))
    alpha = torch.where(denom > eps, 1.0 / safe, torch.full_like(denom, 0.5))
    alpha = torch.where(g == 0, torch.zeros_like(alpha), alpha)
    return alpha.clamp_(0.0, 1.0)


def alpha_channel_weights(grad: torch.Tensor, act_sum: torch.Tensor, ratio: torch.Tensor,
                          eps: float = ALPHA_EPS) -> torch.Tensor:
    """Channel weights ``w_k = sum_pos(alpha * relu(G))`` of shape ``(N, K)``, in float32.

    Equal to ``(generalized_alpha(G, sum_pos(A), r) * relu(G)).flatten(2).sum(-1)`` but in
    fewer passes over the (large) gradient: only positions with ``G > 0`` contribute, and
    there the denominator ``2 + r * g * sum_pos(A)`` can be formed from ``relu(G)``.
    """
    gp = torch.relu(grad.float())
    n, k = gp.shape[:2]
    coef = (ratio.view(-1, 1) * act_sum.float()).view(n, k, *(1,) * (gp.ndim - 2))
    alpha = gp * coef
    alpha.add_(2.0)
    invalid = alpha <= eps  # fall back to alpha = 1/2
    alpha.reciprocal_().clamp_(max=1.0).masked_fill_(invalid, 0.5)
    return alpha.mul_(gp).flatten(2).sum(-1)
