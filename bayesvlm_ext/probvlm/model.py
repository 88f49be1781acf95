"""ProbVLM's adapters (SPEC.md section 9): `ProbVLMAdapter`, one modality's network from a frozen embedding
to a GGD per dimension, and `ProbVLM`, both modalities' adapters with BayesVLM's protocol, save and load.

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
from enum import Enum

import torch
from torch import Tensor, nn

from .._validation import (accumulation_dtype, check_finite_rows, check_finite_scalar, check_logit_scale, check_tensor,
                           parse_enum)
from ..distribution import EmbeddingDistribution
from ..storage import read_config, read_header, read_tensors, saved_files, write_saved
from .ggd import GGDParams, ggd_variance_unchecked

__all__ = ["ProbVLM", "ProbVLMAdapter", "Uncertainty", "MeanSource"]

TOWERS = ("image", "text")
SAVE_FORMAT = "bayesvlm_ext.ProbVLM"
SAVE_VERSION = 1
TENSORS_FILE = "probvlm.safetensors"
CONFIG_FILE = "probvlm.json"
# Published defaults (SPEC.md section 9).
DEFAULT_HIDDEN, DEFAULT_DEPTH, DEFAULT_DROPOUT = 256, 1, 0.05
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
                variances = ggd_variance_unchecked(alpha, beta)
            else:
                # Welford's running mean and sum of squared deviations of mu; the GGD variances averaged.
                masks = self.dropout_masks(num_samples, seed).to(weight.device)
                mu = m2 = aleatoric = None
                for k in range(num_samples):
                    mu_k, alpha_k, beta_k = self.forward(inputs, masks=masks[k])
                    if mu is None:
                        aleatoric = ggd_variance_unchecked(alpha_k, beta_k)
                        mu, m2 = mu_k.clone(), torch.zeros_like(mu_k)
                        continue
                    delta = mu_k - mu
                    mu = mu + delta / (k + 1)
                    m2 = m2 + delta * (mu_k - mu)
                    aleatoric = aleatoric + (ggd_variance_unchecked(alpha_k, beta_k) - aleatoric) / (k + 1)
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
        from ..moments import cosine_moments  # moments imports nothing of ProbVLM; local keeps the module light

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
        from ..retrieval import topk

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

