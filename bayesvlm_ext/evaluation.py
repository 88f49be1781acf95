"""What users do with uncertainty: retrieval quality and its calibration, and selective prediction.

Retrieval: Recall@k, and recall per uncertainty bin with Spearman's rho. The calibration check of the
ProbVLM paper: sort the queries by their uncertainty into equal-count bins; a useful uncertainty makes
recall fall from the most certain bin to the least certain one, so the Spearman rank correlation between
the bins' mean uncertainty and their recall is close to -1.

Selective prediction (SPEC.md section 11): answer only the most confident items. The risk-coverage curve,
its mean AURC, E-AURC (AURC above the oracle's) and the AUROC of telling correct from wrong predictions by
the confidence; the confidence scores SPEC 11 names (`max_probability`, `neg_top_logit_variance`) and the
correctness of a retrieval's ranks (`retrieval_hits`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_finite, check_same_device, check_tensor, describe_rows
from .distribution import EmbeddingDistribution
from .retrieval import topk

__all__ = ["recall_at_k", "uncertainty_recall", "spearman", "retrieval_report", "retrieval_hits", "max_probability",
           "neg_top_logit_variance", "risk_coverage", "aurc", "eaurc", "error_auroc", "selective_metrics"]

# SPEC 11: the risk-coverage curve at coverages 1 %, 2 %, ..., 100 %.
DEFAULT_COVERAGES = tuple(k / 100 for k in range(1, 101))


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
        results["map"][name] = recall_at_k(retrieval_hits(top, labels[query], labels[gallery]), kept)
        _, top, _, _ = topk(dist[query], dist[gallery], k, score, logit_scale=logit_scale, logit_bias=logit_bias)
        hits = retrieval_hits(top, labels[query], labels[gallery])
        uncertainty = dist[query].trace().double().cpu() / dist[query].mean.double().cpu().pow(2).sum(1)
        bin_uncertainty, bin_recall, rho = uncertainty_recall(uncertainty, hits[:, 0], min(n_bins, len(hits)))
        results[method][name] = {**recall_at_k(hits, kept), "spearman": rho if rho == rho else None}
        curves[name] = {"uncertainty": bin_uncertainty.tolist(), "recall@1": bin_recall.tolist()}
    return results, curves


def retrieval_hits(
    top: Tensor,  # [N, k] int: gallery rows ranked per query (`topk`'s indices)
    query_labels: Tensor,  # [N] int: each query's label
    gallery_labels: Tensor,  # [M] int: each gallery item's label
) -> Tensor:  # [N, k] bool on gallery_labels' device: whether the j-th ranked item has the query's label
    """The hits of a ranking: `recall_at_k`'s input; column 0 is the rank-1 correctness of SPEC.md section 11
    (a retrieval error is a query whose rank-1 item is wrong)."""
    check_tensor("top", top, dim=2, floating=False)
    check_tensor("query_labels", query_labels, dim=1, floating=False)
    check_tensor("gallery_labels", gallery_labels, dim=1, floating=False)
    if top.dtype == torch.bool or top.is_floating_point() or top.is_complex():
        raise ValueError(f"argument 'top' must hold integer gallery rows, got {top.dtype}")
    if query_labels.shape[0] != top.shape[0]:
        raise ValueError(f"argument 'query_labels' must have N = {top.shape[0]} entries (top [N, k]), got "
                         f"{query_labels.shape[0]}")
    if top.numel() and not (0 <= int(top.min()) and int(top.max()) < gallery_labels.shape[0]):
        raise ValueError(f"argument 'top' must hold rows of the gallery in [0, {gallery_labels.shape[0]}), got "
                         f"values in [{int(top.min())}, {int(top.max())}]")
    device = gallery_labels.device
    return gallery_labels[top.to(device).long()] == query_labels.to(device)[:, None]


def max_probability(
    probs: Tensor,  # [N, C] predictive probabilities
) -> Tensor:  # [N] the top-label probability, probs' dtype: the MAP and BayesVLM/ProbVLM confidence of SPEC 11
    check_tensor("probs", probs, dim=2)
    if probs.shape[1] == 0:
        raise ValueError("argument 'probs' must hold at least one class, got shape (N, 0)")
    return probs.amax(dim=1)


def neg_top_logit_variance(
    mean: Tensor,  # [N, C] logit means
    var: Tensor,  # [N, C] logit variances
) -> Tensor:  # [N] minus the variance of the class with the largest mean (lowest index on ties)
    """Minus the logit variance of the top class, a confidence of SPEC.md section 11 (larger = more certain).
    Pair it with the correctness of the argmax-of-mean prediction. For retrieval use `-var[:, 0]` of `topk`."""
    check_tensor("mean", mean, dim=2)
    check_tensor("var", var, dim=2)
    if mean.shape != var.shape or mean.shape[1] == 0:
        raise ValueError(f"arguments 'mean' and 'var' must be [N, C] with one shape and C >= 1, got "
                         f"{tuple(mean.shape)} and {tuple(var.shape)}")
    check_same_device(mean=mean, var=var)
    return -var.gather(1, mean.argmax(dim=1, keepdim=True)).squeeze(1)


def _check_selective(confidence: Tensor, correct: Tensor) -> Tensor:  # [N] confidence as float64
    check_tensor("confidence", confidence, dim=1)
    if confidence.shape[0] == 0:
        raise ValueError("argument 'confidence' must hold at least one item")
    nan = torch.isnan(confidence)
    if bool(nan.any()):
        raise ValueError(f"argument 'confidence' contains NaN in {describe_rows(nan.nonzero().flatten())}")
    check_tensor("correct", correct, floating=False)
    if correct.dtype != torch.bool or correct.shape != confidence.shape:
        raise ValueError(f"argument 'correct' must be a bool [N] tensor with N = {confidence.shape[0]}, got "
                         f"{correct.dtype} {tuple(correct.shape)}")
    check_same_device(confidence=confidence, correct=correct)
    return confidence.detach().double()


def _coverage_counts(coverages, n: int, device: torch.device) -> tuple[Tensor, Tensor]:  # [K] float64, [K] int64
    """The coverages as float64 and their item counts ceil(c N), at least 1."""
    try:
        coverages = torch.as_tensor(DEFAULT_COVERAGES if coverages is None else coverages, dtype=torch.float64,
                                    device=device)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"argument 'coverages' must be a sequence of numbers, got {coverages!r}") from None
    if coverages.dim() != 1 or coverages.shape[0] == 0 or not bool(((coverages > 0) & (coverages <= 1)).all()):
        raise ValueError(f"argument 'coverages' must be a non-empty [K] sequence of fractions in (0, 1], got "
                         f"{coverages.tolist()}")
    exact = coverages * n
    nearest = exact.round()
    # c N within 1e-9 of an integer counts as that integer: 0.07 * 100 is 7.000000000000001 in float64, not 8.
    counts = torch.where((exact - nearest).abs() <= 1e-9 * nearest.clamp_min(1), nearest, exact.ceil())
    return coverages, counts.long().clamp(1, n)


def _expected_errors(confidence: Tensor, wrong: Tensor) -> Tensor:  # [N] float64, [N] float64 -> [N + 1]
    """Errors among the n most confident items, n = 0..N, in expectation over random orders within ties.

    The expectation is exact where the ranking is: at the end of each tie group the cumulative error count,
    and linear in between (n - start items drawn from a group of g items with e errors hold (n - start) e / g).
    """
    order = confidence.argsort(descending=True)
    _, group_sizes = torch.unique_consecutive(confidence[order], return_counts=True)
    zero = wrong.new_zeros(1)
    errors = torch.cat([zero, wrong[order].cumsum(0)])  # [N + 1]: at the group bounds this is order-free
    bounds = torch.cat([zero.long(), group_sizes.cumsum(0)])  # [G + 1]
    n = torch.arange(confidence.shape[0] + 1, device=confidence.device)
    group = (torch.searchsorted(bounds, n, right=True) - 1).clamp_max(bounds.shape[0] - 2)
    start, end = bounds[group], bounds[group + 1]
    return errors[start] + (n - start) * (errors[end] - errors[start]) / (end - start)


def risk_coverage(
    confidence: Tensor,  # [N] larger = more confident (any floating dtype; +-inf allowed, NaN not)
    correct: Tensor,  # [N] bool: whether the prediction on the item is right
    coverages=None,  # [K] fractions in (0, 1]; None: 1 %, 2 %, ..., 100 % (K = 100)
) -> tuple[Tensor, Tensor]:  # coverages [K], risks [K]: float64 on confidence's device
    """The risk-coverage curve of selective prediction (SPEC.md section 11).

    Items are answered from the most confident down; the risk at coverage c is the error rate among the
    ceil(c N) most confident items (at least one). Items of equal confidence are taken in random order, and
    the risk is its expectation: the result does not depend on the input order.
    """
    confidence = _check_selective(confidence, correct)
    coverages, counts = _coverage_counts(coverages, confidence.shape[0], confidence.device)
    errors = _expected_errors(confidence, (~correct).double())
    return coverages, errors[counts] / counts


def aurc(
    confidence: Tensor,  # [N] larger = more confident
    correct: Tensor,  # [N] bool
    coverages=None,  # as `risk_coverage`
) -> float:
    """Area under the risk-coverage curve: the mean of `risk_coverage`'s risks over its coverages."""
    return risk_coverage(confidence, correct, coverages)[1].mean().item()


