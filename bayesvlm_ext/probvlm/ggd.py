"""The generalised Gaussian of ProbVLM (SPEC.md section 9): its parameters, negative log-density and variance.

GGD(mu, alpha, beta) has density beta / (2 alpha Gamma(1/beta)) exp(-(|x - mu| / alpha)^beta) per dimension.
`ggd_nll` and `ggd_variance` check their arguments; the `_unchecked` forms are the same arithmetic for the
adapter and the loss, whose inputs are positive by construction (no check, no device synchronisation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .._validation import check_tensor

__all__ = ["GGDParams", "ggd_nll", "ggd_variance", "ggd_nll_unchecked", "ggd_variance_unchecked"]


class GGDParams(NamedTuple):
    """A generalised Gaussian per dimension."""

    mu: Tensor  # [N, D]
    alpha: Tensor  # [N, D] scale, > 0
    beta: Tensor  # [N, D] shape, > 0 (2: Gaussian, 1: Laplace)


def ggd_nll(
    x: Tensor,  # [...] observations
    mu: Tensor,  # [...] (broadcastable) location
    alpha: Tensor,  # [...] scale, > 0
    beta: Tensor,  # [...] shape, > 0
) -> Tensor:  # [...] -log p(x), elementwise
    """Negative log-density of GGD(mu, alpha, beta): (|x - mu| / alpha)^beta + log(2 alpha Gamma(1/beta) / beta).

    The whole density, constants included (scipy.stats.gennorm(beta, mu, alpha).logpdf is its negative).
    Finite with finite gradients at x == mu for every beta > 0 (where |x - mu|^beta has an infinite
    slope for beta < 1, the gradient of |.| at 0 is taken as 0); no clamp hides large residuals.
    """
    for name, t in (("x", x), ("mu", mu), ("alpha", alpha), ("beta", beta)):
        check_tensor(name, t)
    for name, t in (("alpha", alpha), ("beta", beta)):
        if t.numel() and not bool((t > 0).all()):
            raise ValueError(f"argument '{name}' must be positive")
    return ggd_nll_unchecked(x, mu, alpha, beta)


def ggd_nll_unchecked(x: Tensor, mu: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:  # [...]
    """`ggd_nll` without its argument checks (alpha and beta must be positive)."""
    u = (x - mu).abs() / alpha
    positive = u > 0
    # Two wheres: the power is never evaluated at 0, so no 0 * inf reaches the gradient.
    powered = torch.where(positive, torch.where(positive, u, torch.ones_like(u)).pow(beta), torch.zeros_like(u))
    return powered + torch.log(alpha) - torch.log(beta) + torch.lgamma(1 / beta) + math.log(2.0)


def ggd_variance(
    alpha: Tensor,  # [...] scale, > 0
    beta: Tensor,  # [...] shape, > 0
) -> Tensor:  # [...] alpha^2 Gamma(3/beta) / Gamma(1/beta)
    """The variance of GGD(mu, alpha, beta), elementwise; the Gamma ratio through lgamma, so it stays
    finite wherever the result is representable."""
    check_tensor("alpha", alpha)
    check_tensor("beta", beta)
    if beta.numel() and not bool((beta > 0).all()):
        raise ValueError("argument 'beta' must be positive")
    return ggd_variance_unchecked(alpha, beta)


def ggd_variance_unchecked(alpha: Tensor, beta: Tensor) -> Tensor:  # [...]
    """`ggd_variance` without its argument checks (beta must be positive)."""
    return alpha * alpha * torch.exp(torch.lgamma(3 / beta) - torch.lgamma(1 / beta))

