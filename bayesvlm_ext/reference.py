"""The published naive formulation in plain PyTorch.

These functions are the pure-PyTorch fallback when the compiled extension is missing, the oracle
the compiled kernels are tested against, and the "naive PyTorch" baseline of the benchmarks.
They favour the literal formula over speed: dense per-item work and, for the diagonal variance,
three GEMMs of size N x M x D (SPEC.md sections 3 and 4).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import accumulation_dtype

__all__ = ["kron_quadform", "embedding_variance_diag", "cosine_moments_diag"]


def kron_quadform(
    phi: Tensor,  # [N, P], any floating dtype
    C: Tensor,  # [P, P], the accumulation dtype of phi
) -> Tensor:  # [N], C's dtype
    """alpha[i] = phi[i]^T C phi[i] (SPEC.md section 3), accumulated in C's dtype."""
    x = phi.to(C.dtype)
    return ((x @ C) * x).sum(-1)


def embedding_variance_diag(
    phi: Tensor,  # [N, P] features (with the constant 1 appended when the layer has a bias)
    A_inv: Tensor,  # [P, P] A_d^-1
    B_inv: Tensor,  # [D, D] B_d^-1
) -> Tensor:  # [N, D] per-dimension variances alpha_i * diag(B_d^-1)
    """The published "diag" embedding variance, one einsum per item (SPEC.md section 3)."""
    x = phi.to(A_inv.dtype)
    alpha = torch.einsum("ni,ij,nj->n", x, A_inv, x)
    return alpha[:, None] * torch.diagonal(B_inv)[None, :]


def cosine_moments_diag(
    mean_img: Tensor,  # [N, D]
    var_img: Tensor,  # [N, D] per-dimension variances
    mean_txt: Tensor,  # [M, D]
    var_txt: Tensor,  # [M, D]
    logit_scale: float,  # log of the scale s, as stored in CLIP models
    logit_bias: float = 0.0,
) -> tuple[Tensor, Tensor]:  # mean [N, M], var [N, M]
    """Logit mean and variance with diagonal covariances, as published: three N x M x D GEMMs."""
    dtype = accumulation_dtype(torch.promote_types(mean_img.dtype, mean_txt.dtype))
    mx, vx, my, vy = (t.to(dtype) for t in (mean_img, var_img, mean_txt, var_txt))
    dot_mean = mx @ my.T
    dot_var = (mx * mx) @ vy.T + vx @ (my * my).T + vx @ vy.T
    sq_norm_img = (mx * mx).sum(-1) + vx.sum(-1)
    sq_norm_txt = (my * my).sum(-1) + vy.sum(-1)
    norms = sq_norm_img[:, None] * sq_norm_txt[None, :]
    scale = math.exp(float(logit_scale))
    return scale * dot_mean / norms.sqrt() + float(logit_bias), scale**2 * dot_var / norms
