"""ProbVLM: a probabilistic adapter on frozen embeddings, the second method (SPEC.md section 9).

One small network per modality maps a frozen embedding x [D] to a generalised Gaussian per dimension,
GGD(mu, alpha, beta), with density beta / (2 alpha Gamma(1/beta)) exp(-(|x - mu| / alpha)^beta). It is
trained on precomputed embedding pairs alone (`train_probvlm`); the vision-language model is never
touched. Its per-dimension variances make an `EmbeddingDistribution.diagonal`, so `cosine_moments`,
`predictive`, `topk`, the retrieval index and the calibration metrics take it as they take BayesVLM's
embeddings (the "diag" moment path of SPEC.md section 4, through the same fused kernels).

The package: `ggd` (the distribution), `model` (`ProbVLMAdapter`, `ProbVLM`, the uncertainty modes, save and
load) and `training` (the loss and `train_probvlm`); every public name is importable from here.
"""

from .ggd import GGDParams, ggd_nll, ggd_variance
from .model import MeanSource, ProbVLM, ProbVLMAdapter, Uncertainty
from .training import LossWeights, TrainingHistory, adapter_loss, probvlm_loss, train_probvlm

# The settings stay importable as bayesvlm_ext.probvlm.NAME (the commands read them), outside __all__.
from .model import (CONFIG_FILE, DEFAULT_ALPHA_RANGE, DEFAULT_BETA_RANGE, DEFAULT_DEPTH,  # noqa: F401
                    DEFAULT_DROPOUT, DEFAULT_EMBED_OPTIONS, DEFAULT_HIDDEN, DEFAULT_MC_SAMPLES, SAVE_FORMAT,
                    SAVE_VERSION, TENSORS_FILE, TOWERS)
from .training import CHECKPOINT_VERSION, DEFAULT_LR  # noqa: F401

__all__ = ["ProbVLM", "ProbVLMAdapter", "GGDParams", "LossWeights", "TrainingHistory", "Uncertainty", "MeanSource",
           "ggd_nll", "ggd_variance", "adapter_loss", "probvlm_loss", "train_probvlm"]
