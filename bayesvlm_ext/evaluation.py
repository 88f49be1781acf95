"""Retrieval quality and its calibration: Recall@k, and recall per uncertainty bin with Spearman's rho.

The calibration check of the ProbVLM paper: sort the queries by their uncertainty into equal-count
bins; a useful uncertainty makes recall fall from the most certain bin to the least certain one, so the
Spearman rank correlation between the bins' mean uncertainty and their recall is close to -1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_finite, check_tensor
from .distribution import EmbeddingDistribution
from .retrieval import topk

__all__ = ["recall_at_k", "uncertainty_recall", "spearman", "retrieval_report"]


def recall_at_k(
    hits: Tensor,  # [N, K] bool: whether the query's j-th ranked item is relevant
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:  # {"recall@k": fraction of queries with a relevant item among their first k}
    check_tensor("hits", hits, dim=2, floating=False)
    if hits.dtype != torch.bool:
        raise ValueError(f"argument 'hits' must be a bool tensor, got {hits.dtype}")
    if hits.shape[0] == 0:
        raise ValueError("argument 'hits' must hold at least one query")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= hits.shape[1]:
            raise ValueError(f"argument 'ks' must hold ints in [1, {hits.shape[1]}] (hits [N, K]), got {k!r}")
    return {f"recall@{k}": hits[:, :k].any(dim=1).double().mean().item() for k in ks}


def spearman(
    x: Tensor,  # [B]
    y: Tensor,  # [B]
) -> float:
    """Spearman's rank correlation: Pearson's r of the ranks, ties given their average rank (scipy's
    `spearmanr`). NaN when either input is constant."""
    check_tensor("x", x, dim=1)
    check_tensor("y", y, dim=1)
    if x.shape != y.shape or x.shape[0] < 2:
        raise ValueError(f"arguments 'x' and 'y' must be [B] with one length B >= 2, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    check_finite("x", x)
    check_finite("y", y)
    rx, ry = _average_ranks(x.double()), _average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return ((rx * ry).sum() / ((rx * rx).sum() * (ry * ry).sum()).sqrt()).item()


def _average_ranks(values: Tensor) -> Tensor:  # [B] ranks 1..B, ties share their mean rank
    order = values.argsort(stable=True)
    sorted_values = values[order]
    # Tied runs: each value's rank is the mean of the first and last positions of its run.
    first = torch.searchsorted(sorted_values, sorted_values, right=False)
    last = torch.searchsorted(sorted_values, sorted_values, right=True) - 1
    ranks = torch.empty_like(values)
    ranks[order] = (first + last).double() / 2 + 1
    return ranks


def uncertainty_recall(
    uncertainty: Tensor,  # [N] one number per query, larger = less certain
    hit: Tensor,  # [N] bool: whether the query's retrieval succeeded (e.g. at rank 1)
    n_bins: int = 10,
) -> tuple[Tensor, Tensor, float]:  # bin mean uncertainty [n_bins], bin recall [n_bins], Spearman's rho
    """Recall per uncertainty bin and the Spearman correlation between the bins' uncertainty and recall.

    Queries are sorted by uncertainty (ties by index) and cut into `n_bins` bins of equal count (the
    first N mod n_bins bins one larger), as in the ProbVLM paper's calibration plot.
    """
    check_tensor("uncertainty", uncertainty, dim=1)
    check_finite("uncertainty", uncertainty)
    check_tensor("hit", hit, dim=1, floating=False)
    if hit.dtype != torch.bool or hit.shape != uncertainty.shape:
        raise ValueError(f"argument 'hit' must be a bool [N] tensor with N = {uncertainty.shape[0]}, got "
                         f"{hit.dtype} {tuple(hit.shape)}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or not 2 <= n_bins <= uncertainty.shape[0]:
        raise ValueError(f"argument 'n_bins' must be an int in [2, N = {uncertainty.shape[0]}], got {n_bins!r}")
    order = uncertainty.double().argsort(stable=True)
    bins = torch.tensor_split(order, n_bins)
    bin_uncertainty = torch.stack([uncertainty.double()[b].mean() for b in bins])
    bin_recall = torch.stack([hit[b].double().mean() for b in bins])
    return bin_uncertainty, bin_recall, spearman(bin_uncertainty, bin_recall)


def retrieval_report(
    image: EmbeddingDistribution,  # N images, ideally embedded `against` the text posterior
    text: EmbeddingDistribution,  # M distinct captions, ideally embedded `against` the image posterior
    image_captions: Tensor,  # [N] int64: the row of `text` that is each image's caption
    logit_scale: float | Tensor,
    logit_bias: float | Tensor = 0.0,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    n_bins: int = 10,
    score: str = "probit",
    method: str = "bayesvlm",  # the key of the uncertainty-aware results (e.g. "probvlm")
) -> tuple[dict, dict]:  # results, per-bin curves
    """Retrieval both ways, for the deterministic model and with uncertainty.

    image_to_text: each image must find its caption among the M captions; text_to_image: each caption
    must find any image with that caption. "map" ranks by the cosine of the means (the deterministic
    model: the streamed top-k on zero-covariance copies); `method` ranks by `score` (default the probit
    match probability) and adds Spearman's rho between the query uncertainty tr(S) / ||mean||^2 and
    Recall@1 over `n_bins` equal-count bins (`uncertainty_recall`; None when Recall@1 is equal in every
    bin, where rho is undefined). Returns
      results {"map" | method: {"image_to_text" | "text_to_image": {"recall@k": ..., "spearman": ...}}}
      curves {direction: {"uncertainty": [n_bins], "recall@1": [n_bins]}} (`method`'s bins, for a plot).
    k larger than a gallery is left out of the recalls.
    """
    for name, value in (("image", image), ("text", text)):
        if not isinstance(value, EmbeddingDistribution):
            raise ValueError(f"argument '{name}' must be an EmbeddingDistribution, got {type(value).__name__}")
    check_tensor("image_captions", image_captions, dim=1, floating=False)
    if image_captions.shape[0] != len(image) or (len(image) and not (
            0 <= int(image_captions.min()) and int(image_captions.max()) < len(text))):
        raise ValueError(f"argument 'image_captions' must be [N = {len(image)}] rows of text in [0, {len(text)}), got "
                         f"{tuple(image_captions.shape)}")
    dist = {"image": image, "text": text}
    point = {tower: EmbeddingDistribution.diagonal(d.mean, torch.zeros_like(d.mean)) for tower, d in dist.items()}
    labels = {"image": image_captions.cpu(), "text": torch.arange(len(text))}
    if not isinstance(method, str) or not method or method == "map":
        raise ValueError(f"argument 'method' must be a non-empty name other than 'map', got {method!r}")
    results: dict = {"map": {}, method: {}}
    curves = {}
    for name, query, gallery in (("image_to_text", "image", "text"), ("text_to_image", "text", "image")):
        k = min(max(ks), len(dist[gallery]))
        kept = tuple(x for x in ks if x <= k)
        _, top, _, _ = topk(point[query], point[gallery], k, "mean", logit_scale=logit_scale, logit_bias=logit_bias)
        results["map"][name] = recall_at_k(labels[gallery][top.cpu()] == labels[query][:, None], kept)
        _, top, _, _ = topk(dist[query], dist[gallery], k, score, logit_scale=logit_scale, logit_bias=logit_bias)
        hits = labels[gallery][top.cpu()] == labels[query][:, None]
        uncertainty = dist[query].trace().double().cpu() / dist[query].mean.double().cpu().pow(2).sum(1)
        bin_uncertainty, bin_recall, rho = uncertainty_recall(uncertainty, hits[:, 0], min(n_bins, len(hits)))
        results[method][name] = {**recall_at_k(hits, kept), "spearman": rho if rho == rho else None}
        curves[name] = {"uncertainty": bin_uncertainty.tolist(), "recall@1": bin_recall.tolist()}
    return results, curves
