"""The pseudo-count n and the prior precision lambda, chosen on held-out data (SPEC.md section 2).

The evidence tunes lambda but cannot choose n: it decreases monotonically in n. n is a calibration knob,
chosen the way laplace-torch's `gridsearch` chooses a prior precision: over a log-spaced grid, each n with
lambda at the evidence's optimum for that n, the n whose predictive has the lowest NLPD on a held-out split.

The held-out task is a classification: image features [N, P_img] with labels [N] over C classes whose text
features [C, P_txt] go through the text posterior (zero-shot classes, or the N held-out captions of N
image-caption pairs, labels 0..N-1: the matching task the fit's InfoNCE likelihood scores). Both towers
share one n on the grid. Each grid point costs two bisections on cached eigenvalues and one pass of the
held-out items through `embed` and the fused moments: no decomposition, no model forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._validation import check_tensor
from .posterior import KronPosterior
from .predictive import nlpd
from .zeroshot import ZeroShotClassifier

# Half-decades from 1e-4 to 1e4: n = 1 (the published default) is on it, and a factor of 3 between points is finer
# than the NLPD can resolve on a held-out split of hundreds of items.
DEFAULT_GRID = tuple(10.0 ** (k / 2) for k in range(-8, 9))


@dataclass
class PseudoCountSearch:
    """What `tune_pseudo_count` measured: one entry per grid point, in grid order."""

    pseudo_counts: list[float]  # the grid
    prior_precisions: dict[str, list[float]]  # "image" / "text": lambda at the evidence's optimum for each n
    nlpd: list[float]  # held-out NLPD of the predictive at each n (inf where a probability underflowed to 0)
    best: int  # index of the lowest NLPD (the lowest n among equals)
    extra: dict = field(default_factory=dict)  # what the caller attaches (e.g. the split's size)

    @property
    def pseudo_count(self) -> float:
        return self.pseudo_counts[self.best]

    def as_dict(self) -> dict:
        return {"pseudo_counts": self.pseudo_counts, "prior_precisions": self.prior_precisions, "nlpd": self.nlpd,
                "best": self.best, "pseudo_count": self.pseudo_count, **self.extra}


def tune_pseudo_count(
    image: KronPosterior,
    text: KronPosterior,
    image_features: Tensor,  # [N, P_img] held-out images' features entering the image projection
    labels: Tensor,  # [N] int64 in [0, C)
    class_features: Tensor,  # [C, P_txt] the classes' text features (e.g. template_average of prompts)
    logit_scale: float | Tensor,  # log s
    logit_bias: float | Tensor = 0.0,
    likelihood: str = "softmax",  # "softmax" (CLIP) or "sigmoid" (SigLIP), as ZeroShotClassifier
    *,
    image_residual: Tensor | None = None,  # [N, D]
    class_residual: Tensor | None = None,  # [C, D]
    grid: Sequence[float] = DEFAULT_GRID,
    link: str = "probit",  # the predictive scored: "probit" (or "mc", seeded)
    progress: bool = False,
) -> PseudoCountSearch:
    """Sets both posteriors' pseudo-count to the grid's NLPD minimiser and lambda to the evidence's optimum there.

    The posteriors are changed in place (as by `optimize_prior_precision`); the search's table is returned.
    """
    for name, value in (("image", image), ("text", text)):
        if not isinstance(value, KronPosterior):
            raise ValueError(f"argument '{name}' must be a KronPosterior, got {type(value).__name__}")
    grid = [float(n) for n in grid]
    if not grid or not all(math.isfinite(n) and n > 0 for n in grid):
        raise ValueError(f"argument 'grid' must hold positive finite pseudo-counts, got {grid!r}")
    check_tensor("labels", labels, dim=1, floating=False)
    check_tensor("image_features", image_features, dim=2)
    check_tensor("class_features", class_features, dim=2)
    if labels.shape[0] != image_features.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"argument 'labels' must hold one label per image feature row ({image_features.shape[0]}, at "
                         f"least one), got {labels.shape[0]}")
    classes = class_features.shape[0]
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(f"argument 'labels' must lie in [0, {classes}) (one per class feature row)")
    table: dict[str, list[float]] = {"image": [], "text": []}
    scores = []
    generator = torch.Generator(device=image_features.device)
    for n in tqdm(grid, desc="pseudo-count", disable=not progress):
        for name, posterior in (("image", image), ("text", text)):
            posterior.pseudo_count = n
            table[name].append(posterior.optimize_prior_precision())
        classifier = ZeroShotClassifier(image, text, class_features, logit_scale, logit_bias, likelihood,
                                        class_residual)
        generator.manual_seed(0)
        probs = classifier.predict(image_features, image_residual, link=link, generator=generator)
        with torch.no_grad():
            score = nlpd(probs.double(), labels)
        scores.append(score if math.isfinite(score) else math.inf)
    best = min(range(len(grid)), key=lambda i: (scores[i], grid[i]))
    for name, posterior in (("image", image), ("text", text)):
        posterior.pseudo_count = grid[best]
        posterior.prior_precision = table[name][best]
    return PseudoCountSearch(grid, table, scores, best)
