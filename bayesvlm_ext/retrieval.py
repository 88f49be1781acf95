"""Uncertainty-aware top-k retrieval, streamed over the gallery (SPEC.md section 7)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor

from . import ops
from ._validation import check_finite_scalar, parse_enum
from .distribution import EmbeddingDistribution
from .moments import Variant, scale_and_bias, pairwise_inputs

__all__ = ["Score", "topk", "merge_topk"]


class Score(str, Enum):
    MEAN = "mean"  # the logit mean
    PESSIMISTIC = "pessimistic"  # mean - kappa * sd
    OPTIMISTIC = "optimistic"  # mean + kappa * sd
    PROBIT = "probit"  # match probability sigmoid(mean / sqrt(1 + pi/8 var)), ranked by its logit


_SCORE_CODE = {Score.MEAN: 0, Score.PESSIMISTIC: 1, Score.OPTIMISTIC: 2, Score.PROBIT: 3}


def topk(
    queries: EmbeddingDistribution,  # N query embeddings
    gallery: EmbeddingDistribution,  # M gallery embeddings, ideally `precompute(against=queries)`d once
    k: int,
    score: str | Score = "mean",
    kappa: float = 1.0,
    *,
    logit_scale: float | Tensor,  # log s, as stored in the model
    logit_bias: float | Tensor = 0.0,
    variant: str | Variant | None = None,  # moment variant, as in cosine_moments
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, indices (int64), mean, var: [N, k] each
    """The k best gallery items per query by `score`, with the logit mean and variance at each.

    Rows are sorted by score, best first; equal scores keep the lower gallery index first, exactly
    as a stable descending sort of the dense [N, M] scores would. Nothing of size [N, M] is ever
    allocated: the compiled kernel streams the gallery in tiles (extra memory O(N k + tile)).
    For `score="probit"` the values are probabilities sigmoid(t), ranked by t = mean / sqrt(1 + pi/8
    var) itself so that saturation near 1 never reorders items.

    Statistics cached on the gallery (`gallery.precompute(against=queries)`: squared norms and the
    quadratic form with the queries' shared matrix) are used when they match; otherwise they are
    computed on the fly, which costs O(M D^2) for the "kron" variant. When the two means differ in
    dtype, both are read in the promoted dtype.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"argument 'k' must be an int, got {k!r}")
    if isinstance(gallery, EmbeddingDistribution) and not 0 <= k <= len(gallery):
        raise ValueError(f"argument 'k' must be in [0, {len(gallery)}] (the gallery size), got {k}")
    score = parse_enum("score", score, Score)
    kappa = check_finite_scalar("kappa", kappa)
    scale, bias = scale_and_bias(logit_scale, logit_bias)
    with torch.no_grad():
        inputs = pairwise_inputs(queries, gallery, variant)
        return ops.topk_moments(*inputs[:6], scale, bias, inputs.trace_cross, k, _SCORE_CODE[score], kappa,
                                inputs.x_proj, inputs.y_proj)


