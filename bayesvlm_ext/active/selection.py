"""Selection: a batch to label from acquisition scores, and a support set of pool items near a target
set (SPEC.md section 8).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from .._validation import accumulation_dtype, check_finite, check_positive_scalar, check_tensor, parse_enum
from ..distribution import CovarianceForm, EmbeddingDistribution
from .chunking import chunks, rows_per_chunk

__all__ = ["Selection", "Metric", "select", "nearest_neighbours"]


class Selection(str, Enum):
    TOP = "top"  # the budget highest scores
    CLASS_BALANCED = "class_balanced"  # round robin over predicted classes, best remaining item of each
    RANDOMISED = "randomised"  # sampling without replacement, probabilities softmax(scores / temperature)


class Metric(str, Enum):
    COSINE = "cosine"  # cosine of the means
    WASSERSTEIN = "wasserstein"  # 2-Wasserstein distance between the Gaussians


def select(
    scores: Tensor,  # [N] acquisition scores, higher = better
    budget: int,
    *,
    strategy: str | Selection = "top",
    predicted: Tensor | None = None,  # [N] integer predicted class per item, for "class_balanced"
    temperature: float = 1.0,  # "randomised": probabilities softmax(scores / temperature)
    generator: torch.Generator | None = None,  # seeds "randomised"
) -> Tensor:  # [budget] int64 pool indices, in the order they were picked
    """A batch of `budget` distinct pool items to label (SPEC.md section 8).

    "top": the highest scores, ties to the lower index. "class_balanced": round robin over the
    predicted classes; round r takes the r-th best item of every class that has one, best score first,
    so class counts differ by at most one until a class runs out. "randomised": stochastic acquisition
    (Kirsch et al., 2023), sampling without replacement with probabilities proportional to
    exp(scores / temperature), by the Gumbel-top-k trick: the top `budget` of scores / temperature +
    Gumbel noise are such a sample, in the order drawn (Kool et al., 2019).
    """
    check_tensor("scores", scores, dim=1)
    check_finite("scores", scores)
    n = scores.shape[0]
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= n:
        raise ValueError(f"argument 'budget' must be an int in [0, {n}] (the pool size), got {budget!r}")
    strategy = parse_enum("strategy", strategy, Selection)
    values = scores.to(torch.float64)
    if strategy is Selection.TOP:
        return torch.sort(values, descending=True, stable=True).indices[:budget]
    if strategy is Selection.RANDOMISED:
        temperature = check_positive_scalar("temperature", temperature)
        exponential = torch.empty(n, dtype=torch.float64, device=scores.device).exponential_(generator=generator)
        gumbel = -exponential.clamp_min(torch.finfo(torch.float64).tiny).log()
        return torch.sort(values / temperature + gumbel, descending=True, stable=True).indices[:budget]
    if predicted is None:
        raise ValueError("argument 'predicted' [N] (a class per item) is required by strategy 'class_balanced'")
    check_tensor("predicted", predicted, dim=1, floating=False)
    if predicted.dtype.is_floating_point or predicted.dtype.is_complex or predicted.dtype == torch.bool:
        raise ValueError(f"argument 'predicted' must hold integer classes, got {predicted.dtype}")
    if predicted.shape[0] != n or predicted.device != scores.device:
        raise ValueError(f"argument 'predicted' must be [{n}] on {scores.device} to match scores, got "
                         f"{tuple(predicted.shape)} on {predicted.device}")
    by_score = torch.sort(values, descending=True, stable=True).indices  # position = rank in score
    by_class = torch.sort(predicted[by_score], stable=True).indices  # grouped by class, best first inside
    _, counts = torch.unique_consecutive(predicted[by_score][by_class], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    rank_in_class = torch.arange(n, device=scores.device) - starts
    # Round robin = sort by (rank within class, overall score rank): one lexicographic key.
    order = torch.argsort(rank_in_class * n + by_class, stable=True)
    return by_score[by_class[order]][:budget]


def nearest_neighbours(
    pool: EmbeddingDistribution,  # N pool embeddings
    targets: EmbeddingDistribution,  # M target embeddings
    k: int,
    metric: str | Metric = "cosine",
    *,
    chunk_size: int | None = None,  # targets per chunk; None: from a memory budget
) -> tuple[Tensor, Tensor]:  # support [S] int64 (sorted, distinct), neighbours [M, k] int64
    """The pool items among the k nearest neighbours of any target: a support set (SPEC.md section 8).

    "cosine": cosine similarity of the means. "wasserstein": the 2-Wasserstein distance between the
    Gaussians, W2^2 = ||mu1 - mu2||^2 + ||sqrt(v1) - sqrt(v2)||^2. When both sides come from one
    posterior (kron or eigen forms with one eigenbasis) the covariances commute and v are their
    eigenvalues in that basis: the exact W2. Otherwise v are the diagonal variances: exact for "diag"
    forms, the diagonal approximation else. (For kron forms sharing B_d^-1 the diagonal formula gives
    the exact value too: both are (sqrt(alpha1) - sqrt(alpha2))^2 tr(B_d^-1).)
    neighbours[j] lists target j's k nearest pool items, nearest first, ties to the lower index;
    distances come from the GEMM expansion ||a||^2 + ||b||^2 - 2 a.b. Memory O(chunk N), never [M, N].
    """
    for name, value in (("pool", pool), ("targets", targets)):
        if not isinstance(value, EmbeddingDistribution):
            raise ValueError(f"argument '{name}' must be an EmbeddingDistribution, got {type(value).__name__}")
    if pool.dim != targets.dim:
        raise ValueError(f"arguments 'pool' and 'targets' must have one D, got {pool.dim} and {targets.dim}")
    if pool.device != targets.device:
        raise ValueError(f"arguments 'pool' and 'targets' must be on one device, got {pool.device} and "
                         f"{targets.device}")
    n, m = len(pool), len(targets)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"argument 'k' must be an int in [0, {n}] (the pool size), got {k!r}")
    metric = parse_enum("metric", metric, Metric)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"argument 'chunk_size' must be a positive int or None, got {chunk_size!r}")
    dtype = accumulation_dtype(torch.promote_types(pool.mean.dtype, targets.mean.dtype))
    if metric is Metric.COSINE:
        a = torch.nn.functional.normalize(pool.mean.to(dtype), dim=1)
        b = torch.nn.functional.normalize(targets.mean.to(dtype), dim=1)
    else:  # W2 is the Euclidean distance between the points [mu, sqrt(v)]
        root_pool, root_targets = _root_variances(pool, targets)
        a = torch.cat([pool.mean.to(dtype), root_pool.to(dtype)], dim=1)
        b = torch.cat([targets.mean.to(dtype), root_targets.to(dtype)], dim=1)
        sq_norm_a = (a * a).sum(1)
    neighbours = torch.empty(m, k, dtype=torch.int64, device=pool.device)
    for chunk in chunks(m, chunk_size or rows_per_chunk(max(n, 1))):
        if metric is Metric.COSINE:
            closeness = b[chunk] @ a.T  # [chunk, N]
        else:
            closeness = -((b[chunk] * b[chunk]).sum(1, keepdim=True) + sq_norm_a - 2 * b[chunk] @ a.T)
        neighbours[chunk] = torch.sort(closeness, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.unique(neighbours), neighbours


# ---- internals ------------------------------------------------------------------------------------
def _root_variances(pool: EmbeddingDistribution,
                    targets: EmbeddingDistribution) -> tuple[Tensor, Tensor]:  # [N, D], [M, D]
    """sqrt of the variances W2 compares: eigenvalues in a shared eigenbasis, else diagonal variances."""
    if CovarianceForm.DIAG not in (pool.form, targets.form):
        k_pool, basis_pool = pool.eigen_form()
        k_targets, basis_targets = targets.eigen_form()
        if basis_pool is basis_targets or (basis_pool.shape == basis_targets.shape
                                           and torch.equal(basis_pool, basis_targets.to(basis_pool.dtype))):
            return k_pool.clamp_min(0).sqrt(), k_targets.clamp_min(0).sqrt()
    return pool.diagonal_variance().clamp_min(0).sqrt(), targets.diagonal_variance().clamp_min(0).sqrt()
