"""bayesvlm_ext: calibrated uncertainty for vision-language models without retraining.

The mathematics is SPEC.md; the README maps each section to the names below.
"""

from . import active, capture, evaluation, ops, probvlm, reference
from ._extension import backend, build_info, has_extension
from .active import (Acquisition, JointSamples, Metric, Selection, acquisition_scores, label_curvature,
                     nearest_neighbours, select, update_posterior)
from .curvature import FactorAccumulator, Likelihood, kfac_factors
from .distribution import CovarianceForm, EmbeddingDistribution
from .fit import ClassBatchSampler, TowerFactors, fit_factors
from .index import IndexWriter, RetrievalIndex, build_index, open_index, save_index, search
from .moments import MomentsOutput, Variant, cosine_moments
from .kron import Damping, FactorReport
from .posterior import KronPosterior
from .predictive import Link, accuracy, ece, nlpd, predictive, reliability
from .probvlm import (GGDParams, LossWeights, ProbVLM, ProbVLMAdapter, TrainingHistory, ggd_nll, ggd_variance,
                      train_probvlm)
from .retrieval import Score, merge_topk, topk
from .vlm import BayesVLM, ZeroShot
from .zeroshot import ZeroShotClassifier, template_average

__version__ = "0.1.0"

__all__ = [
    # the object around a model: both towers' posteriors, encode, logits, zero-shot, top-k, update
    "BayesVLM", "ZeroShot",
    # posterior, curvature and fitting
    "KronPosterior", "Damping", "FactorReport", "kfac_factors", "FactorAccumulator", "Likelihood", "fit_factors",
    "ClassBatchSampler", "TowerFactors",
    # embeddings, moments, prediction, retrieval, zero-shot
    "EmbeddingDistribution", "CovarianceForm", "cosine_moments", "Variant", "MomentsOutput", "predictive", "Link",
    "accuracy", "nlpd", "ece", "reliability", "topk", "Score", "ZeroShotClassifier", "template_average",
    # persistent retrieval index
    "build_index", "open_index", "search", "save_index", "IndexWriter", "RetrievalIndex", "merge_topk",
    # ProbVLM, the second method (SPEC 9)
    "ProbVLM", "ProbVLMAdapter", "GGDParams", "LossWeights", "TrainingHistory", "ggd_nll", "ggd_variance",
    "train_probvlm",
    # active selection (SPEC 8)
    "acquisition_scores", "Acquisition", "JointSamples", "select", "Selection", "nearest_neighbours", "Metric",
    "update_posterior", "label_curvature",
    # modules and build
    "active", "ops", "probvlm", "reference", "evaluation", "capture", "backend",
    "build_info", "has_extension", "__version__",
]
