"""bayesvlm_ext: calibrated uncertainty for vision-language models without retraining.

The mathematics is SPEC.md; the README maps each section to the names below.
"""

from . import capture, ops, reference
from ._extension import backend, build_info, has_extension
from .curvature import FactorAccumulator, Likelihood, kfac_factors
from .distribution import CovarianceForm, EmbeddingDistribution
from .fit import ClassBatchSampler, TowerFactors, fit_factors
from .moments import MomentsOutput, Variant, cosine_moments
from .posterior import Damping, FactorReport, KronPosterior
from .predictive import Link, accuracy, ece, nlpd, predictive
from .retrieval import Score, topk

__version__ = "0.1.0"

__all__ = [
    "KronPosterior", "Damping", "kfac_factors", "FactorAccumulator", "Likelihood", "fit_factors",
    "ClassBatchSampler", "TowerFactors", "FactorReport", "EmbeddingDistribution", "CovarianceForm", "cosine_moments",
    "Variant", "MomentsOutput", "topk", "Score", "predictive", "Link", "accuracy", "nlpd", "ece", "backend", "build_info", "has_extension", "ops",
    "reference", "capture", "__version__",
]
