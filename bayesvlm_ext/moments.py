"""Mean and variance of the logits of cosine similarities between two batches (SPEC.md section 4).

Every variant reduces to the same fused op (`ops.pairwise_moments`, conventions in csrc/moments.h):
one GEMM of the means plus, per pair, either an O(1) epilogue on per-item scalars (the Kronecker
closed form: "kron", and "diag" between kron-form inputs) or a second GEMM of inner size 2D on
per-item variance features ("exact", and "diag" with per-dimension variances). `pairwise_inputs`
builds those per-item inputs; `cosine_moments` and `retrieval.topk` share it.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from ._validation import accumulation_dtype, check_finite_scalar, check_logit_scale, parse_enum
from .covariance import CovarianceForm
from .distribution import EmbeddingDistribution


class Variant(str, Enum):
    KRON = "kron"  # exact under Kronecker-form covariances: one GEMM plus per-item scalars
    EXACT = "exact"  # exact for kron- and eigen-form covariances, through the shared eigenbases
    DIAG = "diag"  # per-dimension variances only: the published approximation (exact for diag forms)
    PROJECTED = "projected"  # the exact numerator of the forms given, with each side's radial part removed


class MomentsOutput(str, Enum):
    MEAN = "mean"  # the logit mean
    PROBIT = "probit"  # the probit-scaled logit mean / sqrt(1 + pi/8 var)
    SIGMOID_PROBIT = "sigmoid_probit"  # sigmoid of the probit-scaled logit (SigLIP match probability)


_OUTPUT_CODE = {MomentsOutput.MEAN: 0, MomentsOutput.PROBIT: 1, MomentsOutput.SIGMOID_PROBIT: 2}


class PairInputs(NamedTuple):
    """Per-item inputs of the fused pairwise ops for one (x, y) pair of batches."""

    x: Tensor  # [N, D] means, in the dtype the GEMM reads
    y: Tensor  # [M, D]
    x_stats: Tensor  # [N, 3] (inv_norm, alpha, quad), accumulation dtype
    y_stats: Tensor  # [M, 3]
    x_var: Tensor | None  # [N, 2D] variance features, or None for the Kronecker closed form
    y_var: Tensor | None  # [M, 2D]
    trace_cross: float  # tr(Bx By) of the closed form (0 with variance features)
    x_proj: Tensor | None = None  # [N, D] projection features S u ("projected"; the stats are then [N, 5])
    y_proj: Tensor | None = None  # [M, D]


def cosine_moments(
    img: EmbeddingDistribution,  # N image embeddings
    txt: EmbeddingDistribution,  # M text embeddings
    logit_scale: float | Tensor,  # log s, as stored in open_clip and Hugging Face models; at most 44 (s^2 fits float32)
    logit_bias: float | Tensor = 0.0,  # beta (SigLIP); 0 for CLIP
    variant: str | Variant | None = None,
    output: str | MomentsOutput = "mean",
) -> tuple[Tensor, Tensor]:  # first [N, M], var [N, M]
    """Mean and variance of the logits `s * cos(x_i, y_j) + beta` (SPEC.md section 4).

    `variant`: "kron" needs both inputs in kron form; "exact" takes kron or eigen forms; "diag"
    uses only the per-dimension variances of each input (the published approximation for BayesVLM,
    exact for diagonal covariances such as ProbVLM's). None picks "kron" when both are kron,
    "diag" when either is diagonal, else "exact": the exact result for the structures given.
    "projected" takes that numerator with each side's radial part projected out (SPEC.md section 4):
    it matches Monte Carlo where the published one is up to 2x off, at about 2.3x the cost; a side that
    is scored often caches its projection statistics (`EmbeddingDistribution.with_projection`).
    `output`: what the first result holds: "mean" (the logit mean), "probit" (mean / sqrt(1 + pi/8
    var)) or "sigmoid_probit" (sigmoid of that; SPEC.md section 5), computed in the same fused pass.

    Float32 results (float64 when both means are float64); fp16/bf16 means are read as they are
    and accumulated in float32. Runs the compiled kernel when there is one for the device and no
    gradient is needed; the same formulas in PyTorch otherwise (differentiable).
    """
    output = parse_enum("output", output, MomentsOutput)
    scale, bias = scale_and_bias(logit_scale, logit_bias)
    inputs = pairwise_inputs(img, txt, variant)
    return ops.pairwise_moments(*inputs[:6], scale, bias, inputs.trace_cross, _OUTPUT_CODE[output], inputs.x_proj,
                                inputs.y_proj)


def scale_and_bias(logit_scale, logit_bias) -> tuple[float, float]:
    """(s, beta); ValueError for a log s beyond LOGIT_SCALE_MAX, whose s^2 would overflow the float32 variances
    (math.exp itself raises OverflowError from 710 on)."""
    return math.exp(check_logit_scale("logit_scale", logit_scale)), check_finite_scalar("logit_bias", logit_bias)


def pairwise_inputs(
    img: EmbeddingDistribution,  # N items (the x side)
    txt: EmbeddingDistribution,  # M items (the y side)
    variant: str | Variant | None = None,
) -> PairInputs:
    """The per-item scalars or variance features of SPEC.md section 4 for `variant` (see cosine_moments).

    Uses the statistics cached on either input (`EmbeddingDistribution.precompute`) where they match.
    """
    if not isinstance(img, EmbeddingDistribution) or not isinstance(txt, EmbeddingDistribution):
        raise ValueError("arguments 'img' and 'txt' must be EmbeddingDistribution instances, got "
                         f"{type(img).__name__} and {type(txt).__name__}")
    if img.dim != txt.dim:
        raise ValueError(f"arguments 'img' and 'txt' must have one embedding size D, got {img.dim} and {txt.dim}")
    if img.device != txt.device:
        raise ValueError(f"arguments 'img' and 'txt' must be on one device, got {img.device} and {txt.device}")
    variant = _choose_variant(img.form, txt.form) if variant is None else parse_enum("variant", variant, Variant)
    if variant is Variant.PROJECTED:
        return _projected(img, txt, pairwise_inputs(img, txt, _choose_variant(img.form, txt.form)))
    if variant is Variant.KRON and (img.form is not CovarianceForm.KRON or txt.form is not CovarianceForm.KRON):
        raise ValueError(f"variant 'kron' needs kron-form inputs, got '{img.form.value}' and '{txt.form.value}'")
    if variant is Variant.EXACT and CovarianceForm.DIAG in (img.form, txt.form):
        raise ValueError("variant 'exact' needs kron- or eigen-form inputs; use variant 'diag' for diagonal ones")

    # The GEMM reads the means in their own dtype when both share one (e.g. bf16); else in the promoted one.
    x, y = img.mean, txt.mean
    if x.dtype != y.dtype:
        common = torch.promote_types(x.dtype, y.dtype)
        x, y = x.to(common), y.to(common)
    acc = accumulation_dtype(x.dtype)
    img, txt = _cast_structure(img, acc), _cast_structure(txt, acc)
    mx, my = x.to(acc), y.to(acc)
    sq_norm_x = _sq_norm(img, mx) + img.trace()  # E||x||^2
    sq_norm_y = _sq_norm(txt, my) + txt.trace()
    zeros_x, zeros_y = mx.new_zeros(mx.shape[0]), my.new_zeros(my.shape[0])

    both_kron = img.form is CovarianceForm.KRON and txt.form is CovarianceForm.KRON
    if variant is Variant.KRON or (variant is Variant.DIAG and both_kron):
        # Var[x.y] = a_y (mu_x^T By mu_x) + a_x (mu_y^T Bx mu_y) + a_x a_y tr(Bx By); "diag" keeps diag(B).
        if variant is Variant.KRON:
            quad_x, quad_y = _cross_quad(img, mx, txt.shared), _cross_quad(txt, my, img.shared)
            trace_cross = (img.shared.double() * txt.shared.double().T).sum()
        else:
            bx, by = torch.diagonal(img.shared), torch.diagonal(txt.shared)
            quad_x, quad_y = (mx * mx) @ by, (my * my) @ bx
            trace_cross = (bx.double() * by.double()).sum()
        x_stats = torch.stack([sq_norm_x.rsqrt(), img.alpha, quad_x], dim=1)
        y_stats = torch.stack([sq_norm_y.rsqrt(), txt.alpha, quad_y], dim=1)
        return PairInputs(x, y, x_stats, y_stats, None, None, float(trace_cross))

    if variant is Variant.EXACT:
        # mu_x^T S_y mu_x = ((mu_x Qy)^2) k_y ;  tr(S_x S_y) = k_x^T R k_y, R = (Qx^T Qy)^2:
        # [(mu_x Qy)^2, k_x] . [k_y, (mu_y Qx)^2 + R k_y], one GEMM of inner size 2D.
        kx, qx = img.eigen_form()
        ky, qy = txt.eigen_form()
        rotated_x, rotated_y = mx @ qy, my @ qx
        cross = (qx.T @ qy) ** 2  # [D, D]
        x_var = torch.cat([rotated_x * rotated_x, kx], dim=1)
        y_var = torch.cat([ky, rotated_y * rotated_y + ky @ cross.T], dim=1)
    else:
        # sum_d mu_x^2 sy + sx mu_y^2 + sx sy = [mu_x^2, sx] . [sy, mu_y^2 + sy]: inner size 2D.
        vx, vy = img.diagonal_variance(), txt.diagonal_variance()
        x_var = torch.cat([mx * mx, vx], dim=1)
        y_var = torch.cat([vy, my * my + vy], dim=1)
    x_stats = torch.stack([sq_norm_x.rsqrt(), zeros_x, zeros_x], dim=1)
    y_stats = torch.stack([sq_norm_y.rsqrt(), zeros_y, zeros_y], dim=1)
    return PairInputs(x, y, x_stats, y_stats, x_var.contiguous(), y_var.contiguous(), 0.0)


def _projected(img: EmbeddingDistribution, txt: EmbeddingDistribution, exact: PairInputs) -> PairInputs:
    """The inputs of the projected variance (SPEC.md section 4) on top of the exact ones of the same forms.

    With u = mu / ||mu||, Pr = I - u u^T and c = u_x . u_y, the numerator (Pr_x mu_y)^T S_x (Pr_x mu_y) +
    (Pr_y mu_x)^T S_y (Pr_y mu_x) + tr(S_x S_y) is the exact one plus
      c (c (||mu_y||^2 r_x + ||mu_x||^2 r_y) - 2 h),   r = u^T S u,
      h = ||mu_y|| (S_x u_x) . mu_y + ||mu_x|| mu_x . (S_y u_y):
    two per-item scalars (stats columns 3 and 4: 1 / ||mu|| and r), the per-item vectors S u (the projection
    features) and two GEMMs of inner size D. A side's S u costs O(N D^2) (kron form): a gallery keeps them
    from `EmbeddingDistribution.precompute(projected=True)`.
    """
    acc = exact.x_stats.dtype

    def side(dist: EmbeddingDistribution, stats: Tensor) -> tuple[Tensor, Tensor]:
        applied, inv_mu_norm, r = projection_statistics(dist, acc)
        return torch.cat([stats, inv_mu_norm[:, None], r[:, None]], dim=1).contiguous(), applied.contiguous()

    x_stats, x_proj = side(img, exact.x_stats)
    y_stats, y_proj = side(txt, exact.y_stats)
    return exact._replace(x_stats=x_stats, y_stats=y_stats, x_proj=x_proj, y_proj=y_proj)


def projection_statistics(
    dist: EmbeddingDistribution,
    dtype: torch.dtype,  # the accumulation dtype of the moments
) -> tuple[Tensor, Tensor, Tensor]:  # S u [N, D], 1 / ||mu|| [N], r = u^T S u [N]
    """What the projected variance needs of one side: from `dist.projection` when cached, else computed.
    A zero mean gives 1 / ||mu|| = inf and NaN scores, which rank last (SPEC.md section 12)."""
    cached = dist.projection
    if cached is not None and cached[0].dtype == dtype:
        return cached
    mean = dist.mean.to(dtype)
    norm = mean.norm(dim=1)
    unit = mean / norm[:, None]
    applied = dist.covariance.to(dtype).matvec(unit)
    return applied, 1 / norm, (unit * applied).sum(1)


def _choose_variant(form_img: CovarianceForm, form_txt: CovarianceForm) -> Variant:
    if form_img is CovarianceForm.KRON and form_txt is CovarianceForm.KRON:
        return Variant.KRON
    if CovarianceForm.DIAG in (form_img, form_txt):
        return Variant.DIAG
    return Variant.EXACT


def _cast_structure(dist: EmbeddingDistribution, dtype: torch.dtype) -> EmbeddingDistribution:
    """dist with every covariance tensor in `dtype` (the means are left alone: the GEMM reads them)."""
    def cast(t):
        return None if t is None else t.to(dtype)
    return EmbeddingDistribution(dist.mean, dist.covariance.to(dtype), sq_norm=cast(dist.sq_norm),
                                 cross_quad=cast(dist.cross_quad), cross_shared=dist.cross_shared)


def _sq_norm(dist: EmbeddingDistribution, mean: Tensor) -> Tensor:  # [N]
    return dist.sq_norm if dist.sq_norm is not None else (mean * mean).sum(-1)


def _cross_quad(dist: EmbeddingDistribution, mean: Tensor, shared: Tensor) -> Tensor:  # [N] mean^T shared mean
    cached = dist.cached_cross_quad(shared)
    return cached if cached is not None else ops.kron_quadform(mean, shared)
