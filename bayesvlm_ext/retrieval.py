"""Uncertainty-aware top-k retrieval, streamed over the gallery (SPEC.md section 7)."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from . import ops
from ._validation import check_finite_scalar, parse_enum
from .distribution import EmbeddingDistribution
from .moments import Variant, _logit_params, pairwise_inputs

__all__ = ["Score", "topk"]


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
    scale, bias = _logit_params(logit_scale, logit_bias)
    with torch.no_grad():
        inputs = pairwise_inputs(queries, gallery, variant)
        return ops.topk_moments(*inputs[:6], scale, bias, inputs.trace_cross, k, _SCORE_CODE[score], kappa)
