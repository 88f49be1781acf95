"""Zero-shot classification with calibrated probabilities (SPEC.md sections 3 to 5).

A class is described by T prompt templates ("a photo of a {}.", ...). CLIP's recipe averages the T
normalised text embeddings of a class. Under the posterior every template is embedded by the same
random weight W, so the template embeddings are perfectly correlated, not independent: averaging does
not shrink the variance by 1/T. `template_average` therefore averages in feature space, with each
template weighted by 1/||g*_t|| (its MAP embedding's norm):

    t_c = sum_t w_t (W phi_t + b) = W phi_c + b,    phi_c = sum_t w_t phi_t,    w_t = (1/||g*_t||) / sum_s (1/||g*_s||)

At the MAP, t_c is parallel to CLIP's average of normalised embeddings (the same cosines, the same
MAP classifier), and `KronPosterior.embed(phi_c)` gives its exact Gaussian: the uncertainty of W
propagated once, with every template's correlation kept. (The common factor sum_s 1/||g*_s|| is
dropped: cosines do not see it.)

`ZeroShotClassifier` embeds the class features once (with the statistics the fused kernels need),
then turns image features into logit moments and probabilities: softmax with the probit
approximation or Monte Carlo for CLIP (likelihood "softmax"), elementwise sigmoids for SigLIP
("sigmoid", logit bias kept), and the deterministic MAP probabilities for comparison. `ZeroShot` is the
same on pixels, made by `BayesVLM.zero_shot`, and follows the BayesVLM's posteriors as they change.
"""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ._validation import check_finite, check_finite_scalar, check_logit_scale, check_tensor, parse_enum
from .moments import cosine_moments
from .posterior import KronPosterior
from .predictive import predictive

if TYPE_CHECKING:  # vlm.py imports this module: BayesVLM is only named in annotations here
    from .vlm import BayesVLM

__all__ = ["ZeroShotClassifier", "ZeroShot", "template_average", "ZeroShotLikelihood"]


class ZeroShotLikelihood(str, Enum):
    SOFTMAX = "softmax"  # CLIP: one class among C
    SIGMOID = "sigmoid"  # SigLIP: an independent match probability per class


def template_average(
    features: Tensor,  # [C, T, P] features entering the text projection, T templates per class
    weight: Tensor,  # [D, P] the text projection's MAP weight (nn.Linear convention)
    bias: Tensor | None = None,  # [D]
    residual: Tensor | None = None,  # [C, T, D] a fixed residual added after the projection, if any
) -> tuple[Tensor, Tensor | None]:  # class features [C, P], class residual [C, D] or None
    """Per class, the template features averaged with weights 1 / ||g*_t|| (see the module docstring)."""
    check_tensor("features", features, dim=3)
    check_tensor("weight", weight, dim=2)
    if features.shape[2] != weight.shape[1]:
        raise ValueError(f"argument 'features' [C, T, P] must have P = {weight.shape[1]} (weight [D, P]), got "
                         f"{tuple(features.shape)}")
    if features.shape[1] == 0:
        raise ValueError("argument 'features' must hold at least one template per class (T >= 1)")
    check_finite("features", features)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    x = features.to(dtype)
    g = x @ weight.to(dtype).T  # [C, T, D]
    if bias is not None:
        g = g + bias.to(dtype)
    if residual is not None:
        check_tensor("residual", residual, dim=3)
        if residual.shape != g.shape:
            raise ValueError(f"argument 'residual' must be [C, T, D] = {tuple(g.shape)}, got {tuple(residual.shape)}")
        g = g + residual.to(dtype)
    norms = g.norm(dim=2)  # [C, T]
    if bool((norms == 0).any()):
        raise ValueError("a template's MAP embedding is zero: its direction (and the average) is undefined")
    w = 1 / norms
    w = w / w.sum(1, keepdim=True)
    averaged = (w[:, :, None] * x).sum(1)
    averaged_residual = None if residual is None else (w[:, :, None] * residual.to(dtype)).sum(1)
    return averaged, averaged_residual


