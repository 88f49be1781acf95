"""The demo's selective prediction (SPEC.md section 11): answer only the most confident items, per domain.

Zero-shot: the confidence is the top-label predictive probability (`evaluation.max_probability`; for MAP the
softmax of the deterministic logits); an error is a wrong top label. Retrieval, image to text: the confidence is
the rank-1 caption's score, the cosine for MAP and the probit match probability for BayesVLM and ProbVLM (taken
as its argument mean / sqrt(1 + pi/8 var), which orders queries identically and does not round to 1 in float32);
an error is a query whose rank-1 caption is not its own. Each (task, domain, method) gets AURC, E-AURC and the
error-detection AUROC (`evaluation.selective_metrics`) and its risk-coverage curve at 1 %..100 % for the plot.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bayesvlm_ext import EmbeddingDistribution, evaluation
from bayesvlm_ext.retrieval import topk


def curve_and_metrics(
    confidence: Tensor,  # [N] larger = more confident
    correct: Tensor,  # [N] bool
) -> tuple[dict, list[float]]:  # {"aurc", "eaurc", "auroc"}, risks at 1 %..100 %
    return evaluation.selective_metrics(confidence, correct), evaluation.risk_coverage(confidence, correct)[1].tolist()


def zero_shot(
    probs: Tensor,  # [N, C] predictive probabilities
    labels: Tensor,  # [N]
) -> tuple[dict, list[float]]:
    return curve_and_metrics(evaluation.max_probability(probs), probs.argmax(1) == labels)


def image_to_text_top1(
    images: EmbeddingDistribution,  # N query images
    texts: EmbeddingDistribution,  # M captions
    image_captions: Tensor,  # [N] the row of `texts` that is each image's caption
    logit_scale: float,
    score: str,  # "mean" (MAP: the cosine; pass zero-covariance copies) or "probit"
) -> tuple[Tensor, Tensor]:  # confidence [N] float64, correct [N] bool
    """The rank-1 caption of every image query: its score as the confidence, and whether it is the right one."""
    values, top, mean, var = topk(images, texts, 1, score, logit_scale=logit_scale)
    if score == "probit":  # the probability's argument: same order, no saturation at 1
        confidence = mean[:, 0].double() / torch.sqrt(1 + math.pi / 8 * var[:, 0].double())
    else:
        confidence = values[:, 0].double()
    return confidence, top[:, 0].cpu() == image_captions.cpu()


def point_masses(dist: EmbeddingDistribution) -> EmbeddingDistribution:
    """The deterministic model's embeddings: the means with zero covariance (MAP retrieval by the cosine)."""
    return EmbeddingDistribution.diagonal(dist.mean, torch.zeros_like(dist.mean))


def split_by_domain(confidence: Tensor, correct: Tensor, domains: dict[str, slice]) -> tuple[dict, dict]:
    """({domain: metrics}, {domain: risks}) over the query rows of each domain."""
    pairs = {name: curve_and_metrics(confidence[rows], correct[rows]) for name, rows in domains.items()}
    return {name: pair[0] for name, pair in pairs.items()}, {name: pair[1] for name, pair in pairs.items()}


def print_table(selective: dict, spread: dict | None = None) -> None:
    """One row per (task, domain, method); `spread` {task: {domain: {method: stds}}} adds +- std where given."""
    print("\nselective prediction (SPEC 11): AURC and E-AURC (lower is better) and the AUROC of telling errors from "
          "correct answers by the confidence (higher is better):")
    print(f"{'task':<10} {'domain':<10} {'method':<16} {'AURC':>8} {'E-AURC':>8} {'AUROC':>8}")
    for task, by_domain in selective.items():
        for domain, by_method in by_domain.items():
            for method, values in by_method.items():
                auroc = "n/a" if values["auroc"] is None else f"{values['auroc']:.4f}"
                line = f"{task:<10} {domain:<10} {method:<16} {values['aurc']:>8.4f} {values['eaurc']:>8.4f} {auroc:>8}"
                std = (spread or {}).get(task, {}).get(domain, {}).get(method)
                if std:
                    line += " (+- " + ", ".join("n/a" if std[k] is None else f"{std[k]:.4f}"
                                                for k in ("aurc", "eaurc", "auroc")) + " over the seeds)"
                print(line)
