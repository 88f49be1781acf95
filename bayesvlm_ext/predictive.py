"""Predictive probabilities from logit moments, and calibration metrics (SPEC.md section 5)."""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from ._validation import check_tensor, parse_enum

__all__ = ["Link", "predictive", "accuracy", "nlpd", "ece", "reliability"]

PROBIT_FACTOR = math.pi / 8


class Link(str, Enum):
    PROBIT = "probit"  # softmax over the last dim of mean / sqrt(1 + pi/8 var)
    MC = "mc"  # Monte Carlo average of softmax(mean + sqrt(var) eps), eps independent per logit
    SIGMOID = "sigmoid"  # elementwise sigmoid(mean / sqrt(1 + pi/8 var)) (SigLIP; bias inside mean)
    MC_SIGMOID = "mc_sigmoid"  # Monte Carlo average of sigmoid(mean + sqrt(var) eps), elementwise (SigLIP)


def predictive(
    mean: Tensor,  # [..., M] logit means
    var: Tensor,  # [..., M] logit variances
    link: str | Link = "probit",
    num_samples: int = 1000,
    generator: torch.Generator | None = None,
    chunk_size: int = 64,
) -> Tensor:  # [..., M] probabilities, float32 (float64 for float64 input)
    """Class probabilities from Gaussian logits (SPEC.md section 5).

    "probit" and "mc" normalise over the last dimension (softmax, CLIP zero-shot); "sigmoid" and
    "mc_sigmoid" are elementwise (SigLIP). The Monte Carlo links draw `num_samples` seeded samples,
    `chunk_size` at a time so memory stays O(chunk_size * mean.numel()).
    """
    check_tensor("mean", mean)
    check_tensor("var", var)
    if mean.shape != var.shape:
        raise ValueError(f"arguments 'mean' and 'var' must have one shape, got {tuple(mean.shape)} and "
                         f"{tuple(var.shape)}")
    if mean.dim() == 0:
        raise ValueError("argument 'mean' must have at least one dimension (the classes)")
    link = parse_enum("link", link, Link)
    dtype = torch.float64 if torch.float64 in (mean.dtype, var.dtype) else torch.float32
    mean, var = mean.to(dtype), var.to(dtype)
    if var.numel() and bool((var < 0).any()):
        raise ValueError("argument 'var' must be non-negative")
    if link is Link.PROBIT:
        return torch.softmax(mean / torch.sqrt(1 + PROBIT_FACTOR * var), dim=-1)
    if link is Link.SIGMOID:
        return torch.sigmoid(mean / torch.sqrt(1 + PROBIT_FACTOR * var))
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"argument 'num_samples' must be a positive int, got {num_samples!r}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"argument 'chunk_size' must be a positive int, got {chunk_size!r}")
    std = var.sqrt()
    total = torch.zeros_like(mean)
    for start in range(0, num_samples, chunk_size):
        count = min(chunk_size, num_samples - start)
        eps = torch.randn((count, *mean.shape), dtype=dtype, device=mean.device, generator=generator)
        samples = mean + std * eps
        total += (torch.softmax(samples, dim=-1) if link is Link.MC else torch.sigmoid(samples)).sum(0)
    return total / num_samples


def _check_classification(probs: Tensor, targets: Tensor) -> None:
    check_tensor("probs", probs, dim=2)
    check_tensor("targets", targets, dim=1, floating=False)
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"argument 'targets' must hold integer class indices, got {targets.dtype}")
    if targets.shape[0] != probs.shape[0]:
        raise ValueError(f"argument 'targets' must have {probs.shape[0]} entries to match probs [N, C], "
                         f"got {targets.shape[0]}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= probs.shape[1]):
        raise ValueError(f"argument 'targets' must lie in [0, {probs.shape[1]}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    if probs.shape[0] == 0:
        raise ValueError("argument 'probs' must hold at least one row")


def accuracy(
    probs: Tensor,  # [N, C]
    targets: Tensor,  # [N] integer classes
) -> float:
    """Fraction of rows whose most probable class (lowest index on ties) is the target."""
    _check_classification(probs, targets)
    return (probs.argmax(-1) == targets.to(probs.device)).double().mean().item()


def nlpd(
    probs: Tensor,  # [N, C]
    targets: Tensor,  # [N] integer classes
) -> float:
    """Mean negative log predictive density, mean_i -log probs[i, y_i].

    A probability of exactly 0 is clamped to the dtype's smallest normal number (a finite, large loss).
    """
    _check_classification(probs, targets)
    picked = probs.gather(1, targets.to(probs.device).long()[:, None]).squeeze(1)
    return (-picked.double().clamp_min(torch.finfo(probs.dtype).tiny).log()).mean().item()


def reliability(
    probs: Tensor,  # [N, C]
    targets: Tensor,  # [N] integer classes
    n_bins: int = 20,
) -> tuple[Tensor, Tensor, Tensor]:  # count, mean confidence, accuracy: [n_bins + 1] each, float64
    """The reliability diagram of the top-label confidence: per bin, its size, mean confidence and accuracy.

    Bins are [k/n_bins, (k+1)/n_bins) for k < n_bins, plus one bin for confidence exactly 1 (the binning
    of torchmetrics' MulticlassCalibrationError). Empty bins have count 0 and NaN confidence and accuracy.
    """
    _check_classification(probs, targets)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"argument 'n_bins' must be a positive int, got {n_bins!r}")
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == targets.to(probs.device)).double()
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=confidence.device)
    bins = torch.bucketize(confidence, boundaries, right=True) - 1
    count = torch.zeros(n_bins + 1, dtype=torch.float64, device=confidence.device).index_add_(
        0, bins, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, bins, confidence)
    correct_sum = torch.zeros_like(count).index_add_(0, bins, correct)
    return count, conf_sum / count, correct_sum / count  # 0/0 = NaN marks an empty bin


def ece(
    probs: Tensor,  # [N, C]
    targets: Tensor,  # [N] integer classes
    n_bins: int = 20,
) -> float:
    """Expected calibration error, L1, on the top-label confidence (SPEC.md section 5).

    sum over the bins of `reliability` of (bin size / N) |accuracy - mean confidence|: the value of
    torchmetrics' MulticlassCalibrationError(n_bins, norm="l1").
    """
    count, confidence, accuracy = reliability(probs, targets, n_bins)
    occupied = count > 0
    gap = (accuracy[occupied] - confidence[occupied]).abs()
    return (gap * (count[occupied] / count.sum())).sum().item()
