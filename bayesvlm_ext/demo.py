"""`make demo` (`python -m bayesvlm_ext.demo [--out DIR]`): BayesVLM on the embedded default model.

Everything goes through the public API a user would call, on the package's own data (`shapes`) and
model (`default_model`, trained on the first run and cached; nothing is downloaded):

1. the default model: a tiny open_clip CLIP trained contrastively on generated shapes;
2. the posterior of both towers: `fit_factors` over generated in-domain pairs (the curvature code of
   SPEC.md section 6, InfoNCE), one `KronPosterior` per tower, lambda tuned on the evidence;
3. zero-shot shape classification (6 classes; each class prompt averaged over 60 caption templates,
   `ZeroShotClassifier.from_templates`) in domain and under shift (new backgrounds, blur, noise,
   colour-shape combinations never seen in training): accuracy, NLPD and ECE for the MAP model and
   for BayesVLM with the probit approximation and with Monte Carlo;
4. retrieval both ways over the images of both domains and their distinct captions: Recall@1/5/10 for
   the MAP model (ranked by cosine) and BayesVLM (ranked by the probit match probability, streamed
   top-k), and for BayesVLM Recall@1 per bin of query uncertainty with the Spearman correlation between
   uncertainty and recall (the ProbVLM paper's calibration check);
5. kernel timings: the fused logit moments against the naive published formulation on the demo's
   sizes (every test image against every distinct caption).

Prints the tables and writes the same numbers to DIR/results.json (default outputs/demo), in the
layout `zero_shot.{in_domain,shifted}.{map,bayesvlm_probit,bayesvlm_mc}.{acc,nlpd,ece}`,
`retrieval.{map,bayesvlm}.{image_to_text,text_to_image}.{recall@1,recall@5,recall@10,spearman}` and
`timings` (seconds per stage), plus two plots: DIR/reliability.png (zero-shot reliability diagrams)
and DIR/uncertainty_recall.png (Recall@1 per uncertainty bin).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from torch import Tensor, nn

import bayesvlm_ext
from bayesvlm_ext import (KronPosterior, ZeroShotClassifier, cosine_moments, default_model, evaluation, predictive,
                          reference, shapes, topk)
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.fit import unnormalised_encoder

SEED = 0
FIT_PAIRS = 8192  # in-domain pairs behind the curvature factors (one class batch)
EVAL_IMAGES = 3000  # per domain
MC_SAMPLES = 1000
TIMING_REPEATS = 5
RETRIEVAL_K = 10
UNCERTAINTY_BINS = 10
RELIABILITY_BINS = 10  # in the plot; the ECE figures use the 20 bins of bayesvlm_ext.ece
DOMAINS = {"in_domain": "test", "shifted": "shifted"}


class PairsDataset(torch.utils.data.Dataset):
    """Generated pairs as the model takes them: (normalised pixels [3, S, S], tokens [L])."""

    def __init__(self, data: shapes.ShapesData):
        self.images, self.tokens = shapes.normalise_images(data.images), shapes.tokenize(data.captions)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.tokens[index]


def features(model: nn.Module, tower: str, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """[N, P] float64 features entering the tower's projection (bayesvlm_ext.capture)."""
    site, encode = find_projection(model, tower), unnormalised_encoder(model, tower)
    parts = [capture(encode, inputs[i:i + batch_size], site).features for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(parts).double()


def fit_posteriors(model: nn.Module) -> dict[str, KronPosterior]:
    data = shapes.generate(FIT_PAIRS, "train", seed=SEED + 100)
    loader = torch.utils.data.DataLoader(PairsDataset(data), batch_size=512)
    fits = bayesvlm_ext.fit_factors(model, loader, likelihood="infonce", class_batch_size=FIT_PAIRS, progress=False)
    posteriors = {}
    for tower, fit in fits.items():
        posteriors[tower] = KronPosterior(fit.A, fit.B, fit.weight, fit.bias, damping="kron")
        posteriors[tower].optimize_prior_precision()
    return posteriors


def class_templates(model: nn.Module) -> Tensor:  # [C, T, P_txt]
    """Each shape class described by all 60 captions of that shape (sizes x colours x positions)."""
    prompts = [f"a {size} {colour} {shape} {where}" for shape in shapes.SHAPES for size in shapes.SIZES
               for colour in shapes.COLOURS for where in shapes.POSITIONS]
    phi = features(model, "text", shapes.tokenize(prompts))
    return phi.reshape(len(shapes.SHAPES), -1, phi.shape[1])


def timed(fn, repeats: int = TIMING_REPEATS):
    """(fn(), median seconds over `repeats` calls after one warm-up call)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return result, sorted(times)[len(times) // 2]


def metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    return {"acc": bayesvlm_ext.accuracy(probs, labels), "nlpd": bayesvlm_ext.nlpd(probs, labels),
            "ece": bayesvlm_ext.ece(probs, labels)}


def ranked_hits(
    top: Tensor,  # [N, K] gallery indices, best first
    query_labels: Tensor,  # [N] the label each query must find
    gallery_labels: Tensor,  # [M] the label of each gallery item
) -> Tensor:  # [N, K] bool
    return gallery_labels[top] == query_labels[:, None]


def retrieval(posteriors: dict[str, KronPosterior], phi_img: Tensor, image_captions: Tensor, phi_txt: Tensor,
              logit_scale: float) -> tuple[dict, dict]:
    """Both directions: images find their caption among the distinct captions, captions find an image
    with that caption. Returns the results layout and the per-bin curves for the plot."""
    directions = {"image_to_text": ("image", "text", image_captions, torch.arange(len(phi_txt))),
                  "text_to_image": ("text", "image", torch.arange(len(phi_txt)), image_captions)}
    phi = {"image": phi_img.float(), "text": phi_txt.float()}
    dist = {tower: posteriors[tower].embed(phi[tower], against=posteriors[other])
            for tower, other in (("image", "text"), ("text", "image"))}
    unit = {tower: torch.nn.functional.normalize(d.mean.double(), dim=1) for tower, d in dist.items()}
    results: dict = {"map": {}, "bayesvlm": {}}
    curves = {}
    for name, (query, gallery, query_labels, gallery_labels) in directions.items():
        # MAP: the deterministic model's cosine, dense (small here), ties to the lower index as in topk
        cosines = unit[query] @ unit[gallery].T
        top_map = cosines.argsort(dim=1, descending=True, stable=True)[:, :RETRIEVAL_K]
        results["map"][name] = evaluation.recall_at_k(ranked_hits(top_map, query_labels, gallery_labels))
        # BayesVLM: streamed top-k by the probit match probability
        _, top, _, _ = topk(dist[query], dist[gallery], RETRIEVAL_K, "probit", logit_scale=logit_scale)
        hits = ranked_hits(top, query_labels, gallery_labels)
        # Query uncertainty relative to its length, tr(S) / ||mean||^2: what the cosine's variance sees.
        uncertainty = dist[query].trace().double() / dist[query].mean.double().pow(2).sum(1)
        bin_uncertainty, bin_recall, rho = evaluation.uncertainty_recall(uncertainty, hits[:, 0], UNCERTAINTY_BINS)
        results["bayesvlm"][name] = {**evaluation.recall_at_k(hits), "spearman": rho}
        curves[name] = {"uncertainty": bin_uncertainty.tolist(), "recall@1": bin_recall.tolist()}
    return results, curves


def save_plots(out: str, zero_shot_probs: dict, labels: dict, retrieval_results: dict, curves: dict) -> list[str]:
    """DIR/reliability.png and DIR/uncertainty_recall.png (matplotlib, drawn off-screen)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(out, "reliability.png"), os.path.join(out, "uncertainty_recall.png")]
    fig, axes = plt.subplots(1, len(zero_shot_probs), figsize=(5 * len(zero_shot_probs), 4.6), squeeze=False)
    for ax, (domain, methods) in zip(axes[0], zero_shot_probs.items()):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
        for method, probs in methods.items():
            count, confidence, acc = bayesvlm_ext.reliability(probs, labels[domain], RELIABILITY_BINS)
            occupied = count > 0
            ece = bayesvlm_ext.ece(probs, labels[domain])
            ax.plot(confidence[occupied], acc[occupied], marker="o", label=f"{method} (ECE {ece:.3f})")
        ax.set(title=f"zero-shot, {domain.replace('_', ' ')}", xlabel="confidence (top class)",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4.2), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        rho = retrieval_results["bayesvlm"][name]["spearman"]
        ax.plot(curve["uncertainty"], curve["recall@1"], marker="o", label=f"BayesVLM (Spearman {rho:.2f})")
        ax.axhline(retrieval_results["map"][name]["recall@1"], color="0.5", linestyle="--", label="MAP, all queries")
        ax.set(title=name.replace("_", " "), xlabel="query uncertainty tr(S) / ||mean||^2 (bin mean)",
               ylabel="Recall@1 in the bin", ylim=(0, 1.02))
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("outputs", "demo"), help="output directory")
    args = parser.parse_args(argv)
    timings: dict[str, float] = {}
    start_all = time.perf_counter()
    print(f"bayesvlm_ext {bayesvlm_ext.__version__}, torch {torch.__version__}, backend('cpu') = "
          f"{bayesvlm_ext.backend('cpu')!r}, {torch.get_num_threads()} threads")

    # 1. the default model (trained and cached on the first run)
    start = time.perf_counter()
    model = default_model.load_default_model()
    timings["default_model"] = time.perf_counter() - start
    logit_scale = model.logit_scale.item()
    print(f"default model: open_clip CLIP, logit scale {math.exp(logit_scale):.1f}, loaded or trained in "
          f"{timings['default_model']:.1f} s (cache: {default_model.cache_directory()})")

    # 2. the posterior of both towers from data
    start = time.perf_counter()
    posteriors = fit_posteriors(model)
    timings["fit_posterior"] = time.perf_counter() - start
    posterior_summary = {}
    for tower, post in posteriors.items():
        report = post.factor_report
        posterior_summary[tower] = {"prior_precision": post.prior_precision,
                                    "A_eigenvalues": [report["A"].min_eigenvalue, report["A"].max_eigenvalue],
                                    "B_eigenvalues": [report["B"].min_eigenvalue, report["B"].max_eigenvalue]}
        print(f"{tower:5s} posterior: P = {post.in_features}, D = {post.out_features}, lambda "
              f"{post.prior_precision:.4g}, A eigenvalues [{report['A'].min_eigenvalue:.3g}, "
              f"{report['A'].max_eigenvalue:.3g}], B eigenvalues [{report['B'].min_eigenvalue:.3g}, "
              f"{report['B'].max_eigenvalue:.3g}]")
    print(f"fitted on {FIT_PAIRS} generated pairs in {timings['fit_posterior']:.1f} s")

    # 3. zero-shot classification of the shape, in domain and under shift
    start = time.perf_counter()
    classifier = ZeroShotClassifier.from_templates(posteriors["image"], posteriors["text"], class_templates(model),
                                                   logit_scale)
    zero_shot, eval_features, zero_shot_probs = {}, {}, {}
    for name, domain in DOMAINS.items():
        data = shapes.generate(EVAL_IMAGES, domain, seed=SEED + 200)
        phi = features(model, "image", shapes.normalise_images(data.images))
        eval_features[name] = (phi, data)
        mean, var = classifier.logits(phi)  # once for both links (what classifier.predict does per call)
        mc = predictive(mean, var, link="mc", num_samples=MC_SAMPLES, generator=torch.Generator().manual_seed(SEED + 1))
        zero_shot_probs[name] = {"map": classifier.map_probabilities(phi),
                                 "bayesvlm_probit": predictive(mean, var, link="probit"), "bayesvlm_mc": mc}
        zero_shot[name] = {method: metrics(probs, data.shape) for method, probs in zero_shot_probs[name].items()}
    timings["zero_shot"] = time.perf_counter() - start
    print(f"\nzero-shot shape classification, {EVAL_IMAGES} images per domain, {len(shapes.SHAPES)} classes "
          f"(chance {1 / len(shapes.SHAPES):.3f}):")
    print(f"{'domain':<10} {'method':<18} {'accuracy':>8} {'NLPD':>8} {'ECE':>8}")
    for name, rows in zero_shot.items():
        for method, values in rows.items():
            print(f"{name:<10} {method:<18} {values['acc']:>8.4f} {values['nlpd']:>8.4f} {values['ece']:>8.4f}")

    # 4. retrieval both ways over the images of both domains and their distinct captions
    start = time.perf_counter()
    captions = sorted(set(eval_features["in_domain"][1].captions) | set(eval_features["shifted"][1].captions))
    caption_id = {caption: i for i, caption in enumerate(captions)}
    phi_img = torch.cat([phi for phi, _ in eval_features.values()])
    image_captions = torch.tensor([caption_id[c] for _, data in eval_features.values() for c in data.captions])
    retrieval_results, curves = retrieval(posteriors, phi_img, image_captions,
                                          features(model, "text", shapes.tokenize(captions)), logit_scale)
    timings["retrieval"] = time.perf_counter() - start
    print(f"\nretrieval, {len(phi_img)} images (both domains) and their {len(captions)} distinct captions; "
          f"BayesVLM ranks by the probit match probability; Spearman: query uncertainty against Recall@1 over "
          f"{UNCERTAINTY_BINS} equal-count bins:")
    print(f"{'direction':<14} {'method':<9} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'Spearman':>9}")
    for method, rows in retrieval_results.items():
        for direction, values in rows.items():
            rho = f"{values['spearman']:>9.4f}" if "spearman" in values else f"{'':>9}"
            print(f"{direction:<14} {method:<9} {values['recall@1']:>7.4f} {values['recall@5']:>7.4f} "
                  f"{values['recall@10']:>7.4f} {rho}")

    # 5. kernel timings on the demo's sizes: every in-domain test image against every distinct caption
    start = time.perf_counter()
    phi_img, data = eval_features["in_domain"]
    captions = sorted(set(data.captions))
    img = posteriors["image"].embed(phi_img.float(), against=posteriors["text"])
    txt = posteriors["text"].embed(features(model, "text", shapes.tokenize(captions)).float(),
                                   against=posteriors["image"])
    _, fused = timed(lambda: cosine_moments(img, txt, logit_scale))
    var_img, var_txt = img.diagonal_variance(), txt.diagonal_variance()
    _, naive = timed(lambda: reference.cosine_moments_diag(img.mean, var_img, txt.mean, var_txt, logit_scale))
    timings["kernel_timings"] = time.perf_counter() - start
    kernels = {"shape": [len(img), len(txt), img.dim], "fused_kron_seconds": fused,
               "reference_diag_seconds": naive, "speedup": naive / fused}
    print(f"\nlogit moments, {len(img)} images x {len(txt)} captions, D = {img.dim} (median of {TIMING_REPEATS}): "
          f"fused 'kron' {1e3 * fused:.2f} ms, naive published 'diag' {1e3 * naive:.2f} ms, {naive / fused:.1f}x")

    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    labels = {name: data.shape for name, (_, data) in eval_features.items()}
    plots = save_plots(args.out, zero_shot_probs, labels, retrieval_results, curves)
    timings["plots"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all
    results = {"zero_shot": zero_shot, "retrieval": retrieval_results, "timings": timings, "kernels": kernels,
               "posterior": posterior_summary, "uncertainty_bins": curves,
               "settings": {"seed": SEED, "fit_pairs": FIT_PAIRS, "eval_images": EVAL_IMAGES,
                            "mc_samples": MC_SAMPLES, "logit_scale": logit_scale, "retrieval_k": RETRIEVAL_K,
                            "retrieval_score": "probit", "uncertainty": "tr(S) / ||mean||^2 of the query",
                            "uncertainty_bins": UNCERTAINTY_BINS}}
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("\ntimings (s): " + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in timings.items()))
    print(f"wrote {path}, " + ", ".join(plots))
    return results


if __name__ == "__main__":
    main()
