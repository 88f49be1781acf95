"""bayesvlm_ext: calibrated uncertainty for vision-language models without retraining.

The mathematics is SPEC.md; docs/api.md maps each section to the code. Shapes: N images, M texts (or
gallery items), C classes, P features entering a projection, D the embedding size.

The object around a model:
  BayesVLM          both towers' KronPosteriors + logit scale/bias + the wrapped model: fit, from_published,
                    save/load, encode_image(pixels [N, 3, H, W]) / encode_text(tokens [M, L]) -> [N, D] / [M, D]
                    EmbeddingDistribution, logits -> (mean, var) [N, M], zero_shot, topk -> 4 x [N, k], update,
                    tune(held-out pixels, labels [N] or tokens [N, L]): n by held-out NLPD, lambda by the evidence
  ZeroShot          BayesVLM.zero_shot(class_tokens [C, L] or [C, T, L]): predict(pixels) -> [N, C] probabilities
  ProbVLM           the second method (SPEC 9): two adapters over frozen embeddings [N, D]; same logits / topk
  train_probvlm     ProbVLM from paired embeddings image, text [N, D] -> (ProbVLM, TrainingHistory)
The building blocks it composes:
  KronPosterior     one tower's posterior over W [D, P] from factors A [P, P], B [D, D] (SPEC 2, 10);
                    embed(phi [N, P]) -> EmbeddingDistribution
  EmbeddingDistribution   means [N, D] + one covariance object per form (SPEC 3); take / to / cat
  fit_factors       both towers' factors from a model and a loader of (pixels, tokens) pairs (SPEC 6)
  kfac_factors      one tower's factors from features [N, P] and embeddings [N, D] (SPEC 6)
  cosine_moments    (mean, var) [N, M] of the logits between two EmbeddingDistributions (SPEC 4), fused
  predictive        probabilities [N, C] from logit moments: probit, sigmoid or Monte Carlo (SPEC 5)
  accuracy, nlpd, ece      metrics of probabilities [N, C] against labels [N]
  ZeroShotClassifier       class embeddings from template features [C, T, P] (SPEC 5)
  topk              the k best of a gallery per query: values, indices, mean, var [N, k], streamed (SPEC 7)
  build_index, open_index, search   a gallery's statistics on disk in memory-mapped shards, searched (SPEC 7)
Modules for the rest: active (selection and online update, SPEC 8), capture (projection sites), covariance
(the three covariance forms), curvature, distribution, evaluation (retrieval and selective-prediction
metrics, SPEC 11), fit, index, kron (decomposed Kronecker precision), moments, ops (the compiled ops),
predictive, probvlm, reference (published naive baselines), retrieval, tuning (the pseudo-count on
held-out data, SPEC 2), zeroshot.
Enumerations (damping, likelihood, variant, score, link, ...) are accepted as their strings everywhere.
"""

from . import (active, capture, covariance, curvature, distribution, evaluation, fit, index, kron, moments, ops,
               probvlm, reference, retrieval, tuning, zeroshot)
from ._extension import backend, build_info, has_extension
from .curvature import kfac_factors
from .distribution import EmbeddingDistribution
from .fit import fit_factors
from .index import build_index, open_index, search
from .moments import cosine_moments
from .posterior import KronPosterior
from .predictive import accuracy, ece, nlpd, predictive
from .probvlm import ProbVLM, train_probvlm
from .retrieval import topk
from .vlm import BayesVLM
from .zeroshot import ZeroShot, ZeroShotClassifier

__version__ = "0.1.0"

__all__ = [
    "BayesVLM", "ZeroShot", "ProbVLM", "train_probvlm",
    "KronPosterior", "EmbeddingDistribution", "fit_factors", "kfac_factors", "cosine_moments", "predictive",
    "accuracy", "nlpd", "ece", "ZeroShotClassifier", "topk", "build_index", "open_index", "search",
    "active", "capture", "covariance", "curvature", "distribution", "evaluation", "fit", "index", "kron", "moments",
    "ops", "probvlm", "reference", "retrieval", "tuning", "zeroshot",
    "backend", "build_info", "has_extension", "__version__",
]
