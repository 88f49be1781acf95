"""ProbVLM: a probabilistic adapter on frozen embeddings, the second method (SPEC.md section 9).

One small network per modality maps a frozen embedding x [D] to a generalised Gaussian per dimension,
GGD(mu, alpha, beta), with density beta / (2 alpha Gamma(1/beta)) exp(-(|x - mu| / alpha)^beta). It is
trained on precomputed embedding pairs alone (`train_probvlm`); the vision-language model is never
touched. Its per-dimension variances make an `EmbeddingDistribution.diagonal`, so `cosine_moments`,
`predictive`, `topk`, the retrieval index and the calibration metrics take it as they take BayesVLM's
embeddings (the "diag" moment path of SPEC.md section 4, through the same fused kernels).

Uncertainty (`ProbVLMAdapter.embed`):
- "aleatoric": the GGD's variance alpha^2 Gamma(3/beta) / Gamma(1/beta), one pass with dropout off;
- "epistemic": the variance of mu over K Monte Carlo dropout passes;
- "total": the law of total variance over the K passes, mean_k var_k + var_k(mu_k).
Each Monte Carlo pass draws one dropout mask per hidden unit from a generator seeded by `seed` and
applies it to every item: one sample of the network's weights (dropout as a distribution over weights).
An item's marginal is that of per-item masks, and its result does not depend on the batch or the
process it is embedded in, so an index built in shards or under torchrun is reproducible.

The mean of the distribution is the frozen embedding itself by default (`mean="input"`): the method
then adds uncertainty to the deterministic model without moving its predictions, as BayesVLM does.
`mean="adapter"` uses the adapter's mu (the average over the passes for the Monte Carlo modes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._files import replacing
from .storage import read_config, read_header, read_tensors, saved_files, write_saved
from ._validation import (accumulation_dtype, check_finite_rows, check_finite_scalar, check_logit_scale, check_tensor,
                          parse_enum)
from .distribution import EmbeddingDistribution

__all__ = ["ProbVLM", "ProbVLMAdapter", "GGDParams", "LossWeights", "TrainingHistory", "Uncertainty", "MeanSource",
           "ggd_nll", "ggd_variance", "adapter_loss", "probvlm_loss", "train_probvlm"]

TOWERS = ("image", "text")
SAVE_FORMAT = "bayesvlm_ext.ProbVLM"
SAVE_VERSION = 1
TENSORS_FILE = "probvlm.safetensors"
CONFIG_FILE = "probvlm.json"
CHECKPOINT_VERSION = 1
# Published defaults (SPEC.md section 9).
DEFAULT_HIDDEN, DEFAULT_DEPTH, DEFAULT_DROPOUT, DEFAULT_LR = 256, 1, 0.05, 8e-5
# The heads' outputs are kept inside these ranges: alpha bounds the per-dimension scale; beta below 0.5
# makes Gamma(3/beta) / Gamma(1/beta) explode (1e9 at 0.2), above 10 the density is already a box.
DEFAULT_ALPHA_RANGE, DEFAULT_BETA_RANGE = (1e-4, 1e2), (0.5, 10.0)
DEFAULT_MC_SAMPLES = 32
# ProbVLMAdapter.embed's defaults (also those of an index built with an adapter, and of the command line).
DEFAULT_EMBED_OPTIONS = {"uncertainty": "total", "num_samples": DEFAULT_MC_SAMPLES, "seed": 0, "mean": "input"}


class Uncertainty(str, Enum):
    ALEATORIC = "aleatoric"  # the GGD's variance, dropout off
    EPISTEMIC = "epistemic"  # variance of mu over Monte Carlo dropout passes
    TOTAL = "total"  # both, by the law of total variance


class MeanSource(str, Enum):
    INPUT = "input"  # the frozen embedding: predictions of the deterministic model unchanged
    ADAPTER = "adapter"  # the adapter's mu


class GGDParams(NamedTuple):
    """A generalised Gaussian per dimension."""

    mu: Tensor  # [N, D]
    alpha: Tensor  # [N, D] scale, > 0
    beta: Tensor  # [N, D] shape, > 0 (2: Gaussian, 1: Laplace)


# ---- the distribution (SPEC.md section 9) -----------------------------------------------------------------

def ggd_nll(
    x: Tensor,  # [...] observations
    mu: Tensor,  # [...] (broadcastable) location
    alpha: Tensor,  # [...] scale, > 0
    beta: Tensor,  # [...] shape, > 0
) -> Tensor:  # [...] -log p(x), elementwise
    """Negative log-density of GGD(mu, alpha, beta): (|x - mu| / alpha)^beta + log(2 alpha Gamma(1/beta) / beta).

    The whole density, constants included (scipy.stats.gennorm(beta, mu, alpha).logpdf is its negative).
    Finite with finite gradients at x == mu for every beta > 0 (where |x - mu|^beta has an infinite
    slope for beta < 1, the gradient of |.| at 0 is taken as 0); no clamp hides large residuals.
    """
    for name, t in (("x", x), ("mu", mu), ("alpha", alpha), ("beta", beta)):
        check_tensor(name, t)
    for name, t in (("alpha", alpha), ("beta", beta)):
        if t.numel() and not bool((t > 0).all()):
            raise ValueError(f"argument '{name}' must be positive")
    return _ggd_nll(x, mu, alpha, beta)


def _ggd_nll(x: Tensor, mu: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    u = (x - mu).abs() / alpha
    positive = u > 0
    # Two wheres: the power is never evaluated at 0, so no 0 * inf reaches the gradient.
    powered = torch.where(positive, torch.where(positive, u, torch.ones_like(u)).pow(beta), torch.zeros_like(u))
    return powered + torch.log(alpha) - torch.log(beta) + torch.lgamma(1 / beta) + math.log(2.0)


def ggd_variance(
    alpha: Tensor,  # [...] scale, > 0
    beta: Tensor,  # [...] shape, > 0
) -> Tensor:  # [...] alpha^2 Gamma(3/beta) / Gamma(1/beta)
    """The variance of GGD(mu, alpha, beta), elementwise; the Gamma ratio through lgamma, so it stays
    finite wherever the result is representable."""
    check_tensor("alpha", alpha)
    check_tensor("beta", beta)
    if beta.numel() and not bool((beta > 0).all()):
        raise ValueError("argument 'beta' must be positive")
    return _ggd_variance(alpha, beta)


def _ggd_variance(alpha: Tensor, beta: Tensor) -> Tensor:
    return alpha * alpha * torch.exp(torch.lgamma(3 / beta) - torch.lgamma(1 / beta))


# ---- the adapter ----------------------------------------------------------------------------------------

class ProbVLMAdapter(nn.Module):
    """One modality's adapter (SPEC.md section 9): a residual MLP trunk z = x + f(x) and three heads.

    f: Linear D->h, ReLU, `depth` x (Linear h->h, ReLU, dropout), Linear h->D. Heads on z: mu
    (Linear-ReLU-Linear), 1/alpha and beta (Linear-ReLU-Linear-ReLU). The ReLU outputs are shifted to
    the lower end of `alpha_range` (as 1/alpha_max) and `beta_range` and clipped at the upper end, so
    both stay positive and sane while the gradient still reaches the lower end. The last Linear of
    those two heads starts at zero weights and a positive bias (alpha = 1, beta = 2 for every input).
    """

    def __init__(self, dim: int, hidden: int = DEFAULT_HIDDEN, depth: int = DEFAULT_DEPTH,
                 dropout: float = DEFAULT_DROPOUT, alpha_range: tuple[float, float] = DEFAULT_ALPHA_RANGE,
                 beta_range: tuple[float, float] = DEFAULT_BETA_RANGE):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"argument '{name}' must be a positive int, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"argument 'dropout' must be a number in [0, 1), got {dropout!r}")
        for name, bounds in (("alpha_range", alpha_range), ("beta_range", beta_range)):
            if (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
                    or not all(isinstance(b, (int, float)) and math.isfinite(b) for b in bounds)
                    or not 0 < bounds[0] < bounds[1]):
                raise ValueError(f"argument '{name}' must be (low, high) with 0 < low < high, finite, got {bounds!r}")
        self.dim, self.hidden, self.depth, self.dropout = dim, hidden, depth, float(dropout)
        self.alpha_range = (float(alpha_range[0]), float(alpha_range[1]))
        self.beta_range = (float(beta_range[0]), float(beta_range[1]))
        self.trunk_in = nn.Linear(dim, hidden)
        self.trunk_hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.trunk_out = nn.Linear(hidden, dim)
        self.mu_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.inv_alpha_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU())
        self.beta_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU())
        # The output ReLUs start in their active region: with the default initialisation a dimension whose
        # pre-activation is negative for every input would stay at alpha_max (a vanishing gradient from the
        # first step). Zero weights and a positive bias start every dimension at alpha = 1, beta = 2 (Gaussian).
        for head, start in ((self.inv_alpha_head, 1.0), (self.beta_head, max(2.0 - self.beta_range[0], 0.5))):
            nn.init.zeros_(head[2].weight)
            nn.init.constant_(head[2].bias, start)

    @property
    def config(self) -> dict:
        """The constructor's arguments (what `save` stores)."""
        return {"dim": self.dim, "hidden": self.hidden, "depth": self.depth, "dropout": self.dropout,
                "alpha_range": list(self.alpha_range), "beta_range": list(self.beta_range)}

    @property
    def in_features(self) -> int:
        return self.dim

    @property
    def out_features(self) -> int:
        return self.dim

    @property
    def device(self) -> torch.device:
        return self.trunk_in.weight.device

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

    def forward(
        self,
        x: Tensor,  # [N, D] frozen embeddings
        masks: Tensor | None = None,  # [depth, hidden] fixed dropout masks (already scaled by 1/(1-p))
    ) -> GGDParams:  # mu, alpha, beta: [N, D] each
        """The GGD of every dimension. Dropout follows `self.training` unless `masks` fixes it."""
        h = torch.relu(self.trunk_in(x))
        for number, layer in enumerate(self.trunk_hidden):
            h = torch.relu(layer(h))
            if masks is None:
                h = nn.functional.dropout(h, self.dropout, self.training)
            else:
                h = h * masks[number]
        z = x + self.trunk_out(h)
        inv_alpha = (self.inv_alpha_head(z) + 1 / self.alpha_range[1]).clamp(max=1 / self.alpha_range[0])
        beta = (self.beta_head(z) + self.beta_range[0]).clamp(max=self.beta_range[1])
        return GGDParams(self.mu_head(z), 1 / inv_alpha, beta)

    KIND = "adapter"  # what messages call it

    def embed_options(self, options: dict | None = None) -> dict:
        """`embed`'s keyword options completed with their defaults and checked: what an index records."""
        options = {**DEFAULT_EMBED_OPTIONS, **(options or {})}
        unknown = sorted(set(options) - set(DEFAULT_EMBED_OPTIONS))
        if unknown:
            raise ValueError(f"argument 'embed_options' takes uncertainty, num_samples, seed and mean, got {unknown}")
        options["uncertainty"] = parse_enum("embed_options['uncertainty']", options["uncertainty"], Uncertainty).value
        options["mean"] = parse_enum("embed_options['mean']", options["mean"], MeanSource).value
        return options

    def summary(self, embed_options: dict | None = None) -> dict:
        """What identifies the adapter cheaply (stored in an index, checked on use): configuration, parameter
        fingerprint and the embed options."""
        return {"method": "probvlm", **self.config, "fingerprint": self.fingerprint(),
                **self.embed_options(embed_options)}

    def fingerprint(self) -> str:
        """SHA-256 of the configuration and every parameter's bytes: identifies a trained adapter cheaply."""
        digest = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def dropout_masks(self, num_samples: int, seed: int) -> Tensor:  # [K, depth, hidden]
        """K sets of dropout masks, scaled by 1 / (1 - p), drawn on the CPU from `seed` (the same on every device)."""
        generator = torch.Generator().manual_seed(seed)
        keep = torch.rand(num_samples, self.depth, self.hidden, generator=generator) >= self.dropout
        return keep.to(self.trunk_in.weight.dtype) / (1 - self.dropout)

    def embed(
        self,
        x: Tensor,  # [N, D] frozen embeddings (as the adapter was trained on them)
        uncertainty: str | Uncertainty = DEFAULT_EMBED_OPTIONS["uncertainty"],
        num_samples: int = DEFAULT_EMBED_OPTIONS["num_samples"],  # Monte Carlo dropout passes (epistemic, total)
        seed: int = DEFAULT_EMBED_OPTIONS["seed"],  # of the dropout masks
        mean: str | MeanSource = DEFAULT_EMBED_OPTIONS["mean"],
        *,
        residual: Tensor | None = None,  # must be None: an adapter reads embeddings (the embedding protocol)
        against=None,  # the other side, ignored: a diagonal form caches nothing against it
    ) -> EmbeddingDistribution:  # diag form: mean [N, D], variances [N, D]
        """The embeddings as Gaussians with per-dimension variances (see the module docstring).

        The network runs in its parameters' dtype without gradients; the variances are returned in
        the accumulation dtype of `x` (float64 for float64, else float32), the mean in x's dtype for
        mean="input", else in that accumulation dtype. `residual` and `against` make the call the one a
        KronPosterior takes (`embed(phi, residual=..., against=..., **embed_options)`), so the index and the
        commands embed either without asking which it is.
        """
        if residual is not None:
            raise ValueError("argument 'residual' has no meaning for a ProbVLM adapter (it reads embeddings)")
        check_tensor("x", x, dim=2)
        if x.shape[1] != self.dim:
            raise ValueError(f"argument 'x' must be [N, {self.dim}] (the adapter's D), got {tuple(x.shape)}")
        weight = self.trunk_in.weight
        if x.device != weight.device:
            raise ValueError(f"argument 'x' must be on the adapter's device {weight.device}, got {x.device}")
        check_finite_rows("x", x)
        uncertainty = parse_enum("uncertainty", uncertainty, Uncertainty)
        mean = parse_enum("mean", mean, MeanSource)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"argument 'num_samples' must be an int >= 2, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"argument 'seed' must be an int, got {seed!r}")
        out = accumulation_dtype(x.dtype)
        inputs = x.to(weight.dtype)
        with torch.no_grad():
            if uncertainty is Uncertainty.ALEATORIC:
                mu, alpha, beta = self.forward(inputs, masks=torch.ones(self.depth, self.hidden, dtype=weight.dtype,
                                                                        device=weight.device))
                variances = _ggd_variance(alpha, beta)
            else:
                # Welford's running mean and sum of squared deviations of mu; the GGD variances averaged.
                masks = self.dropout_masks(num_samples, seed).to(weight.device)
                mu = m2 = aleatoric = None
                for k in range(num_samples):
                    mu_k, alpha_k, beta_k = self.forward(inputs, masks=masks[k])
                    if mu is None:
                        mu, m2, aleatoric = mu_k.clone(), torch.zeros_like(mu_k), _ggd_variance(alpha_k, beta_k)
                        continue
                    delta = mu_k - mu
                    mu = mu + delta / (k + 1)
                    m2 = m2 + delta * (mu_k - mu)
                    aleatoric = aleatoric + (_ggd_variance(alpha_k, beta_k) - aleatoric) / (k + 1)
                variances = m2 / num_samples
                if uncertainty is Uncertainty.TOTAL:
                    variances = variances + aleatoric
        location = x if mean is MeanSource.INPUT else mu.to(out)
        return EmbeddingDistribution.diagonal(location, variances.to(out))


