"""The online posterior update: newly labelled images folded into a tower's Kronecker factors, and their
label-free curvature for a zero-shot task (SPEC.md sections 6 and 8).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_symmetric_factor, check_tensor
from ..curvature import Likelihood, projected_curvature
from ..kron import KronFactors
from ..moments import scale_and_bias
from ..posterior import KronPosterior
from ..zeroshot import ZeroShotClassifier, ZeroShotLikelihood
from .checks import check_classifier, check_rows

__all__ = ["update_posterior", "label_curvature"]


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
    rows = check_rows("phi", phi, None, posterior.in_features, posterior.device, "[n, P]")
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
    fitted = KronFactors.from_factors(posterior.A, posterior.B, num_data)
    factors = fitted + KronFactors.from_sums(x.T @ x, added_b, rows)
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
    check_classifier(classifier)
    image = classifier.image_posterior
    rows = check_rows("phi_labelled", phi_labelled, None, image.in_features, image.device, "[n, P_img]")
    if image_residual is not None:
        check_rows("image_residual", image_residual, rows, image.out_features, image.device, "[n, D]")
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