def eaurc(
    confidence: Tensor,  # [N] larger = more confident
    correct: Tensor,  # [N] bool
    coverages=None,  # as `risk_coverage`
) -> float:
    """Excess AURC: `aurc` minus the AURC of the oracle ordering (every correct item before every wrong one),
    so 0 for a confidence that ranks perfectly; 0 as well when all predictions are right or all wrong."""
    _check_selective(confidence, correct)
    return aurc(confidence, correct, coverages) - aurc(correct.double(), correct, coverages)


def error_auroc(
    confidence: Tensor,  # [N] larger = more confident
    correct: Tensor,  # [N] bool; correct predictions are the positive class
) -> float:
    """AUROC of telling correct from wrong predictions by the confidence (SPEC.md section 11).

    The probability that a random correct item is more confident than a random wrong one, ties counted
    1/2 (the Mann-Whitney U / (n_correct n_wrong); sklearn's `roc_auc_score`). NaN when all predictions are
    right or all wrong: there is nothing to tell apart (as `spearman` is NaN on constant input).
    """
    confidence = _check_selective(confidence, correct)
    n_correct = int(correct.sum())
    n_wrong = confidence.shape[0] - n_correct
    if n_correct == 0 or n_wrong == 0:
        return float("nan")
    rank_sum = _average_ranks(confidence)[correct].sum().item()
    return (rank_sum - n_correct * (n_correct + 1) / 2) / (n_correct * n_wrong)


def selective_metrics(
    confidence: Tensor,  # [N] larger = more confident
    correct: Tensor,  # [N] bool
    coverages=None,  # as `risk_coverage`
) -> dict[str, float | None]:  # {"aurc", "eaurc", "auroc"}
    """`aurc`, `eaurc` and `error_auroc` as plain floats, for results.json (`selective.<task>.<domain>.<method>`);
    "auroc" is None where `error_auroc` is NaN (all right or all wrong), as JSON has no NaN."""
    auroc = error_auroc(confidence, correct)
    return {"aurc": aurc(confidence, correct, coverages), "eaurc": eaurc(confidence, correct, coverages),
            "auroc": auroc if auroc == auroc else None}
