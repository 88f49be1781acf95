"""The published naive formulation in plain PyTorch.

The literal formulas as published, favouring clarity over speed: dense per-item work and, for the
diagonal variance, three GEMMs of size N x M x D (SPEC.md sections 3, 4 and 6). They are the
"naive PyTorch" baselines of the benchmarks and independent oracles of the tests. The PyTorch twins
of the compiled ops (the fallback of `bayesvlm_ext.ops`) are a separate, private module.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._validation import accumulation_dtype

__all__ = ["embedding_variance_diag", "cosine_moments_diag", "kfac_factors_per_sample"]


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


def kfac_factors_per_sample(
    features: Tensor,  # [N, P]
    embeddings: Tensor,  # [N, D] unnormalised sources g
    targets: Tensor,  # [N, D] paired targets
    likelihood: str = "infonce",  # or "siglip"
    logit_scale: float = math.log(100.0),
    logit_bias: float = 0.0,
    class_batch_size: int = 32768,
    bias: bool = False,
) -> tuple[Tensor, Tensor]:  # A [p, p], B [D, D] float64
    """The published formulation of SPEC.md section 6: one D x D matrix H_i = J_i M_i J_i per source,
    O(N C D^2) in all. The oracle of `bayesvlm_ext.kfac_factors` (and its benchmark baseline)."""
    s = math.exp(float(logit_scale))
    x = features.to(torch.float64)
    if bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    g_all, y_all = embeddings.to(torch.float64), targets.to(torch.float64)
    n, d = g_all.shape
    eye = torch.eye(d, dtype=torch.float64, device=g_all.device)
    B = torch.zeros(d, d, dtype=torch.float64, device=g_all.device)
    for start in range(0, n, class_batch_size):
        y = y_all[start:start + class_batch_size]
        y = y / y.norm(dim=1, keepdim=True)
        for g in g_all[start:start + class_batch_size]:
            norm = g.norm()
            u = g / norm
            J = (eye - torch.outer(u, u)) / norm
            z = s * (y @ u)
            if likelihood == "infonce":
                p = torch.softmax(z, dim=0)
                m = y.T @ p
                M = s * s * (y.T @ (p[:, None] * y) - torch.outer(m, m))
            else:
                sig = torch.sigmoid(z + float(logit_bias))
                M = s * s * (y.T @ ((sig * (1 - sig))[:, None] * y))
            B += J @ M @ J
    root = math.sqrt(n)
    return x.T @ x / root, B / root
