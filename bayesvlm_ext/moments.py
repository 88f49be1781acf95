"""Mean and variance of the logits of cosine similarities between two batches (SPEC.md section 4)."""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from . import ops
from ._validation import accumulation_dtype, check_finite_scalar, parse_enum
from .distribution import CovarianceForm, EmbeddingDistribution


class Variant(str, Enum):
    KRON = "kron"  # exact under Kronecker-form covariances: one GEMM plus per-item scalars
    EXACT = "exact"  # exact for kron- and eigen-form covariances, through the shared eigenbases
    DIAG = "diag"  # per-dimension variances only: the published approximation (exact for diag forms)


def cosine_moments(
    img: EmbeddingDistribution,  # N image embeddings
    txt: EmbeddingDistribution,  # M text embeddings
    logit_scale: float | Tensor,  # log s, as stored in open_clip and Hugging Face models
    logit_bias: float | Tensor = 0.0,  # beta (SigLIP); 0 for CLIP
    variant: str | Variant | None = None,
) -> tuple[Tensor, Tensor]:  # mean [N, M], var [N, M]
    """Mean and variance of the logits `s * cos(x_i, y_j) + beta` (SPEC.md section 4).

    `variant`: "kron" needs both inputs in kron form; "exact" takes kron or eigen forms; "diag"
    uses only the per-dimension variances of each input (the published approximation for BayesVLM,
    exact for diagonal covariances such as ProbVLM's). None picks "kron" when both are kron,
    "diag" when either is diagonal, else "exact": the exact result for the structures given.

    Float32 results (float64 when both means are float64); fp16/bf16 inputs are accumulated in float32.
    """
    if not isinstance(img, EmbeddingDistribution) or not isinstance(txt, EmbeddingDistribution):
        raise ValueError("arguments 'img' and 'txt' must be EmbeddingDistribution instances, got "
                         f"{type(img).__name__} and {type(txt).__name__}")
    if img.dim != txt.dim:
        raise ValueError(f"arguments 'img' and 'txt' must have one embedding size D, got {img.dim} and {txt.dim}")
    if img.device != txt.device:
        raise ValueError(f"arguments 'img' and 'txt' must be on one device, got {img.device} and {txt.device}")
    scale = math.exp(check_finite_scalar("logit_scale", logit_scale))
    bias = check_finite_scalar("logit_bias", logit_bias)
    variant = _choose_variant(img.form, txt.form) if variant is None else parse_enum("variant", variant, Variant)

    dtype = accumulation_dtype(torch.promote_types(img.mean.dtype, txt.mean.dtype))
    img, txt = img.to(dtype), txt.to(dtype)
    mx, my = img.mean, txt.mean
    if variant is Variant.KRON:
        if img.form is not CovarianceForm.KRON or txt.form is not CovarianceForm.KRON:
            raise ValueError(f"variant 'kron' needs kron-form inputs, got '{img.form.value}' and '{txt.form.value}'")
        dot_var = _kron_dot_variance(img, txt)
    elif variant is Variant.EXACT:
        if CovarianceForm.DIAG in (img.form, txt.form):
            raise ValueError("variant 'exact' needs kron- or eigen-form inputs; use variant 'diag' for diagonal ones")
        dot_var = _eigen_dot_variance(img, txt)
    else:
        dot_var = _diag_dot_variance(img, txt)
    sq_norm_img = (mx * mx).sum(-1) + img.trace()  # E||x||^2
    sq_norm_txt = (my * my).sum(-1) + txt.trace()
    norms = sq_norm_img[:, None] * sq_norm_txt[None, :]
    mean = (scale * (mx @ my.T)) / norms.sqrt() + bias
    var = (scale * scale) * dot_var / norms
    return mean, var


def _choose_variant(form_img: CovarianceForm, form_txt: CovarianceForm) -> Variant:
    if form_img is CovarianceForm.KRON and form_txt is CovarianceForm.KRON:
        return Variant.KRON
    if CovarianceForm.DIAG in (form_img, form_txt):
        return Variant.DIAG
    return Variant.EXACT


def _kron_dot_variance(img: EmbeddingDistribution, txt: EmbeddingDistribution) -> Tensor:  # [N, M]
    # Var[x.y] = a_y (mu_x^T By mu_x) + a_x (mu_y^T Bx mu_y) + a_x a_y tr(Bx By), with B = shared.
    quad_img = ops.kron_quadform(img.mean, txt.shared)  # [N] mu_x^T By^-1 mu_x
    quad_txt = ops.kron_quadform(txt.mean, img.shared)  # [M]
    trace_cross = (img.shared * txt.shared.T).sum()  # tr(Bx By)
    ax, ay = img.alpha, txt.alpha
    return ay[None, :] * quad_img[:, None] + ax[:, None] * (quad_txt[None, :] + trace_cross * ay[None, :])


def _eigen_dot_variance(img: EmbeddingDistribution, txt: EmbeddingDistribution) -> Tensor:  # [N, M]
    # mu_x^T S_y mu_x = ((mu_x Qy)^2) k_y ;  tr(S_x S_y) = k_x^T R k_y, R = (Qx^T Qy)^2.
    kx, qx = img.eigen_form()
    ky, qy = txt.eigen_form()
    rotated_img = img.mean @ qy  # [N, D]
    rotated_txt = txt.mean @ qx  # [M, D]
    cross = (qx.T @ qy) ** 2  # [D, D]
    # All three terms as one GEMM of inner size 2D: [(mu_x Qy)^2, k_x] . [k_y, (mu_y Qx)^2 + R k_y].
    left = torch.cat([rotated_img * rotated_img, kx], dim=1)  # [N, 2D]
    right = torch.cat([ky, (rotated_txt * rotated_txt) + ky @ cross.T], dim=1)  # [M, 2D]
    return left @ right.T


def _diag_dot_variance(img: EmbeddingDistribution, txt: EmbeddingDistribution) -> Tensor:  # [N, M]
    # sum_d mu_x^2 sy + sx mu_y^2 + sx sy = [mu_x^2, sx] . [sy, mu_y^2 + sy]: one GEMM of inner size 2D.
    vx, vy = img.diagonal_variance(), txt.diagonal_variance()
    left = torch.cat([img.mean * img.mean, vx], dim=1)
    right = torch.cat([vy, txt.mean * txt.mean + vy], dim=1)
    return left @ right.T