class ProbVLM(nn.Module):
    """Both modalities' adapters, `image` and `text` (ProbVLMAdapter with one configuration).

    It speaks BayesVLM's protocol where that makes sense: `encode_image_features` / `encode_text_features`
    (here the features are the frozen embeddings), `logits`, `topk`, `save` / `load`, so that scoring,
    retrieval, the index and the evaluation take either method. `logits` and `topk` need the logit scale
    (and bias) of the model whose embeddings the adapters read: `logit_scale` / `logit_bias`, saved with
    the adapters (None until set: an adapter does not know its model's temperature).
    """

    def __init__(self, dim: int, **adapter_config):
        super().__init__()
        self.image = ProbVLMAdapter(dim, **adapter_config)
        self.text = ProbVLMAdapter(dim, **adapter_config)
        self.logit_scale: float | None = None  # log s of the model the embeddings come from
        self.logit_bias: float = 0.0

    @property
    def config(self) -> dict:
        return self.image.config

    @property
    def dim(self) -> int:
        return self.image.dim

    def adapter(self, tower: str) -> ProbVLMAdapter:
        """The adapter of `tower` ("image" or "text")."""
        if tower not in TOWERS:
            raise ValueError(f"argument 'tower' must be 'image' or 'text', got {tower!r}")
        return self.image if tower == "image" else self.text

    def embed(self, x: Tensor, tower: str, **kwargs) -> EmbeddingDistribution:
        """`self.adapter(tower).embed(x, **kwargs)`."""
        return self.adapter(tower).embed(x, **kwargs)

    def encode_image_features(
        self,
        embeddings: Tensor,  # [N, D] the frozen image embeddings the adapters were trained on
        **options,  # ProbVLMAdapter.embed's uncertainty, num_samples, seed, mean
    ) -> EmbeddingDistribution:  # diag form, N items
        """The image embeddings as Gaussians with per-dimension variances (SPEC.md section 9)."""
        return self.image.embed(embeddings, **options)

    def encode_text_features(
        self,
        embeddings: Tensor,  # [M, D] frozen text embeddings
        **options,
    ) -> EmbeddingDistribution:  # diag form, M items
        """The text embeddings as Gaussians with per-dimension variances."""
        return self.text.embed(embeddings, **options)

    def logits(
        self,
        images: EmbeddingDistribution,  # N items
        texts: EmbeddingDistribution,  # M items
        output: str = "mean",  # or "probit", "sigmoid_probit" (cosine_moments)
    ) -> tuple[Tensor, Tensor]:  # first [N, M], var [N, M]
        """Logit mean and variance of every pair (SPEC.md section 4, the diagonal path), with `logit_scale`."""
        from .moments import cosine_moments  # moments imports nothing of ProbVLM; local keeps the module light

        return cosine_moments(images, texts, self._scale(), self.logit_bias, output=output)

    def topk(
        self,
        queries: EmbeddingDistribution,  # N items of one modality
        gallery: EmbeddingDistribution,  # M items of the other
        k: int,
        score: str = "mean",  # "mean", "pessimistic", "optimistic" or "probit"
        kappa: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, indices (int64), mean, var: [N, k] each
        """The k best gallery items per query (SPEC.md section 7), streamed: see `bayesvlm_ext.topk`."""
        from .retrieval import topk

        return topk(queries, gallery, k, score, kappa, logit_scale=self._scale(), logit_bias=self.logit_bias)

    def _scale(self) -> float:
        if self.logit_scale is None:
            raise ValueError("ProbVLM.logit_scale is not set: set it to the log s of the model whose embeddings the "
                             "adapters read (e.g. model.logit_scale.item()), and logit_bias for SigLIP")
        return self.logit_scale

    def save(self, path: str | os.PathLike) -> None:
        """Write `path/probvlm.safetensors` (the parameters) and `path/probvlm.json` (the configuration)."""
        config = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "config": self.config,
                  "fingerprint": {tower: self.adapter(tower).fingerprint() for tower in TOWERS},
                  "logit_scale": self.logit_scale, "logit_bias": self.logit_bias}
        write_saved(path, TENSORS_FILE, self.state_dict(), CONFIG_FILE, config)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: torch.device | str = "cpu") -> "ProbVLM":
        """Read a model written by `save`; its parameters equal the saved ones bit for bit.

        A damaged or inconsistent directory is a ValueError naming the file, raised before the model is built:
        the configuration is checked against the tensors' names, shapes and dtypes in the safetensors header
        (a `hidden` of 1e9 would otherwise allocate tens of GB first), then the values must be finite.
        """
        owner = "ProbVLM.load"
        tensors_file, config_file = saved_files(path, TENSORS_FILE, CONFIG_FILE, owner)
        saved = read_config(config_file, owner)
        try:
            if saved.get("format") != SAVE_FORMAT:
                raise ValueError(f"format {saved.get('format')!r}, expected {SAVE_FORMAT!r}")
            if saved.get("version") != SAVE_VERSION:
                raise ValueError(f"version {saved.get('version')!r}, this bayesvlm_ext reads {SAVE_VERSION}")
            if not isinstance(saved.get("config"), dict):
                raise ValueError(f"'config' must be an object, got {saved.get('config')!r}")
            config = dict(saved["config"])
            dim = config.pop("dim")
            with torch.device("meta"):  # the shapes the configuration implies, with nothing allocated
                expected = {name: tuple(t.shape) for name, t in cls(dim, **config).state_dict().items()}
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{owner}: {config_file} is not a ProbVLM configuration ({error})") from None
        header = read_header(tensors_file, owner)
        missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{owner}: {tensors_file} does not fit {config_file} (missing {missing}, "
                             f"unexpected {unexpected})")
        for name, shape in expected.items():
            if header[name][1] != shape:
                raise ValueError(f"{owner}: {tensors_file} holds '{name}' of shape {header[name][1]}, but "
                                 f"{config_file} ({saved['config']}) needs {shape}")
        dtypes = sorted({dtype for dtype, _ in header.values()})
        if len(dtypes) != 1:
            raise ValueError(f"{owner}: {tensors_file} mixes dtypes {dtypes}; a saved model has one")
        tensors = read_tensors(tensors_file, str(torch.device(map_location)), owner)
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{owner}: {tensors_file} holds NaN or Inf in '{name}'")
        model = cls(dim, **config).to(device=map_location, dtype=next(iter(tensors.values())).dtype)
        model.load_state_dict(tensors)
        try:  # absent in adapters saved before they carried them: None and 0
            scale, bias = saved.get("logit_scale"), saved.get("logit_bias", 0.0)
            model.logit_scale = None if scale is None else check_logit_scale("logit_scale", scale)
            model.logit_bias = check_finite_scalar("logit_bias", bias)
        except ValueError as error:
            raise ValueError(f"{owner}: {config_file}: {error}") from None
        return model.eval()