def merge_topk(
    candidates: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],  # per part: values, indices, mean, var [N, k_i]
    k: int,
    score: str | Score = "mean",
    kappa: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, indices (int64), mean, var: [N, k] each
    """The k best of several candidate lists per query, ranked exactly as `topk` ranks (SPEC.md section 7).

    Each part is what `topk` returns for one piece of a gallery (a shard, a rank's rows), with its
    indices already made global; a gallery index may appear at most once per query over all parts.
    The result is sorted by score, best first, equal scores with the lower gallery index first, so
    `merge_topk([topk(q, g[:a], ...) + offsets, topk(q, g[a:], ...) + offsets], k)` equals `topk(q, g, k)`
    whenever the two calls score each (query, item) pair to the same bits. Merging is associative:
    any grouping of the parts gives the same result.

    The ranking key is the one the compiled kernel compares, in the kernel's order (NaN keys last,
    SPEC.md section 12). For "mean", "pessimistic" and "optimistic" that is the value itself. For
    "probit" the values are sigmoid(t) and the key is t, which is not returned; recomputing t in
    PyTorch would differ from the kernel's t in the last bit (it contracts to a fused multiply-add) and
    reorder near-ties, so the kernel recomputes it: `pairwise_moments` with D = 1, each candidate's mean
    and variance against the unit 1, reproduces each (mean, var) exactly and gives the kernel's own
    probit logit of it. O(N C) for C candidates, done in steps of at most k + k_i columns.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"argument 'k' must be an int, got {k!r}")
    score = parse_enum("score", score, Score)
    kappa = check_finite_scalar("kappa", kappa)
    parts = _check_candidates(candidates)
    total = sum(part[0].shape[1] for part in parts)
    if not 0 <= k <= total:
        raise ValueError(f"argument 'k' must be in [0, {total}] (the candidates per query), got {k}")
    with torch.no_grad():
        if score is not Score.PROBIT:
            merged = _by_index([torch.cat(column, dim=1) for column in zip(*parts)])
            chosen = ops.topk_order(merged[0])[:, :k]
            return tuple(t.gather(1, chosen) for t in merged)
        best = _by_index(list(parts[0]))
        best = _probit_best(best, min(k, best[0].shape[1]))
        for part in parts[1:]:
            merged = _by_index([torch.cat(pair, dim=1) for pair in zip(best, part)])
            best = _probit_best(merged, min(k, merged[0].shape[1]))
        return best


def _check_candidates(candidates) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
    if isinstance(candidates, (Tensor, str)) or not isinstance(candidates, Sequence) or len(candidates) == 0:
        raise ValueError("argument 'candidates' must be a non-empty sequence of (values, indices, mean, var) tuples")
    parts = []
    for number, part in enumerate(candidates):
        if not isinstance(part, (tuple, list)) or len(part) != 4 or not all(isinstance(t, Tensor) for t in part):
            raise ValueError(f"argument 'candidates'[{number}] must be a tuple of four tensors (values, indices, "
                             "mean, var)")
        values, indices, mean, var = part
        first = parts[0] if parts else part
        for name, t in (("values", values), ("indices", indices), ("mean", mean), ("var", var)):
            if t.dim() != 2 or t.shape[0] != first[0].shape[0] or t.shape != values.shape:
                raise ValueError(f"argument 'candidates'[{number}]: '{name}' must be [N, k_i] with N = "
                                 f"{first[0].shape[0]} and the shape of values {tuple(values.shape)}, got "
                                 f"{tuple(t.shape)}")
            if t.device != first[0].device:
                raise ValueError(f"argument 'candidates'[{number}]: '{name}' must be on {first[0].device}, "
                                 f"got {t.device}")
        if indices.dtype != torch.int64:
            raise ValueError(f"argument 'candidates'[{number}]: 'indices' must be int64, got {indices.dtype}")
        for name, t in (("values", values), ("mean", mean), ("var", var)):
            if t.dtype not in (torch.float32, torch.float64) or t.dtype != first[0].dtype:
                raise ValueError(f"argument 'candidates'[{number}]: '{name}' must be float32 or float64 like the "
                                 f"first part's values ({first[0].dtype}), got {t.dtype}")
        parts.append((values, indices, mean, var))
    return parts


def _by_index(columns: list[Tensor]) -> list[Tensor]:  # values, indices, mean, var: [N, C], each row by index
    """The candidates of each query in increasing gallery index, so that a stable ranking breaks ties by index."""
    indices = columns[1]
    order = torch.sort(indices, dim=1, stable=True).indices
    columns = [t.gather(1, order) for t in columns]
    if indices.shape[1] > 1 and bool((columns[1][:, 1:] == columns[1][:, :-1]).any()):
        raise ValueError("argument 'candidates' holds one gallery index twice for a query; the parts must "
                         "cover disjoint gallery rows")
    return columns


def _probit_best(columns: list[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The k best candidates by the kernel's probit logit; `columns` sorted by index within each row."""
    values, indices, mean, var = columns
    n, c = mean.shape
    if n == 0 or c == 0 or k == 0:
        return tuple(t[:, :k] for t in columns)
    # Every (query, candidate) becomes one row of D = 1: x = mean, var feature = var, against y = 1 with
    # var feature 1 and unit stats, so the kernel's mean and variance are the candidate's own (a sum of
    # one product with 1) and its probit output is the key its top-k compared. One row per candidate
    # keeps a NaN or Inf of one candidate out of the others' keys.
    one = mean.new_ones(1, 1)
    unit = mean.new_tensor([[1.0, 0.0, 0.0]])  # inverse norm 1; alpha and quad unused with variance features
    with _ieee_fp32_matmul(mean.device):
        keys = ops.pairwise_moments(mean.reshape(-1, 1), one, unit.expand(n * c, 3).contiguous(), unit,
                                    var.reshape(-1, 1).contiguous(), one, 1.0, 0.0, 0.0, 1)[0]
    chosen = ops.topk_order(keys.reshape(n, c))[:, :k]
    # The original tensors, gathered, keep every bit (a -0.0 mean included) whatever the kernel wrote.
    return tuple(t.gather(1, chosen) for t in columns)


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """Full-precision float32 GEMMs inside (the CUDA kernel follows torch's TF32 setting, and TF32 would round
    the candidates' means before the unit-vector product could pass them through exactly)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous
