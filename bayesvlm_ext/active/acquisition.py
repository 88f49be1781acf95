"""Acquisition scores of a pool of images for a zero-shot classifier, and the joint weight samples the
Monte Carlo scores share (SPEC.md section 8; the package docstring describes each score).
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from .._validation import parse_enum
from ..moments import scale_and_bias
from ..predictive import predictive
from ..zeroshot import ZeroShotClassifier, ZeroShotLikelihood
from . import chunking
from .checks import check_classifier, check_rows
from .chunking import chunks, rows_per_chunk

__all__ = ["Acquisition", "SAMPLED", "JointSamples", "acquisition_scores"]


class Acquisition(str, Enum):
    VARIANCE = "variance"  # sum_c Var[logit_c], analytic
    ENTROPY = "entropy"  # H[probit predictive]
    ALEATORIC = "aleatoric"  # E_W H[p(y | x, W)], Monte Carlo over joint samples
    BALD = "bald"  # H[E_W p] - E_W H[p]
    EPIG = "epig"  # E_{x*} I(y; y* | x, x*), needs targets
    RANDOM = "random"  # uniform in [0, 1)


# The methods scored by Monte Carlo over JointSamples.
SAMPLED = (Acquisition.ALEATORIC, Acquisition.BALD, Acquisition.EPIG)


class JointSamples:
    """K joint posterior draws of both towers' projections, shared by every image scored with them.

    SPEC.md sections 2 and 8. Draw k holds (W_img_k, b_img_k) from the image posterior and the class
    embeddings t_kc = W_txt_k phi_c + b_txt_k (+ r_c) from the text posterior, normalised; an image x
    gets p_k(y | x) = softmax_c(s cos(W_img_k x + b_img_k (+ r), t_kc) + beta) (sigmoid per class for a
    "sigmoid" classifier). The draws are a snapshot: re-tuning a posterior afterwards does not change them.

    Args:
      classifier: the ZeroShotClassifier whose posteriors are sampled; the text draws embed its
        `class_features` (and `class_residual`): classes share W_txt, so their draws are correlated.
      num_samples: K >= 1.
      generator: seeds the draws (image tower first, then text tower, from this one generator).
      dtype: float32 (default) or float64 for the draws and the probabilities.
    Attributes: image_weights [K, D, P_img], image_biases [K, D] or None, class_embeddings [K, C, D]
      (unit norm), scale (s), logit_bias (beta).
    """

    def __init__(
        self,
        classifier: ZeroShotClassifier,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        check_classifier(classifier)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"argument 'num_samples' must be a positive int, got {num_samples!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"argument 'dtype' must be torch.float32 or torch.float64, got {dtype}")
        self.classifier = classifier
        self.dtype = dtype
        self.scale, self.logit_bias = scale_and_bias(classifier.logit_scale, classifier.logit_bias)
        self.image_weights, self.image_biases = classifier.image_posterior.sample_weights(num_samples, generator,
                                                                                         dtype)
        text_weights, text_biases = classifier.text_posterior.sample_weights(num_samples, generator, dtype)
        classes = torch.matmul(classifier.class_features.to(dtype), text_weights.transpose(1, 2))  # [K, C, D]
        if text_biases is not None:
            classes = classes + text_biases[:, None, :]
        if classifier.class_residual is not None:
            classes = classes + classifier.class_residual.to(dtype)
        self.class_embeddings = torch.nn.functional.normalize(classes, dim=2)

    @property
    def num_samples(self) -> int:
        return self.image_weights.shape[0]

    def __repr__(self) -> str:
        return (f"JointSamples(K={self.num_samples}, C={self.class_embeddings.shape[1]}, "
                f"D={self.class_embeddings.shape[2]}, dtype={self.dtype})")

    def probabilities(
        self,
        image_features: Tensor,  # [N, P_img]
        image_residual: Tensor | None = None,  # [N, D]
    ) -> Tensor:  # [K, N, C] p_k(y | x) in self.dtype
        """Per-draw class probabilities of every image (SPEC.md section 8). Memory O(K N (D + C))."""
        image = self.classifier.image_posterior
        n = check_rows("image_features", image_features, None, image.in_features, image.device, "[N, P_img]")
        if image_residual is not None:
            check_rows("image_residual", image_residual, n, image.out_features, image.device, "[N, D]")
        return self._probabilities(image_features, image_residual)

    def _probabilities(self, image_features: Tensor, image_residual: Tensor | None) -> Tensor:
        g = torch.matmul(image_features.to(self.dtype), self.image_weights.transpose(1, 2))  # [K, N, D]
        if self.image_biases is not None:
            g = g + self.image_biases[:, None, :]
        if image_residual is not None:
            g = g + image_residual.to(self.dtype)
        u = torch.nn.functional.normalize(g, dim=2)
        logits = self.scale * torch.matmul(u, self.class_embeddings.transpose(1, 2)) + self.logit_bias
        if self.classifier.likelihood is ZeroShotLikelihood.SOFTMAX:
            return torch.softmax(logits, dim=2)
        return torch.sigmoid(logits)


def acquisition_scores(
    classifier: ZeroShotClassifier,
    phi_pool: Tensor,  # [N, P_img] features entering the image projection, one row per pool image
    method: str | Acquisition,
    *,
    samples: JointSamples | None = None,  # required by "aleatoric", "bald" and "epig"
    targets: Tensor | None = None,  # [M, P_img] target images, required by "epig"
    pool_residual: Tensor | None = None,  # [N, D] image residual of the pool (SigLIP)
    target_residual: Tensor | None = None,  # [M, D] image residual of the targets
    generator: torch.Generator | None = None,  # seeds "random"
    chunk_size: int | None = None,  # pool rows per chunk; None: from a memory budget (scores may differ in
    # the last bits between chunk sizes, where BLAS rounds a GEMM row by the row count, as MKL on AVX-512)
) -> Tensor:  # [N] float64, higher = more worth labelling
    """Acquisition scores of every pool image (SPEC.md section 8); the package docstring describes each.

    "variance" and "entropy" are analytic (`classifier.logits`, the probit predictive; for "sigmoid",
    the sum of per-class binary entropies). "aleatoric", "bald" and "epig" are Monte Carlo over the K
    draws of `samples`, the same draws for pool and targets. EPIG(x) = mean over targets x* of
    sum_{y, y*} p(y, y*) log[p(y, y*) / (p(y) p(y*))], p(y, y*) = 1/K sum_k p_k(y | x) p_k(y* | x*):
    exact enumeration, O(K N M C^2) for softmax (O(K N M C) for sigmoid); subsample the targets
    (Smith et al. use ~100) when C is large. Memory: the target probabilities [K, M, C] plus chunks
    bounded by `chunking.CHUNK_ELEMENTS`. BALD and EPIG are clamped at 0 (they are mutual informations;
    rounding can leave -1e-17).
    """
    check_classifier(classifier)
    method = parse_enum("method", method, Acquisition)
    image = classifier.image_posterior
    n = check_rows("phi_pool", phi_pool, None, image.in_features, image.device, "[N, P_img]")
    if pool_residual is not None:
        check_rows("pool_residual", pool_residual, n, image.out_features, image.device, "[N, D]")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"argument 'chunk_size' must be a positive int or None, got {chunk_size!r}")
    if method in SAMPLED:
        if not isinstance(samples, JointSamples):
            raise ValueError(f"argument 'samples' must be a JointSamples for method '{method.value}', got "
                             f"{type(samples).__name__}")
        if samples.classifier is not classifier:
            raise ValueError("argument 'samples' was drawn for another classifier")
    m = 0
    if method is Acquisition.EPIG:
        if targets is None:
            raise ValueError("argument 'targets' [M, P_img] is required by method 'epig'")
        m = check_rows("targets", targets, None, image.in_features, image.device, "[M, P_img]")
        if m == 0:
            raise ValueError("argument 'targets' must hold at least one row")
        if target_residual is not None:
            check_rows("target_residual", target_residual, m, image.out_features, image.device, "[M, D]")
    if method is Acquisition.RANDOM:
        return torch.rand(n, generator=generator, dtype=torch.float64, device=image.device)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=image.device)

    num_classes, dim = classifier.num_classes, image.out_features
    softmax = classifier.likelihood is ZeroShotLikelihood.SOFTMAX
    if method in (Acquisition.VARIANCE, Acquisition.ENTROPY):
        rows = chunk_size or rows_per_chunk(max(dim, num_classes) * 4)
        scores = []
        for chunk in chunks(n, rows):
            mean, var = classifier.logits(phi_pool[chunk], _rows_of(pool_residual, chunk))
            if method is Acquisition.VARIANCE:
                scores.append(var.to(torch.float64).sum(1))
            else:
                probs = predictive(mean, var, link="probit" if softmax else "sigmoid")
                scores.append(_entropy(_outcomes(probs.to(torch.float64), softmax)).sum(-1))
        return torch.cat(scores)

    k = samples.num_samples
    rows = chunk_size or rows_per_chunk(k * (dim + num_classes))
    if method is not Acquisition.EPIG:
        scores = []
        for chunk in chunks(n, rows):
            outcomes = _outcomes(samples._probabilities(phi_pool[chunk], _rows_of(pool_residual, chunk))
                                 .to(torch.float64), softmax)  # [K, n, G, Y]
            aleatoric = _entropy(outcomes).sum(-1).mean(0)  # E_k sum_g H[p_k]
            if method is Acquisition.ALEATORIC:
                scores.append(aleatoric)
            else:
                scores.append((_entropy(outcomes.mean(0)).sum(-1) - aleatoric).clamp_min(0))
        return torch.cat(scores)

    # EPIG: the targets' probabilities once, then pool chunk x target chunk joints of bounded size.
    target_outcomes = torch.cat([
        _outcomes(samples._probabilities(targets[chunk], _rows_of(target_residual, chunk)).to(torch.float64), softmax)
        for chunk in chunks(m, rows_per_chunk(k * (dim + num_classes)))], dim=1)  # [K, M, G, Y]
    groups, outcomes = target_outcomes.shape[2], target_outcomes.shape[3]
    joint_size = groups * outcomes * outcomes  # per (x, x*) pair
    rows = min(rows, max(1, math.isqrt(max(1, chunking.CHUNK_ELEMENTS // joint_size))))
    target_rows = max(1, chunking.CHUNK_ELEMENTS // (rows * joint_size))
    scores = []
    for chunk in chunks(n, rows):
        pool_outcomes = _outcomes(samples._probabilities(phi_pool[chunk], _rows_of(pool_residual, chunk))
                                  .to(torch.float64), softmax)
        scores.append(_epig(pool_outcomes, target_outcomes, target_rows))
    return torch.cat(scores)


# ---- internals ------------------------------------------------------------------------------------
def _outcomes(
    probs: Tensor,  # [..., C] class probabilities
    softmax: bool,
) -> Tensor:  # [..., G, Y]: G independent categorical labels with Y outcomes each
    """Softmax: one label over C classes (G = 1, Y = C). Sigmoid: C binary labels (G = C, Y = 2)."""
    if softmax:
        return probs.unsqueeze(-2)
    return torch.stack([probs, 1 - probs], dim=-1)


def _entropy(p: Tensor) -> Tensor:  # [...] from [..., Y]
    return -torch.special.xlogy(p, p).sum(-1)


def _epig(
    pool: Tensor,  # [K, n, G, Y] per-draw outcome probabilities of the pool chunk
    targets: Tensor,  # [K, M, G, Y] of the targets, the same draws
    target_rows: int,
) -> Tensor:  # [n] float64
    """mean_{x*} sum_g I(y_g; y*_g) = H[y] + H[y*] - H[y, y*] under p(y, y*) = 1/K sum_k p_k(y) p_k(y*)."""
    k, m = pool.shape[0], targets.shape[1]
    pool_entropy = _entropy(pool.mean(0)).sum(-1)  # [n]
    target_entropy = _entropy(targets.mean(0)).sum(-1)  # [M]
    total = torch.zeros_like(pool_entropy)
    for chunk in chunks(m, target_rows):
        # One GEMM per group over the draws: joint[g, x, y, x*, y*].
        joint = torch.einsum("kngy,kmgz->gnymz", pool, targets[:, chunk]) / k
        joint_entropy = -torch.special.xlogy(joint, joint).sum((0, 2, 4))  # [n, m], summed over groups too
        total += (target_entropy[chunk][None, :] - joint_entropy).sum(1)
    return (pool_entropy + total / m).clamp_min(0)


def _rows_of(x: Tensor | None, rows: slice) -> Tensor | None:
    return None if x is None else x[rows]