# ---- the loss (SPEC.md section 9) ------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    """The published weights: T1 on the L1 term, T2 on the GGD negative log-likelihood, lambda_cross on
    the cross-modal terms."""

    l1: float = 1.0
    nll: float = 1e-4
    cross: float = 1e-4

    def __post_init__(self):
        for name in ("l1", "nll", "cross"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"LossWeights: '{name}' must be a finite number >= 0, got {value!r}")


def adapter_loss(
    params: GGDParams,  # one adapter's output, [N, D] each
    target: Tensor,  # [N, D]
    weights: LossWeights = LossWeights(),
) -> Tensor:  # scalar
    """T1 * mean |mu - target| + T2 * mean NLL_GGD(target): means over the N x D elements."""
    mu, alpha, beta = params
    return weights.l1 * (mu - target).abs().mean() + weights.nll * _ggd_nll(target, mu, alpha, beta).mean()


def probvlm_loss(
    model: ProbVLM,
    image: Tensor,  # [N, D] frozen image embeddings
    text: Tensor,  # [N, D] their captions' frozen text embeddings (pair i = row i)
    weights: LossWeights = LossWeights(),
) -> Tensor:  # scalar
    """Each adapter against its own modality, plus lambda_cross times each against the paired embedding
    of the other modality (the cross-modal alignment term)."""
    image_params, text_params = model.image(image), model.text(text)
    own = adapter_loss(image_params, image, weights) + adapter_loss(text_params, text, weights)
    if weights.cross == 0:
        return own
    return own + weights.cross * (adapter_loss(image_params, text, weights) + adapter_loss(text_params, image, weights))


# ---- training --------------------------------------------------------------------------------------------

@dataclass
class TrainingHistory:
    """Per completed epoch: the mean training loss over its batches and the validation loss (dropout off)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1  # 0-based epoch whose weights were kept
    stopped_early: bool = False
    seconds: float = 0.0  # training time over all calls (resumed runs included)


