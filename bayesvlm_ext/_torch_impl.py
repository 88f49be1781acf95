"""The differentiable plain-PyTorch twins of the compiled ops.

One function per op of `torch.ops.bayesvlm_ext`, of the same name and argument conventions
(csrc/moments.h): `kron_quadform`, `item_stats`, `item_stats_exact`, `pairwise_moments` and
`topk_moments`, plus the ranking rule they share (`topk_scores`, `topk_order`). `bayesvlm_ext.ops`
falls back to them when no compiled kernel serves a device (or a gradient must flow), and the tests
check the kernels against them. `topk_moments` streams over the gallery in chunks like the kernels do.
The published naive formulation (the benchmarks' baselines) is `bayesvlm_ext.reference`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kron_quadform", "item_stats", "item_stats_exact", "pairwise_moments", "topk_scores", "topk_order",
           "topk_moments"]

PI_OVER_8 = math.pi / 8
STAT_COLUMNS = ("inv_norm", "alpha", "quad")  # the [rows, 3] per-item stats of the pairwise ops


def kron_quadform(
    phi: Tensor,  # [N, P], any floating dtype
    C: Tensor,  # [P, P], the accumulation dtype of phi
) -> Tensor:  # [N], C's dtype
    """alpha[i] = phi[i]^T C phi[i] (SPEC.md section 3), accumulated in C's dtype."""
    x = phi.to(C.dtype)
    return ((x @ C) * x).sum(-1)


