"""Active selection of the examples worth labelling, and the online posterior update (SPEC.md section 8).

Scores on a pool of image features, for a `ZeroShotClassifier`, higher = more worth labelling:
- "variance": sum over classes of the analytic logit variance (SPEC.md section 4);
- "entropy": entropy of the probit predictive (SPEC.md section 5);
- "aleatoric": expected entropy E_W H[p(y | x, W)], Monte Carlo over joint weight samples;
- "bald": H[E_W p] - E_W H[p], the mutual information between the label and the weights;
- "epig": expected predictive information gain about the labels of target inputs (Smith et al., 2023);
- "random": uniform scores, the baseline.

The sampled scores use `JointSamples`: K draws W_k of both towers' projections (SPEC.md section 2),
the image tower's for the images and the text tower's for the class embeddings, every image of pool
and target set pushed through the same K draws. That sharing is what EPIG measures: with independent
noise per item (or per logit, as the Monte Carlo predictive of section 5 draws it) the predictions for
x and x* are independent given nothing, and EPIG collapses to ~0.

Sigmoid classifiers (SigLIP) treat each class as an independent binary label: entropies, BALD and EPIG
are sums over classes of the binary quantities. (The exact joint over 2^C label vectors is out of
reach; the per-class sum of BALD bounds the joint mutual information from above.)

Selection turns scores into a batch (`select`: top-k, class-balanced round robin, or stochastic
softmax sampling by the Gumbel-top-k trick); `nearest_neighbours` picks a support set close to a
target set by cosine or 2-Wasserstein distance; `update_posterior` folds newly labelled images into a
tower's Kronecker factors and re-tunes lambda; `label_curvature` gives their GGN for a zero-shot task.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from ._validation import (accumulation_dtype, check_finite, check_positive_scalar, check_symmetric_factor,
                          check_tensor, parse_enum)
from .curvature import Likelihood, projected_curvature
from .distribution import CovarianceForm, EmbeddingDistribution
from .kron import KronFactors
from .moments import scale_and_bias
from .posterior import KronPosterior
from .predictive import predictive
from .zeroshot import ZeroShotClassifier, ZeroShotLikelihood

__all__ = ["Acquisition", "Selection", "Metric", "JointSamples", "acquisition_scores", "select",
           "nearest_neighbours", "update_posterior", "label_curvature"]

# Elements of the largest temporary one chunk may allocate ([K, rows, D] embeddings, [rows, N] distances,
# the [rows, m, C, C] joint of EPIG): 2^24 float64 values are 128 MiB.
CHUNK_ELEMENTS = 2**24


class Acquisition(str, Enum):
    VARIANCE = "variance"  # sum_c Var[logit_c], analytic
    ENTROPY = "entropy"  # H[probit predictive]
    ALEATORIC = "aleatoric"  # E_W H[p(y | x, W)], Monte Carlo over joint samples
    BALD = "bald"  # H[E_W p] - E_W H[p]
    EPIG = "epig"  # E_{x*} I(y; y* | x, x*), needs targets
    RANDOM = "random"  # uniform in [0, 1)


class Selection(str, Enum):
    TOP = "top"  # the budget highest scores
    CLASS_BALANCED = "class_balanced"  # round robin over predicted classes, best remaining item of each
    RANDOMISED = "randomised"  # sampling without replacement, probabilities softmax(scores / temperature)


class Metric(str, Enum):
    COSINE = "cosine"  # cosine of the means
    WASSERSTEIN = "wasserstein"  # 2-Wasserstein distance between the Gaussians


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
        _check_classifier(classifier)
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
        n = _check_rows("image_features", image_features, None, image.in_features, image.device, "[N, P_img]")
        if image_residual is not None:
            _check_rows("image_residual", image_residual, n, image.out_features, image.device, "[N, D]")
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
    """Acquisition scores of every pool image (SPEC.md section 8); see the module docstring for each.

    "variance" and "entropy" are analytic (`classifier.logits`, the probit predictive; for "sigmoid",
    the sum of per-class binary entropies). "aleatoric", "bald" and "epig" are Monte Carlo over the K
    draws of `samples`, the same draws for pool and targets. EPIG(x) = mean over targets x* of
    sum_{y, y*} p(y, y*) log[p(y, y*) / (p(y) p(y*))], p(y, y*) = 1/K sum_k p_k(y | x) p_k(y* | x*):
    exact enumeration, O(K N M C^2) for softmax (O(K N M C) for sigmoid); subsample the targets
    (Smith et al. use ~100) when C is large. Memory: the target probabilities [K, M, C] plus chunks
    bounded by CHUNK_ELEMENTS. BALD and EPIG are clamped at 0 (they are mutual informations; rounding
    can leave -1e-17).
    """
    _check_classifier(classifier)
    method = parse_enum("method", method, Acquisition)
    image = classifier.image_posterior
    n = _check_rows("phi_pool", phi_pool, None, image.in_features, image.device, "[N, P_img]")
    if pool_residual is not None:
        _check_rows("pool_residual", pool_residual, n, image.out_features, image.device, "[N, D]")
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
        m = _check_rows("targets", targets, None, image.in_features, image.device, "[M, P_img]")
        if m == 0:
            raise ValueError("argument 'targets' must hold at least one row")
        if target_residual is not None:
            _check_rows("target_residual", target_residual, m, image.out_features, image.device, "[M, D]")
    if method is Acquisition.RANDOM:
        return torch.rand(n, generator=generator, dtype=torch.float64, device=image.device)
    if n == 0:
        return torch.zeros(0, dtype=torch.float64, device=image.device)

    num_classes, dim = classifier.num_classes, image.out_features
    softmax = classifier.likelihood is ZeroShotLikelihood.SOFTMAX
    if method in (Acquisition.VARIANCE, Acquisition.ENTROPY):
        rows = chunk_size or _rows_per_chunk(max(dim, num_classes) * 4)
        scores = []
        for chunk in _chunks(n, rows):
            mean, var = classifier.logits(phi_pool[chunk], _rows_of(pool_residual, chunk))
            if method is Acquisition.VARIANCE:
                scores.append(var.to(torch.float64).sum(1))
            else:
                probs = predictive(mean, var, link="probit" if softmax else "sigmoid")
                scores.append(_entropy(_outcomes(probs.to(torch.float64), softmax)).sum(-1))
        return torch.cat(scores)

    k = samples.num_samples
    rows = chunk_size or _rows_per_chunk(k * (dim + num_classes))
    if method is not Acquisition.EPIG:
        scores = []
        for chunk in _chunks(n, rows):
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
        for chunk in _chunks(m, _rows_per_chunk(k * (dim + num_classes)))], dim=1)  # [K, M, G, Y]
    groups, outcomes = target_outcomes.shape[2], target_outcomes.shape[3]
    joint_size = groups * outcomes * outcomes  # per (x, x*) pair
    rows = min(rows, max(1, math.isqrt(max(1, CHUNK_ELEMENTS // joint_size))))
    target_rows = max(1, CHUNK_ELEMENTS // (rows * joint_size))
    scores = []
    for chunk in _chunks(n, rows):
        pool_outcomes = _outcomes(samples._probabilities(phi_pool[chunk], _rows_of(pool_residual, chunk))
                                  .to(torch.float64), softmax)
        scores.append(_epig(pool_outcomes, target_outcomes, target_rows))
    return torch.cat(scores)


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
    for chunk in _chunks(m, chunk_size or _rows_per_chunk(max(n, 1))):
        if metric is Metric.COSINE:
            closeness = b[chunk] @ a.T  # [chunk, N]
        else:
            closeness = -((b[chunk] * b[chunk]).sum(1, keepdim=True) + sq_norm_a - 2 * b[chunk] @ a.T)
        neighbours[chunk] = torch.sort(closeness, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.unique(neighbours), neighbours


def update_posterior(
    posterior: KronPosterior,
    phi: Tensor,  # [n, P] features entering this tower's projection, one row per newly labelled input
    curvature: Tensor,  # [D, D] sum_i H(x_i) over them, e.g. label_curvature(classifier, phi)
    num_data: int,  # N, the number of data the posterior's factors were fitted on
    *,
    weight: Tensor | None = None,  # [D, P] a new MAP weight (after fine-tuning); None keeps the old one
    bias: Tensor | None = None,  # [D] a new MAP bias; None keeps the old one
    tune_prior_precision: bool = True,
) -> KronPosterior:  # the updated posterior; it was fitted on N + n data
    """The posterior after labelling n more inputs (SPEC.md section 8, the sums of section 6).

    The fit stores A = sum phi phi^T / sqrt(N) and B = sum H / sqrt(N); the update is factor addition on those
    sums (`kron.KronFactors`), which keeps that scaling:
      A' = (sqrt(N) A + sum_i phi_i phi_i^T) / sqrt(N + n),  B' = (sqrt(N) B + sum_i H_i) / sqrt(N + n)
    (phi with a constant 1 appended when the layer has a bias), exactly the factors of a fit on all
    N + n data. H is a GGN, label-free: the labels move the MAP weight, which is kept unless `weight`/
    `bias` are given. Pseudo-count and damping are kept; lambda starts from the old value and is
    re-tuned with `optimize_prior_precision` unless `tune_prior_precision` is False.

    The input posterior is not modified. The new factors are eigendecomposed afresh (lazily, on first
    use): A changes by a rank-n update plus a rescaling, B by a generally full-rank H, and an
    eigen-update of rank n costs O(n p^3) for the eigenvectors, no cheaper than one O(p^3) `eigh`
    (milliseconds at p of hundreds), so SPEC.md's "updated where cheap" does not apply here. Re-tuning
    lambda then needs no further decomposition: a bisection on the new eigenvalues, O(p q) per step.
    """
    if not isinstance(posterior, KronPosterior):
        raise ValueError(f"argument 'posterior' must be a KronPosterior, got {type(posterior).__name__}")
    rows = _check_rows("phi", phi, None, posterior.in_features, posterior.device, "[n, P]")
    dim = posterior.out_features
    check_tensor("curvature", curvature, dim=2)
    if curvature.device != posterior.device:
        raise ValueError(f"argument 'curvature' must be on the posterior's device {posterior.device}, got "
                         f"{curvature.device}")
    added_b, _ = check_symmetric_factor("curvature", curvature, dim, "[D, D] to match the posterior's B")
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 0:
        raise ValueError(f"argument 'num_data' must be a non-negative int, got {num_data!r}")
    if num_data + rows == 0:
        raise ValueError("arguments 'num_data' and 'phi' hold no data at all (N + n = 0)")
    if weight is not None:
        check_tensor("weight", weight, dim=2)
        if tuple(weight.shape) != tuple(posterior.weight.shape):
            raise ValueError(f"argument 'weight' must have shape {tuple(posterior.weight.shape)} (the posterior's "
                             f"[D, P]), got {tuple(weight.shape)}")
    if bias is not None and posterior.bias is None:
        raise ValueError("argument 'bias' is given but the posterior has no bias (its A has no bias row)")
    if bias is not None:
        check_tensor("bias", bias, dim=1)
        if tuple(bias.shape) != (dim,):
            raise ValueError(f"argument 'bias' must have shape ({dim},), got {tuple(bias.shape)}")
    x = phi.to(torch.float64)
    if posterior.bias is not None:
        x = torch.cat([x, x.new_ones(rows, 1)], dim=1)
    factors = KronFactors(posterior.A, posterior.B, num_data) + KronFactors.from_sums(x.T @ x, added_b, rows)
    updated = KronPosterior(factors.A, factors.B, posterior.weight if weight is None else weight,
                            posterior.bias if bias is None else bias, prior_precision=posterior.prior_precision,
                            pseudo_count=posterior.pseudo_count, damping=posterior.damping)
    if tune_prior_precision:
        updated.optimize_prior_precision()
    return updated


def label_curvature(
    classifier: ZeroShotClassifier,
    phi_labelled: Tensor,  # [n, P_img] features of the labelled images
    image_residual: Tensor | None = None,  # [n, D]
) -> Tensor:  # [D, D] float64, sum_i H(x_i) for the image tower's B
    """The image tower's GGN at labelled images for the zero-shot task (SPEC.md sections 6 and 8).

    Each image's MAP embedding g_i = W* phi_i + b (+ r) is scored against the C MAP class embeddings
    (the text posterior's means): H_i = J_i M_i J_i with M_i = s^2 (Y^T diag(p_i) Y - m_i m_i^T) for
    "softmax" (InfoNCE over the classes) or s^2 Y^T diag(c_i) Y for "sigmoid", i.e. the GGN
    (dz/dg)^T Hess_z(loss) (dz/dg) of the logits z = s Y g/||g|| + beta. Independent of the labels.
    """
    _check_classifier(classifier)
    image = classifier.image_posterior
    rows = _check_rows("phi_labelled", phi_labelled, None, image.in_features, image.device, "[n, P_img]")
    if image_residual is not None:
        _check_rows("image_residual", image_residual, rows, image.out_features, image.device, "[n, D]")
    g = phi_labelled.to(torch.float64) @ image.weight.T
    if image.bias is not None:
        g = g + image.bias
    if image_residual is not None:
        g = g + image_residual.to(torch.float64)
    if rows and bool((g.norm(dim=1) == 0).any()):
        raise ValueError("argument 'phi_labelled' gives a zero MAP embedding: its direction is undefined")
    scale, logit_bias = scale_and_bias(classifier.logit_scale, classifier.logit_bias)
    likelihood = Likelihood.INFONCE if classifier.likelihood is ZeroShotLikelihood.SOFTMAX else Likelihood.SIGLIP
    return projected_curvature(g, classifier.classes.mean, likelihood, scale, logit_bias)


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
    for chunk in _chunks(m, target_rows):
        # One GEMM per group over the draws: joint[g, x, y, x*, y*].
        joint = torch.einsum("kngy,kmgz->gnymz", pool, targets[:, chunk]) / k
        joint_entropy = -torch.special.xlogy(joint, joint).sum((0, 2, 4))  # [n, m], summed over groups too
        total += (target_entropy[chunk][None, :] - joint_entropy).sum(1)
    return (pool_entropy + total / m).clamp_min(0)


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


def _check_classifier(classifier) -> None:
    if not isinstance(classifier, ZeroShotClassifier):
        raise ValueError(f"argument 'classifier' must be a ZeroShotClassifier, got {type(classifier).__name__}")


def _check_rows(name: str, x, rows: int | None, cols: int, device: torch.device, what: str) -> int:
    """A finite 2-D float tensor [rows, cols] on `device`; returns its row count."""
    check_tensor(name, x, dim=2)
    if x.shape[1] != cols or (rows is not None and x.shape[0] != rows):
        expected = f"[{'N' if rows is None else rows}, {cols}]"
        raise ValueError(f"argument '{name}' must be {what} = {expected}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"argument '{name}' must be on {device}, got {x.device}")
    check_finite(name, x)
    return x.shape[0]


def _rows_per_chunk(row_elements: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, row_elements))


def _chunks(total: int, rows: int):
    for start in range(0, total, rows):
        yield slice(start, min(start + rows, total))


def _rows_of(x: Tensor | None, rows: slice) -> Tensor | None:
    return None if x is None else x[rows]