def train_probvlm(
    image: Tensor,  # [N, D] frozen image embeddings
    text: Tensor,  # [N, D] paired frozen text embeddings
    *,
    val_image: Tensor | None = None,  # [V, D] validation pairs; default: `val_fraction` of the pairs held out
    val_text: Tensor | None = None,  # [V, D]
    val_fraction: float = 0.1,
    hidden: int = DEFAULT_HIDDEN,
    depth: int = DEFAULT_DEPTH,
    dropout: float = DEFAULT_DROPOUT,
    weights: LossWeights = LossWeights(),
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    patience: int = 10,  # epochs without a better validation loss before stopping
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,  # save after every epoch, resume from it when it exists
    progress: bool = True,
    device: torch.device | str | None = None,  # default: the embeddings' device
    adapter_config: dict | None = None,  # further ProbVLMAdapter arguments (alpha_range, beta_range)
) -> tuple[ProbVLM, TrainingHistory]:
    """Trains both adapters with Adam on `probvlm_loss` (SPEC.md section 9) and returns the weights of the
    epoch with the lowest validation loss, in eval mode, with the history.

    Deterministic for a seed on a given device: the initialisation, the validation split, every epoch's
    shuffle and dropout come from `seed` (the global RNG is restored afterwards). With `checkpoint` the
    state is saved after every epoch; a later call with the same arguments (`epochs` may grow) resumes
    and ends with the same weights as an uninterrupted run. Float64 embeddings train a float64 model;
    any other dtype trains in float32.

    Finite or fail: embeddings holding NaN or Inf are refused up front (ValueError naming the tensor and its
    rows), and a run whose loss or parameters leave the finite numbers (e.g. float32 embeddings of magnitude
    1e20, whose GGD term overflows) stops with a ValueError before that state reaches the best weights or
    the checkpoint; nothing non-finite is ever returned.
    """
    for name, t in (("image", image), ("text", text)):
        check_tensor(name, t, dim=2)
        check_finite_rows(name, t)
    if image.shape != text.shape:
        raise ValueError(f"arguments 'image' and 'text' must be paired [N, D] tensors of one shape, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"argument '{name}' must be an int >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"argument 'seed' must be an int, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"argument 'lr' must be a positive finite number, got {lr!r}")
    if not isinstance(weights, LossWeights):
        raise ValueError(f"argument 'weights' must be a LossWeights, got {type(weights).__name__}")
    if adapter_config is not None and not set(adapter_config) <= {"alpha_range", "beta_range"}:
        raise ValueError(f"argument 'adapter_config' takes alpha_range and beta_range (hidden, depth and dropout are "
                         f"arguments of their own), got {sorted(adapter_config)}")
    device = image.device if device is None else torch.device(device)
    dtype = accumulation_dtype(image.dtype)
    train_x, train_y, val_x, val_y = _split(image, text, val_image, val_text, val_fraction, seed)
    train_x, train_y, val_x, val_y = (t.to(device=device, dtype=dtype) for t in (train_x, train_y, val_x, val_y))
    settings = {"hidden": hidden, "depth": depth, "dropout": dropout, "weights": asdict(weights),
                "batch_size": batch_size, "lr": lr, "patience": patience, "seed": seed,
                "adapter_config": adapter_config or {}, "dtype": str(dtype),
                "data": _digest(train_x, train_y, val_x, val_y)}

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = ProbVLM(image.shape[1], hidden=hidden, depth=depth, dropout=dropout, **(adapter_config or {}))
        model = model.to(device=device, dtype=dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        history, best_state, bad_epochs = TrainingHistory(), None, 0
        if checkpoint is not None and os.path.exists(checkpoint):
            history, best_state, bad_epochs = _load_checkpoint(checkpoint, settings, model, optimizer)
        done = len(history.train_loss)
        bar = tqdm(total=epochs, initial=min(done, epochs), disable=not progress, unit="epoch", desc="ProbVLM")
        for epoch in range(done, epochs):
            if history.stopped_early:
                break
            start = time.perf_counter()
            train_loss = _train_epoch(model, optimizer, train_x, train_y, weights, batch_size, seed, epoch)
            val_loss = _evaluate(model, val_x, val_y, weights, batch_size)
            # Checked before the weights can become the best state or reach a checkpoint: finite or fail.
            broken = [name for name, t in model.named_parameters() if not bool(torch.isfinite(t).all())]
            if broken:
                raise _diverged(f"after epoch {epoch} the parameters {', '.join(broken[:3])} hold NaN or Inf",
                                train_x, train_y)
            if not math.isfinite(val_loss):
                raise _diverged(f"the validation loss of epoch {epoch} is {val_loss}", val_x, val_y)
            history.train_loss.append(train_loss)
            history.val_loss.append(val_loss)
            if best_state is None or val_loss < history.val_loss[history.best_epoch]:
                history.best_epoch, bad_epochs = epoch, 0
                best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            else:
                bad_epochs += 1
                history.stopped_early = bad_epochs >= patience
            history.seconds += time.perf_counter() - start
            if checkpoint is not None:
                _save_checkpoint(checkpoint, settings, model, optimizer, history, best_state, bad_epochs)
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=history.best_epoch)
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def _split(image, text, val_image, val_text, val_fraction, seed):
    """(train image, train text, val image, val text): the given validation pairs or a seeded held-out part."""
    if (val_image is None) != (val_text is None):
        raise ValueError("arguments 'val_image' and 'val_text' must be given together")
    if val_image is not None:
        for name, t in (("val_image", val_image), ("val_text", val_text)):
            check_tensor(name, t, dim=2)
            check_finite_rows(name, t)
            if t.shape[1] != image.shape[1] or t.shape[0] == 0:
                raise ValueError(f"argument '{name}' must be [V, {image.shape[1]}] with V >= 1, got {tuple(t.shape)}")
        if val_image.shape != val_text.shape:
            raise ValueError(f"arguments 'val_image' and 'val_text' must have one shape, got "
                             f"{tuple(val_image.shape)} and {tuple(val_text.shape)}")
        if image.shape[0] == 0:
            raise ValueError("arguments 'image' and 'text' must hold at least one pair")
        return image, text, val_image, val_text
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"argument 'val_fraction' must be in (0, 1), got {val_fraction!r}")
    n = image.shape[0]
    held_out = max(1, round(val_fraction * n))
    if n - held_out < 1:
        raise ValueError(f"arguments 'image' and 'text' hold {n} pair(s): too few to hold out a validation part "
                         "and train on the rest (pass val_image and val_text)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(image.device)
    val, train = order[:held_out], order[held_out:]
    return image[train], text[train], image[val], text[val]


def _train_epoch(model, optimizer, image, text, weights, batch_size, seed, epoch) -> float:
    model.train()
    torch.manual_seed(seed * 1_000_003 + epoch + 1)  # this epoch's dropout, the same when resumed here
    order = torch.randperm(image.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    order = order.to(image.device)
    total, batches = 0.0, 0
    for b0 in range(0, image.shape[0], batch_size):
        rows = order[b0:b0 + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = probvlm_loss(model, image[rows], text[rows], weights)
        value = loss.item()
        if not math.isfinite(value):  # before the step: a NaN gradient would poison every parameter
            raise _diverged(f"the training loss of epoch {epoch}, batch {b0 // batch_size} is {value}", image, text)
        loss.backward()
        optimizer.step()
        total, batches = total + value, batches + 1
    return total / batches


def _diverged(what: str, image: Tensor, text: Tensor) -> ValueError:
    """The error that stops a training run which left the finite numbers (no weights are returned or saved)."""
    magnitude = max(float(image.abs().max()), float(text.abs().max())) if image.numel() else 0.0
    return ValueError(f"train_probvlm: training diverged: {what} (the embeddings reach |x| = {magnitude:.3g}; the GGD "
                      "likelihood raises residuals to the power beta, which overflows for large embeddings). "
                      "Normalise the embeddings (as CLIP does, to unit norm) or train in float64")


def _evaluate(model, image, text, weights, batch_size) -> float:
    """The loss over all validation pairs with dropout off (batch losses weighted by their size)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for b0 in range(0, image.shape[0], batch_size):
            x, y = image[b0:b0 + batch_size], text[b0:b0 + batch_size]
            total += probvlm_loss(model, x, y, weights).item() * x.shape[0]
    return total / image.shape[0]


def _digest(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(path, settings, model, optimizer, history, best_state, bad_epochs) -> None:
    state = {"version": CHECKPOINT_VERSION, "settings": json.dumps(settings, sort_keys=True),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_state": best_state,
             "bad_epochs": bad_epochs, "history": json.dumps(asdict(history))}
    with replacing(path, "argument 'checkpoint'") as temporary:  # a crash mid-save keeps the previous checkpoint
        torch.save(state, temporary)


def _load_checkpoint(path, settings, model, optimizer):
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path}: unknown version {state.get('version')!r}")
    saved = json.loads(state["settings"])
    if saved != settings:
        differing = sorted(key for key in settings if saved.get(key) != settings[key])
        raise ValueError(f"checkpoint {path} was written by a run with other settings or data (differs in "
                         f"{', '.join(differing)}); remove it or use another path")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return TrainingHistory(**json.loads(state["history"])), state["best_state"], int(state["bad_epochs"])