def item_stats(
    phi: Tensor,  # [N, P] any floating dtype
    weight: Tensor,  # [D, P] accumulation dtype
    bias: Tensor | None,  # [D]
    residual: Tensor | None,  # [N, D]
    A_inv: Tensor,  # [P, P], or [P+1, P+1] with a bias (the constant 1 is the last feature)
    B_cross: Tensor | None,  # [D, D]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # mean [N, D], alpha [N], sq_norm [N], cross_quad [N] or [0]
    """Per-item statistics of one tower (SPEC.md section 3): the embedding mean, alpha = phi^T A_inv phi,
    ||mean||^2 and mean^T B_cross mean, accumulated in A_inv's dtype."""
    x, mean, sq_norm, cross_quad = _tower_mean_stats(phi, weight, bias, residual, B_cross, A_inv.dtype)
    return mean, ((x @ A_inv) * x).sum(-1), sq_norm, cross_quad


def _tower_mean_stats(phi, weight, bias, residual, B_cross, dtype):
    """([phi, 1] or phi [N, p], mean [N, D], ||mean||^2 [N], mean^T B_cross mean [N] or [0]) in `dtype`."""
    x = phi.to(dtype)
    mean = x @ weight.T
    if bias is not None:
        mean = mean + bias
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    if residual is not None:
        mean = mean + residual.to(mean.dtype)
    cross_quad = ((mean @ B_cross) * mean).sum(-1) if B_cross is not None else mean.new_empty(0)
    return x, mean, (mean * mean).sum(-1), cross_quad


def item_stats_exact(
    phi: Tensor,  # [N, P] any floating dtype
    weight: Tensor,  # [D, P] accumulation dtype
    bias: Tensor | None,  # [D]
    residual: Tensor | None,  # [N, D]
    Qa: Tensor,  # [p, p] eigenvectors of A, p = P (+ 1 with a bias)
    K: Tensor,  # [p, D] 1 / (n a_i e_j + lambda)
    B_cross: Tensor | None,  # [D, D]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # mean [N, D], k [N, D], sq_norm [N], cross_quad [N] or [0]
    """item_stats for damping "exact" (SPEC.md section 3): k = (z * z) K with z = [phi, 1] Qa."""
    x, mean, sq_norm, cross_quad = _tower_mean_stats(phi, weight, bias, residual, B_cross, Qa.dtype)
    z = x @ Qa
    return mean, (z * z) @ K, sq_norm, cross_quad


def _pair_logit_moments(x, y, x_stats, y_stats, x_var, y_var, scale, bias, trace_cross, x_proj=None, y_proj=None):
    """mean, var [n, m] of the logits of every pair (SPEC.md section 4; conventions in csrc/moments.h)."""
    dtype = x_stats.dtype
    x, y = x.to(dtype), y.to(dtype)
    inv_x, alpha_x, quad_x = x_stats[:, :3].unbind(1)
    inv_y, alpha_y, quad_y = y_stats[:, :3].unbind(1)
    dots = x @ y.T
    if x_var is not None:
        dot_var = x_var @ y_var.T
    else:
        dot_var = quad_x[:, None] * alpha_y[None, :] + alpha_x[:, None] * (quad_y + trace_cross * alpha_y)[None, :]
    if x_proj is not None:  # the projected variance: the radial part of each side removed (SPEC.md section 4)
        inv_mu_x, r_x = x_stats[:, 3], x_stats[:, 4]
        inv_mu_y, r_y = y_stats[:, 3], y_stats[:, 4]
        mu_x, mu_y = 1 / inv_mu_x, 1 / inv_mu_y  # ||mu||
        cos = dots * inv_mu_x[:, None] * inv_mu_y[None, :]
        radial = r_x[:, None] * (mu_y * mu_y)[None, :] + (mu_x * mu_x)[:, None] * r_y[None, :]
        h = (x_proj @ y.T) * mu_y[None, :] + mu_x[:, None] * (x @ y_proj.T)
        dot_var = dot_var + cos * (cos * radial - 2 * h)
        dot_var = torch.where(dot_var < 0, torch.zeros_like(dot_var), dot_var)  # round-off below 0; NaN stays
    c = inv_x[:, None] * inv_y[None, :]
    return scale * dots * c + bias, (scale * scale) * dot_var * (c * c)


def pairwise_moments(
    x: Tensor,  # [N, D]
    y: Tensor,  # [M, D], x's dtype
    x_stats: Tensor,  # [N, 3] (inv_norm, alpha, quad), accumulation dtype
    y_stats: Tensor,  # [M, 3]
    x_var: Tensor | None,  # [N, K] var features, or None for the Kronecker closed form
    y_var: Tensor | None,  # [M, K]
    scale: float,  # s = exp(logit_scale)
    bias: float,
    trace_cross: float,
    output: int,  # 0 mean, 1 probit logit, 2 sigmoid probit
    x_proj: Tensor | None = None,  # [N, D] S_x u_x of the "projected" variance (stats then [N, 5])
    y_proj: Tensor | None = None,  # [M, D] S_y u_y
) -> tuple[Tensor, Tensor]:  # first [N, M], var [N, M]
    """Logit moments of every pair, written out densely (SPEC.md sections 4 and 5)."""
    mean, var = _pair_logit_moments(x, y, x_stats, y_stats, x_var, y_var, scale, bias, trace_cross, x_proj, y_proj)
    if output == 0:
        return mean, var
    probit = mean / torch.sqrt(1 + PI_OVER_8 * var)
    return (probit if output == 1 else torch.sigmoid(probit)), var


def topk_scores(mean: Tensor, var: Tensor, score: int, kappa: float) -> Tensor:
    """The ranking key of SPEC.md section 7: mean, mean -/+ kappa sd, or the probit logit (score 0-3)."""
    if score == 0:
        return mean
    if score in (1, 2):
        return mean + (kappa if score == 2 else -kappa) * var.sqrt()
    return mean / torch.sqrt(1 + PI_OVER_8 * var)


def topk_order(
    key: Tensor,  # [N, C] ranking keys
) -> Tensor:  # [N, C] int64: per row, the columns from best to worst
    """The top-k order of SPEC.md sections 7 and 12, as every backend ranks: key descending, a NaN key
    after every other key (-inf included), equal keys by the lower column. torch.sort alone would put
    NaN first. Two stable sorts: by key with NaN as -inf (+0 turns -0 into 0, which a radix sort would
    order apart), then the NaN columns to the back."""
    nan = key.isnan()
    by_key = torch.sort(key.masked_fill(nan, -math.inf) + 0.0, dim=1, descending=True, stable=True).indices
    nan_back = torch.sort(nan.gather(1, by_key).to(torch.uint8), dim=1, stable=True).indices
    return by_key.gather(1, nan_back)


def topk_moments(
    x: Tensor,  # [N, D] queries
    y: Tensor,  # [M, D] gallery, x's dtype
    x_stats: Tensor,  # [N, 3]
    y_stats: Tensor,  # [M, 3]
    x_var: Tensor | None,  # [N, K]
    y_var: Tensor | None,  # [M, K]
    scale: float,
    bias: float,
    trace_cross: float,
    k: int,
    score: int,  # 0 mean, 1 pessimistic, 2 optimistic, 3 probit
    kappa: float,
    x_proj: Tensor | None = None,  # [N, D] ("projected" variance)
    y_proj: Tensor | None = None,  # [M, D]
    chunk: int = 8192,  # gallery rows scored at a time: memory O(N (k + chunk))
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, indices, mean, var: [N, k] each
    """The k best gallery items per query, ties to the lower index, streaming over the gallery.

    Values are the scores, except for score 3 ("probit"), ranked by the probit logit t and returned
    as sigmoid(t). Each chunk's candidates are appended after the running ones (which all have lower
    indices) and `topk_order` keeps the first k: exactly that order of the dense scores (NaN last).
    """
    n = x.shape[0]
    dtype = x_stats.dtype
    best = [x_stats.new_empty(n, 0), torch.empty(n, 0, dtype=torch.long, device=x.device),
            x_stats.new_empty(n, 0), x_stats.new_empty(n, 0)]  # key, index, mean, var
    for g0 in range(0, y.shape[0], chunk):
        rows = slice(g0, g0 + chunk)
        mean, var = _pair_logit_moments(x, y[rows], x_stats, y_stats[rows], x_var,
                                        None if y_var is None else y_var[rows], scale, bias, trace_cross, x_proj,
                                        None if y_proj is None else y_proj[rows])
        key = topk_scores(mean, var, score, kappa)
        index = torch.arange(g0, g0 + mean.shape[1], device=x.device).expand(n, -1)
        merged = [torch.cat([b, c], dim=1) for b, c in zip(best, (key, index, mean, var))]
        order = topk_order(merged[0])[:, :k]
        best = [t.gather(1, order) for t in merged]
    key, index, mean, var = (t[:, :k] for t in best)
    values = torch.sigmoid(key) if score == 3 else key
    return values.to(dtype), index, mean, var