class ZeroShotClassifier:
    """Probabilities over C classes for images, from both towers' posteriors.

    image_posterior, text_posterior: KronPosterior of each tower (same D).
    class_features: [C, P_txt], e.g. from `template_average`; class_residual: [C, D] or None.
    logit_scale: log s as stored in the model; logit_bias: SigLIP's beta (kept in the logits).
    """

    def __init__(
        self,
        image_posterior: KronPosterior,
        text_posterior: KronPosterior,
        class_features: Tensor,  # [C, P_txt]
        logit_scale: float | Tensor,
        logit_bias: float | Tensor = 0.0,
        likelihood: str | ZeroShotLikelihood = "softmax",
        class_residual: Tensor | None = None,  # [C, D]
    ):
        for name, value in (("image_posterior", image_posterior), ("text_posterior", text_posterior)):
            if not isinstance(value, KronPosterior):
                raise ValueError(f"argument '{name}' must be a KronPosterior, got {type(value).__name__}")
        self.image_posterior, self.text_posterior = image_posterior, text_posterior
        self.likelihood = parse_enum("likelihood", likelihood, ZeroShotLikelihood)
        # Checked here, not at the first prediction: map_probabilities' exp would overflow to inf silently.
        check_logit_scale("logit_scale", logit_scale)
        check_finite_scalar("logit_bias", logit_bias)
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        # Kept for joint weight samples (bayesvlm_ext.active): classes share W_txt, so they are correlated.
        self.class_features, self.class_residual = class_features, class_residual
        self.classes = text_posterior.embed(class_features, class_residual, against=image_posterior)  # C items

    @classmethod
    def from_templates(
        cls,
        image_posterior: KronPosterior,
        text_posterior: KronPosterior,
        template_features: Tensor,  # [C, T, P_txt]
        logit_scale: float | Tensor,
        logit_bias: float | Tensor = 0.0,
        likelihood: str | ZeroShotLikelihood = "softmax",
        template_residual: Tensor | None = None,  # [C, T, D]
    ) -> "ZeroShotClassifier":
        """Classes from T prompt templates each, averaged by `template_average`."""
        features, residual = template_average(template_features, text_posterior.weight, text_posterior.bias,
                                              template_residual)
        return cls(image_posterior, text_posterior, features.to(template_features.dtype), logit_scale, logit_bias,
                   likelihood, None if residual is None else residual.to(template_features.dtype))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def logits(
        self,
        image_features: Tensor,  # [N, P_img]
        image_residual: Tensor | None = None,  # [N, D]
        variant: str | None = None,  # cosine_moments' variant; None: exact for the structures
    ) -> tuple[Tensor, Tensor]:  # mean [N, C], var [N, C]
        """Mean and variance of every image's logit for every class (SPEC.md section 4)."""
        images = self.image_posterior.embed(image_features, image_residual, against=self.text_posterior)
        return cosine_moments(images, self.classes, self.logit_scale, self.logit_bias, variant=variant)

    def predict(
        self,
        image_features: Tensor,  # [N, P_img]
        image_residual: Tensor | None = None,  # [N, D]
        link: str = "probit",  # "probit" or "mc"
        num_samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # [N, C] probabilities (rows sum to 1 for "softmax")
        """Predictive probabilities (SPEC.md section 5): probit or Monte Carlo over the Gaussian logits."""
        return self.probabilities(*self.logits(image_features, image_residual), link, num_samples, generator)

    def probabilities(
        self,
        mean: Tensor,  # [N, C] logit means, e.g. from `logits`
        var: Tensor,  # [N, C] logit variances
        link: str = "probit",  # "probit" or "mc"
        num_samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # [N, C]
        """The predictive of this classifier's likelihood from logit moments: softmax ("softmax") or
        elementwise sigmoid ("sigmoid") under the probit approximation or Monte Carlo (SPEC.md section 5)."""
        if link not in ("probit", "mc"):
            raise ValueError(f"argument 'link' must be 'probit' or 'mc', got {link!r}")
        if self.likelihood is ZeroShotLikelihood.SIGMOID:
            link = "sigmoid" if link == "probit" else "mc_sigmoid"
        return predictive(mean, var, link=link, num_samples=num_samples, generator=generator)

    def map_probabilities(
        self,
        image_features: Tensor,  # [N, P_img]
        image_residual: Tensor | None = None,  # [N, D]
    ) -> Tensor:  # [N, C] the deterministic model's probabilities
        """The MAP model: softmax (or sigmoid) of s cos(g*_img, t*_c) + beta, no uncertainty."""
        return self.map_probabilities_of(self.image_posterior.embed(image_features, image_residual).mean)

    def map_probabilities_of(
        self,
        image_embeddings: Tensor,  # [N, D] unnormalised MAP image embeddings (the model's own output)
    ) -> Tensor:  # [N, C]
        """`map_probabilities` from embeddings already computed."""
        x = torch.nn.functional.normalize(image_embeddings, dim=1)
        y = torch.nn.functional.normalize(self.classes.mean.to(x.dtype), dim=1)
        scale = float(torch.as_tensor(self.logit_scale).exp())
        logits = scale * x @ y.T + float(self.logit_bias)
        return torch.softmax(logits, 1) if self.likelihood is ZeroShotLikelihood.SOFTMAX else torch.sigmoid(logits)


class ZeroShot:
    """A BayesVLM's zero-shot classifier over C classes, on pixels (`ZeroShotClassifier` works on features).

    `classifier` is the underlying ZeroShotClassifier (class embeddings, likelihood); the image side always
    uses the BayesVLM's current image posterior, so it follows `BayesVLM.update`.
    """

    def __init__(self, vlm: "BayesVLM", classifier: ZeroShotClassifier):
        self.vlm, self._classifier = vlm, classifier
        self._made_for = self._posteriors_now()

    def _posteriors_now(self) -> tuple:
        """What the class embeddings depend on: both posteriors (by identity) and their n and lambda."""
        return tuple((id(p), p.pseudo_count, p.prior_precision) for p in (self.vlm.image, self.vlm.text))

    @property
    def classifier(self) -> ZeroShotClassifier:
        """The classifier over the BayesVLM's current posteriors: rebuilt from the same class features when
        `BayesVLM.update` replaced a posterior or `BayesVLM.tune` changed n or lambda since it was made."""
        now = self._posteriors_now()
        if now != self._made_for:
            old = self._classifier
            self._classifier = ZeroShotClassifier(self.vlm.image, self.vlm.text, old.class_features, old.logit_scale,
                                                  old.logit_bias, old.likelihood, old.class_residual)
            self._made_for = now
        return self._classifier

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes

    def logits(
        self,
        pixels: Tensor,  # [N, 3, H, W]
    ) -> tuple[Tensor, Tensor]:  # mean [N, C], var [N, C]
        """Every image's logit moments for every class (SPEC.md section 4)."""
        return self.vlm.logits(self.vlm.encode_image(pixels), self.classifier.classes)

    def predict(
        self,
        pixels: Tensor,  # [N, 3, H, W]
        link: str = "probit",  # "probit" or "mc"
        num_samples: int = 1000,
        generator: torch.Generator | None = None,
    ) -> Tensor:  # [N, C] probabilities (rows sum to 1 for CLIP's softmax)
        """Predictive probabilities (SPEC.md section 5)."""
        return self.classifier.probabilities(*self.logits(pixels), link, num_samples, generator)

    def map_probabilities(
        self,
        pixels: Tensor,  # [N, 3, H, W]
    ) -> Tensor:  # [N, C] the deterministic model's probabilities
        """The model without uncertainty: softmax (or sigmoid) of s cos + beta of its own embeddings."""
        return self.classifier.map_probabilities_of(self.vlm.capture("image", pixels).embeddings)
