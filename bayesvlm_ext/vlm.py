"""BayesVLM: a vision-language model and the posterior over both towers' last projections, as one object.

    vlm = BayesVLM.fit(model, loader)                       # SPEC 6: factors from pairs, lambda by the evidence
    vlm = BayesVLM.from_published(model, "hessians/dir/")   # SPEC 10: published factors
    vlm.save("posterior/");  vlm = BayesVLM.load("posterior/", model)
    img = vlm.encode_image(pixels)                          # EmbeddingDistribution [N, D] (SPEC 3)
    txt = vlm.encode_text(tokens)                           # [M, D]
    mean, var = vlm.logits(img, txt)                        # [N, M] logit moments (SPEC 4)
    clf = vlm.zero_shot(class_tokens);  clf.predict(pixels) # [N, C] probabilities (SPEC 5)
    vals, idx, mean, var = vlm.topk(txt, img, k=10, score="probit")   # SPEC 7
    vals, rows, mean, var = vlm.search(index, txt, 10, "probit", candidates=100)  # an on-disk index (SPEC 7)
    vlm.update(labelled_pixels, clf)                        # online update of the image tower (SPEC 8)
    vlm.tune(val_pixels, val_labels, clf)                   # SPEC 2: n on held-out data, lambda by the evidence

It holds the two `KronPosterior`s, the logit scale and bias, the likelihood, the number of pairs the
factors were fitted on (which the online update needs) and, optionally, the model itself: with the model,
`encode_image` / `encode_text` run the model's own forward once, capture the features entering each
projection (`capture`) and return the embedding's Gaussian, whose mean is the model's own unnormalised
embedding, bit for bit (its inference forward, under torch.no_grad); without it, `encode_*_features` take
captured features. Every method is a thin composition of the package's functions (`fit_factors`,
`KronPosterior`, `cosine_moments`, `topk`, `ZeroShotClassifier`, `update_posterior`), which stay available
for finer control.

A saved BayesVLM is the directory `bayesvlm-ext fit` writes: `posterior_image/`, `posterior_text/`
(`KronPosterior.save`), `bayesvlm/` (the published factor format of SPEC 10, readable by the reference
code) and `bayesvlm.json` (logit scale and bias, likelihood, number of pairs).

Over 400 lines for one reason: it is the one class a user holds, and each of its dozen methods (a few lines
over the functions above, plus their argument checks) belongs on it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from . import published
from ._files import output_directory, write_json
from .storage import read_config
from ._validation import check_finite_scalar, check_logit_scale, check_tensor, parse_enum
from .active import label_curvature, update_posterior
from .capture import Captured, ProjectionSite, capture, find_projection
from .curvature import DEFAULT_CLASS_BATCH_SIZE, Likelihood
from .distribution import EmbeddingDistribution
from .fit import TOWERS, fit_factors, model_logit_params, unnormalised_encoder
from .moments import MomentsOutput, Variant, cosine_moments
from .posterior import Damping, KronPosterior
from .retrieval import Score, topk
from .tuning import DEFAULT_GRID, PseudoCountSearch, tune_pseudo_count
from .zeroshot import ZeroShot, ZeroShotClassifier

__all__ = ["BayesVLM", "ZeroShot"]

SAVE_FORMAT = "bayesvlm_ext.BayesVLM"
SAVE_VERSION = 1
CONFIG_FILE = "bayesvlm.json"
PUBLISHED_FOLDER = "bayesvlm"  # SPEC 10's factor format, beside the package's own posterior folders
_SHORT = {"image": "img", "text": "txt"}  # the tower names of the published format
_ZERO_SHOT_LIKELIHOOD = {Likelihood.INFONCE: "softmax", Likelihood.SIGLIP: "sigmoid"}


class BayesVLM:
    """Both towers' posteriors with the logit scale, bias and likelihood they were fitted under.

    Args:
      image, text: each tower's KronPosterior (one embedding size D).
      logit_scale: log s, as the model stores it (at most 44, so that s^2 is finite in float32).
      logit_bias: beta (SigLIP); 0 for CLIP.
      likelihood: "infonce" (CLIP) or "siglip".
      num_data: the number of pairs the factors were fitted on (None when unknown, e.g. published
        factors); the online update needs it.
      model: the open_clip or Hugging Face model the posteriors belong to (optional: needed by
        `encode_image`, `encode_text`, `zero_shot` and `update`). Its projections must hold the
        posteriors' MAP weights, else the embeddings would not be the posteriors' means.
      sites: where each tower's projection is (default `find_projection(model, tower)`).
    """

    def __init__(self, image: KronPosterior, text: KronPosterior, *, logit_scale: float | Tensor,
                 logit_bias: float | Tensor = 0.0, likelihood: str | Likelihood = "infonce",
                 num_data: int | None = None, model: nn.Module | None = None,
                 sites: dict[str, ProjectionSite] | None = None):
        for name, posterior in (("image", image), ("text", text)):
            if not isinstance(posterior, KronPosterior):
                raise ValueError(f"argument '{name}' must be a KronPosterior, got {type(posterior).__name__}")
        if image.out_features != text.out_features:
            raise ValueError(f"arguments 'image' and 'text' must embed into one size D, got {image.out_features} and "
                             f"{text.out_features}")
        if num_data is not None and (isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 0):
            raise ValueError(f"argument 'num_data' must be a non-negative int or None, got {num_data!r}")
        self.posteriors = {"image": image, "text": text}
        self.logit_scale = check_logit_scale("logit_scale", logit_scale)
        self.logit_bias = check_finite_scalar("logit_bias", logit_bias)
        self.likelihood = parse_enum("likelihood", likelihood, Likelihood)
        self.num_data = num_data
        self.tuning: PseudoCountSearch | None = None  # the held-out search of `fit(val=...)`, if one ran
        self.model, self.sites = model, None
        if model is not None:
            if not isinstance(model, nn.Module):
                raise ValueError(f"argument 'model' must be an nn.Module, got {type(model).__name__}")
            self.sites = dict(sites) if sites is not None else {t: find_projection(model, t) for t in TOWERS}
            for tower in TOWERS:
                _check_same_layer(tower, self.sites[tower], self.posteriors[tower])
        elif sites is not None:
            raise ValueError("argument 'sites' needs argument 'model'")

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        model: nn.Module,  # open_clip / Hugging Face CLIP or SigLIP, in eval mode
        loader,  # iterable of (pixels [B, 3, H, W], tokens [B, L]) batches, pair i = (image i, caption i)
        *,
        likelihood: str | Likelihood | None = None,  # default: "siglip" for a model with a logit_bias, else "infonce"
        damping: str | Damping = "kron",
        pseudo_count: float = 1.0,  # n of SPEC 2 (lambda is tuned by the evidence at this n)
        class_batch_size: int = DEFAULT_CLASS_BATCH_SIZE,
        sites: dict[str, ProjectionSite] | None = None,
        device: torch.device | str | None = None,
        checkpoint: str | os.PathLike | None = None,  # resumable: see fit_factors
        fingerprint: dict | None = None,  # what ties a checkpoint to its inputs: see fit_factors
        progress: bool = True,  # tqdm bar
        distributed: bool | None = None,  # under torchrun: sums all-reduced (see fit_factors)
        val: tuple[Tensor, ...] | None = None,  # held-out (pixels, tokens) pairs, or (pixels, labels, class_tokens)
    ) -> "BayesVLM":
        """Fits both towers' posteriors from image-caption pairs (SPEC.md sections 2 and 6) and tunes each
        lambda by the evidence. Nothing is trained; the model is only run forward.

        With `val`, the pseudo-count is then chosen on held-out data (`tune`; it replaces `pseudo_count`):
        (pixels [V, 3, H, W], tokens [V, L]) scores the matching of each
        image to its own caption, (pixels, labels [V], class_tokens [C, L] or [C, T, L]) zero-shot labels. The
        search's table is kept as `vlm.tuning`."""
        log_scale, bias = model_logit_params(model)
        likelihood = likelihood or default_likelihood(model)
        fits = fit_factors(model, loader, likelihood=likelihood, class_batch_size=class_batch_size, sites=sites,
                           device=device, checkpoint=checkpoint, fingerprint=fingerprint, progress=progress,
                           distributed=distributed)
        posteriors = {}
        for tower in TOWERS:
            fit = fits[tower]
            posteriors[tower] = KronPosterior(fit.A, fit.B, fit.weight, fit.bias, pseudo_count=pseudo_count,
                                              damping=damping)
            posteriors[tower].optimize_prior_precision()
        vlm = cls(posteriors["image"], posteriors["text"], logit_scale=log_scale, logit_bias=bias,
                  likelihood=likelihood, num_data=fits["image"].count, model=model, sites=sites)
        if val is not None:
            if not isinstance(val, (tuple, list)) or len(val) not in (2, 3):
                raise ValueError("argument 'val' must be (pixels, tokens) or (pixels, labels, class_tokens), got "
                                 f"{type(val).__name__} of {len(val) if isinstance(val, (tuple, list)) else '?'} items")
            classifier = vlm.zero_shot(val[2]) if len(val) == 3 else None
            vlm.tuning = vlm.tune(val[0], val[1], classifier, progress=progress)
        return vlm

    @classmethod
    def from_published(
        cls,
        model: nn.Module,
        path: str | os.PathLike,  # A_img_analytic.pt, ..., prior_precision_analytic.json (SPEC 10)
        *,
        damping: str | Damping = "kron",
        likelihood: str | Likelihood | None = None,  # default as in `fit`
        sites: dict[str, ProjectionSite] | None = None,
        map_location: torch.device | str = "cpu",
    ) -> "BayesVLM":
        """Both towers from the published factor format (SPEC.md section 10), with the model's own projections
        as the MAP weights. The number of fitting pairs is not recorded there: `num_data` is None."""
        sites = dict(sites) if sites is not None else {t: find_projection(model, t) for t in TOWERS}
        posteriors = {}
        for tower in TOWERS:
            weight, bias = sites[tower].layer()
            posteriors[tower] = KronPosterior.from_bayesvlm_dir(path, _SHORT[tower], weight.to(map_location),
                                                                None if bias is None else bias.to(map_location),
                                                                damping=damping, map_location=map_location)
        log_scale, logit_bias = model_logit_params(model)
        likelihood = likelihood or default_likelihood(model)
        return cls(posteriors["image"], posteriors["text"], logit_scale=log_scale, logit_bias=logit_bias,
                   likelihood=likelihood, model=model, sites=sites)

    @staticmethod
    def saved_files() -> list[str]:
        """The files `save` writes, relative to its directory (so that a command can check them before any work)."""
        from .posterior import CONFIG_FILE as POSTERIOR_CONFIG, TENSORS_FILE as POSTERIOR_TENSORS

        files = [CONFIG_FILE] + [f"{PUBLISHED_FOLDER}/{name}" for name in published.files()]
        return files + [f"posterior_{tower}/{name}" for tower in TOWERS
                        for name in (POSTERIOR_TENSORS, POSTERIOR_CONFIG)]

    def save(self, path: str | os.PathLike) -> None:
        """Writes the directory `bayesvlm-ext fit` writes (module docstring); every file written aside and renamed."""
        path = output_directory(path, "argument 'path'")
        for tower in TOWERS:
            self.posteriors[tower].save(os.path.join(path, f"posterior_{tower}"))
        published.write(output_directory(os.path.join(path, PUBLISHED_FOLDER), "argument 'path'"),
                        {_SHORT[tower]: (p.A, p.B, p.prior_precision, p.pseudo_count)
                         for tower, p in self.posteriors.items()})
        write_json(os.path.join(path, CONFIG_FILE), {
            "format": SAVE_FORMAT, "version": SAVE_VERSION, "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias, "likelihood": self.likelihood.value, "num_data": self.num_data},
            "argument 'path'")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,  # a directory written by `save` or `bayesvlm-ext fit`
        model: nn.Module | None = None,
        *,
        sites: dict[str, ProjectionSite] | None = None,
        map_location: torch.device | str = "cpu",
    ) -> "BayesVLM":
        """Reads what `save` wrote; the posteriors equal the saved ones exactly. A directory written before
        `bayesvlm.json` existed takes the logit scale and bias from `model` (and needs it) and the number of
        pairs from `summary.json`."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"BayesVLM.load: {path} is not a directory")
        posteriors = {tower: KronPosterior.load(os.path.join(path, f"posterior_{tower}"), map_location)
                      for tower in TOWERS}
        config_file = os.path.join(path, CONFIG_FILE)
        if os.path.isfile(config_file):
            config = read_config(config_file, "BayesVLM.load")
            for key in ("format", "logit_scale", "logit_bias", "likelihood", "num_data"):
                if key not in config:
                    raise ValueError(f"BayesVLM.load: {config_file} lacks the key '{key}'")
            if config["format"] != SAVE_FORMAT:
                raise ValueError(f"BayesVLM.load: {config_file} has format {config['format']!r}, expected "
                                 f"{SAVE_FORMAT!r}")
            settings = {key: config[key] for key in ("logit_scale", "logit_bias", "likelihood", "num_data")}
        else:
            if model is None:
                raise ValueError(f"BayesVLM.load: {path} has no {CONFIG_FILE} (written by an older bayesvlm_ext): "
                                 "pass the model, whose logit scale and bias it then uses")
            log_scale, logit_bias = model_logit_params(model)
            likelihood = default_likelihood(model)
            summary_file = os.path.join(path, "summary.json")
            num_data = read_config(summary_file, "BayesVLM.load").get("pairs") if os.path.isfile(summary_file) else None
            settings = {"logit_scale": log_scale, "logit_bias": logit_bias, "likelihood": likelihood,
                        "num_data": num_data}
        try:
            return cls(posteriors["image"], posteriors["text"], model=model, sites=sites, **settings)
        except ValueError as error:
            raise ValueError(f"BayesVLM.load: {path}: {error}") from None

    # ---- embeddings --------------------------------------------------------------------------------
    @property
    def image(self) -> KronPosterior:
        return self.posteriors["image"]

    @property
    def text(self) -> KronPosterior:
        return self.posteriors["text"]

    @property
    def dim(self) -> int:
        """D, the embedding size."""
        return self.image.out_features

    def encode_image(
        self,
        pixels: Tensor,  # [N, 3, H, W] what the model's image tower takes
    ) -> EmbeddingDistribution:  # N items; mean [N, D] = the model's own unnormalised embedding
        """The model's image embeddings with their posterior covariance (SPEC.md section 3), statistics cached
        against the text tower (cheap scoring against any text batch)."""
        return self._encode("image", pixels)

    def encode_text(
        self,
        tokens: Tensor,  # [M, L] what the model's text tower takes
    ) -> EmbeddingDistribution:  # M items; mean [M, D] = the model's own unnormalised embedding
        """The model's text embeddings with their posterior covariance, statistics cached against the image tower."""
        return self._encode("text", tokens)

    def encode_image_features(
        self,
        features: Tensor,  # [N, P_img] captured features entering the image projection
        residual: Tensor | None = None,  # [N, D] SigLIP's image residual
    ) -> EmbeddingDistribution:  # N items
        """`encode_image` from features captured earlier (no model needed): the mean is the posterior's W phi + b."""
        return self.image.embed(features, residual, against=self.text)

    def encode_text_features(
        self,
        features: Tensor,  # [M, P_txt]
        residual: Tensor | None = None,  # [M, D]
    ) -> EmbeddingDistribution:  # M items
        """`encode_text` from captured features."""
        return self.text.embed(features, residual, against=self.image)

    def capture(self, tower: str, inputs: Tensor) -> Captured:  # features [N, P], embeddings [N, D], residual
        """One forward of the model's `tower` ("image" or "text") with the projection's input recorded."""
        if self.model is None:
            raise ValueError("this BayesVLM holds no model: build it with model=... (or use encode_*_features)")
        if tower not in TOWERS:
            raise ValueError(f"argument 'tower' must be 'image' or 'text', got {tower!r}")
        check_tensor("inputs", inputs, floating=tower == "image")
        parameter = next(self.model.parameters())  # inputs go where the model is; pixels in its precision
        inputs = inputs.to(parameter.device, parameter.dtype) if tower == "image" else inputs.to(parameter.device)
        return capture(unnormalised_encoder(self.model, tower), inputs, self.sites[tower])

    def _encode(self, tower: str, inputs: Tensor) -> EmbeddingDistribution:
        captured = self.capture(tower, inputs)
        posterior, other = self.posteriors[tower], self.posteriors["text" if tower == "image" else "image"]
        features = captured.features.to(posterior.device)
        residual = None if captured.residual is None else captured.residual.to(posterior.device)
        embedded = posterior.embed(features, residual, against=other)
        # The covariance is the posterior's; the mean is the model's own output rather than the posterior's
        # W phi + b (the same numbers up to rounding: another GEMM), so the statistics are cached for it.
        dist = EmbeddingDistribution(captured.embeddings.to(posterior.device), embedded.covariance)
        return dist.precompute(against=embedded.cross_shared)

    # ---- scoring -----------------------------------------------------------------------------------
    def logits(
        self,
        images: EmbeddingDistribution,  # N items
        texts: EmbeddingDistribution,  # M items
        output: str | MomentsOutput = "mean",  # or "probit", "sigmoid_probit" (cosine_moments)
        variant: str | Variant | None = None,
    ) -> tuple[Tensor, Tensor]:  # first [N, M], var [N, M]
        """Mean and variance of every image-text logit s cos + beta (SPEC.md section 4), fused."""
        return cosine_moments(images, texts, self.logit_scale, self.logit_bias, variant=variant, output=output)

    def topk(
        self,
        queries: EmbeddingDistribution,  # N items of one tower
        gallery: EmbeddingDistribution,  # M items of the other
        k: int,
        score: str | Score = "mean",
        kappa: float = 1.0,
        variant: str | Variant | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, indices (int64), mean, var: [N, k] each
        """The k best gallery items per query by `score` (SPEC.md section 7), streamed: see `bayesvlm_ext.topk`."""
        return topk(queries, gallery, k, score, kappa, logit_scale=self.logit_scale, logit_bias=self.logit_bias,
                    variant=variant)

    def search(
        self,
        index,  # a RetrievalIndex (open_index / build_index) of one tower's items, built from these posteriors
        queries: EmbeddingDistribution,  # N items of the other tower
        k: int,
        score: str | Score = "mean",
        kappa: float = 1.0,
        **options,  # variant, shards, candidates, nprobe, ef_search: as `bayesvlm_ext.index.search`
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, gallery rows (int64), mean, var: [N, k] each
        """The k best items of an on-disk index per query with this model's logit scale and bias (SPEC.md section
        7): exact streaming search, or with `candidates=C` on an index built with `ann=`, FAISS candidates scored
        exactly (`bayesvlm_ext.index.search`)."""
        from .index import search  # the index package imports the posterior module, not this one

        return search(index, queries, k, score, kappa, logit_scale=self.logit_scale, logit_bias=self.logit_bias,
                      **options)

    def zero_shot(
        self,
        class_tokens: Tensor,  # [C, L] one prompt per class, or [C, T, L] T templates per class
    ) -> "ZeroShot":
        """A zero-shot classifier over C classes (SPEC.md section 5; templates averaged in feature space by
        `template_average`, so that their correlation under the posterior is kept)."""
        check_tensor("class_tokens", class_tokens, floating=False)
        if class_tokens.dim() not in (2, 3) or class_tokens.shape[0] == 0:
            raise ValueError(f"argument 'class_tokens' must be [C, L] or [C, T, L] with C >= 1, got "
                             f"{tuple(class_tokens.shape)}")
        templates = class_tokens if class_tokens.dim() == 3 else class_tokens[:, None]
        classes, per_class = templates.shape[:2]
        captured = self.capture("text", templates.reshape(classes * per_class, -1))
        features = captured.features.to(self.text.device).reshape(classes, per_class, -1)
        residual = None if captured.residual is None else \
            captured.residual.to(self.text.device).reshape(classes, per_class, -1)
        classifier = ZeroShotClassifier.from_templates(self.image, self.text, features, self.logit_scale,
                                                       self.logit_bias, _ZERO_SHOT_LIKELIHOOD[self.likelihood],
                                                       residual)
        return ZeroShot(self, classifier)

    def update(
        self,
        pixels: Tensor,  # [n, 3, H, W] newly labelled images
        classifier: "ZeroShot",  # the zero-shot task they were labelled for
    ) -> None:
        """Folds the labelled images into the image tower's posterior (SPEC.md section 8) and re-tunes its lambda.

        The factors gain the images' features and their GGN for the classifier's task (label-free: a GGN
        does not depend on the labels, which would only move the MAP weight); the number of pairs grows
        by n. The text tower is unchanged."""
        if not isinstance(classifier, ZeroShot) or classifier.vlm is not self:
            raise ValueError("argument 'classifier' must be a ZeroShot made by this BayesVLM's zero_shot")
        if self.num_data is None:
            raise ValueError("the number of pairs the factors were fitted on is unknown (published factors): set "
                             "vlm.num_data before updating")
        captured = self.capture("image", pixels)
        features = captured.features.to(self.image.device)
        residual = None if captured.residual is None else captured.residual.to(self.image.device)
        curvature = label_curvature(classifier.classifier, features, residual)
        self.posteriors["image"] = update_posterior(self.image, features, curvature, self.num_data)
        self.num_data += features.shape[0]

    def tune(
        self,
        pixels: Tensor,  # [N, 3, H, W] held-out images (not the test set)
        targets: Tensor,  # [N] labels over `classifier`'s classes, or [N, L] tokens of the images' own captions
        classifier: "ZeroShot | None" = None,  # the zero-shot task the labels belong to; None: caption matching
        *,
        grid: Sequence[float] = DEFAULT_GRID,  # pseudo-counts n, shared by both towers
        link: str = "probit",
        progress: bool = True,
    ) -> PseudoCountSearch:
        """Chooses the pseudo-count n on held-out data and lambda by the evidence at it (SPEC.md section 2).

        Each n of `grid` is scored by the NLPD of the predictive on the held-out images: their labels under
        `classifier`, or, without one, which of the N held-out captions is each image's own (the fit's
        matching task). Both posteriors end at the best n (the search's table is returned); ZeroShot
        classifiers made earlier follow. The model runs forward once on `pixels` (and `targets` tokens)."""
        captured = self.capture("image", pixels)
        if classifier is not None:
            if not isinstance(classifier, ZeroShot) or classifier.vlm is not self:
                raise ValueError("argument 'classifier' must be a ZeroShot made by this BayesVLM's zero_shot")
            check_tensor("targets", targets, dim=1, floating=False)
            inner = classifier.classifier
            labels, class_features, class_residual = targets, inner.class_features, inner.class_residual
        else:
            check_tensor("targets", targets, dim=2, floating=False)
            if targets.shape[0] != captured.features.shape[0]:
                raise ValueError(f"argument 'targets' must hold one caption per image ({captured.features.shape[0]}), "
                                 f"got {targets.shape[0]}")
            text = self.capture("text", targets)
            labels = torch.arange(targets.shape[0])
            class_features, class_residual = text.features, text.residual
        search = self.tune_features(captured.features, labels, class_features, image_residual=captured.residual,
                                    class_residual=class_residual, grid=grid, link=link, progress=progress)
        search.extra["task"] = "zero-shot" if classifier is not None else "caption matching"
        return search

    def tune_features(
        self,
        image_features: Tensor,  # [N, P_img] held-out images' captured features
        labels: Tensor,  # [N] int64 in [0, C)
        class_features: Tensor,  # [C, P_txt] the classes' (or the held-out captions') text features
        *,
        image_residual: Tensor | None = None,  # [N, D]
        class_residual: Tensor | None = None,  # [C, D]
        grid: Sequence[float] = DEFAULT_GRID,
        link: str = "probit",
        progress: bool = True,
    ) -> PseudoCountSearch:
        """`tune` from captured features (no model needed): `tuning.tune_pseudo_count` under this BayesVLM's
        logit scale, bias and likelihood."""
        def on(device, t):
            return None if t is None else t.to(device)
        search = tune_pseudo_count(self.image, self.text, on(self.image.device, image_features),
                                   on(self.image.device, labels), on(self.text.device, class_features),
                                   self.logit_scale, self.logit_bias, _ZERO_SHOT_LIKELIHOOD[self.likelihood],
                                   image_residual=on(self.image.device, image_residual),
                                   class_residual=on(self.text.device, class_residual), grid=grid, link=link,
                                   progress=progress)
        search.extra["held_out"] = int(image_features.shape[0])
        return search

    def __repr__(self) -> str:
        return (f"BayesVLM(D={self.dim}, image P={self.image.in_features}, text P={self.text.in_features}, "
                f"damping={self.image.damping.value!r}, likelihood={self.likelihood.value!r}, "
                f"logit_scale={self.logit_scale:.4g}, logit_bias={self.logit_bias:.4g}, num_data={self.num_data}, "
                f"model={type(self.model).__name__ if self.model is not None else None})")


def default_likelihood(model: nn.Module) -> Likelihood:
    """SigLIP's sigmoid likelihood for a model with a logit bias (open_clip and Hugging Face SigLIP keep one;
    CLIP has none or None), else CLIP's InfoNCE."""
    return Likelihood.SIGLIP if getattr(model, "logit_bias", None) is not None else Likelihood.INFONCE


def _check_same_layer(tower: str, site: ProjectionSite, posterior: KronPosterior) -> None:
    """The model's projection must be the posterior's MAP weight: its embeddings are then the posterior's means."""
    weight, bias = site.layer()
    same = (tuple(weight.shape) == tuple(posterior.weight.shape) and (bias is None) == (posterior.bias is None)
            and torch.equal(weight.to(posterior.weight), posterior.weight)
            and (bias is None or torch.equal(bias.to(posterior.bias), posterior.bias)))
    if not same:
        raise ValueError(f"the model's {tower} projection ({type(site.module).__name__}.{site.name}, weight "
                         f"{tuple(weight.shape)}) is not the {tower} posterior's MAP weight "
                         f"{tuple(posterior.weight.shape)}: the posterior was fitted on another model")
