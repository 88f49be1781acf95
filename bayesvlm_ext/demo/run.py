"""`make demo` (`python -m bayesvlm_ext.demo [--out DIR]`): BayesVLM and ProbVLM on the embedded default model.

Everything goes through the public API a user would call, on the package's own data (`shapes`) and
model (`default_model`, trained on the first run and cached; nothing is downloaded):

1. the default model: a tiny open_clip CLIP trained contrastively on generated shapes;
2. the posterior of both towers: `fit_factors` over generated in-domain pairs (the curvature code of
   SPEC.md section 6, InfoNCE), one `KronPosterior` per tower, lambda tuned on the evidence; and the
   ProbVLM adapters (SPEC.md section 9) trained on the same pairs' normalised embeddings;
3. zero-shot shape classification (6 classes; each class prompt averaged over 60 caption templates,
   `ZeroShotClassifier.from_templates`) in domain and under shift (new backgrounds, blur, noise,
   colour-shape combinations never seen in training): accuracy, NLPD and ECE for the MAP model, for
   BayesVLM with the probit approximation and with Monte Carlo, and for ProbVLM (probit);
4. retrieval both ways over the images of both domains and their distinct captions: Recall@1/5/10 for
   the MAP model (ranked by cosine) and for both methods (ranked by the probit match probability,
   streamed top-k), with Recall@1 per bin of query uncertainty and the Spearman correlation between
   uncertainty and recall (the ProbVLM paper's calibration check);
5. kernel timings: the fused logit moments against the naive published formulation on the demo's
   sizes (every test image against every distinct caption).

Prints the tables and writes the same numbers to DIR/results.json (default outputs/demo), in the
layout `zero_shot.{in_domain,shifted}.{map,bayesvlm_probit,bayesvlm_mc,probvlm}.{acc,nlpd,ece}`,
`retrieval.{map,bayesvlm,probvlm}.{image_to_text,text_to_image}.{recall@1,recall@5,recall@10,spearman}`,
`uncertainty_bins.{bayesvlm,probvlm}.{image_to_text,text_to_image}` and `timings` (seconds per stage,
`fit_posterior` and `probvlm_fit` the time to fit each method), plus three plots: DIR/reliability.png
(zero-shot reliability diagrams), DIR/uncertainty_recall.png (Recall@1 per uncertainty bin, both
methods) and DIR/active_learning.png (`bayesvlm_ext.demo.plots`).
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
from bayesvlm_ext import KronPosterior, ZeroShotClassifier, cosine_moments, evaluation, predictive, reference
from bayesvlm_ext.demo import default_model, shapes
from bayesvlm_ext.demo.plots import save_plots
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.fit import unnormalised_encoder

SEED = 0
FIT_PAIRS = 8192  # in-domain pairs behind the curvature factors (one class batch)
EVAL_IMAGES = 3000  # per domain
MC_SAMPLES = 1000
TIMING_REPEATS = 5
RETRIEVAL_KS = (1, 5, 10)
UNCERTAINTY_BINS = 10
# Active learning on the shifted domain: a fresh pool per seed, one fixed test set whose unlabelled
# images are EPIG's targets (a random subset), labels added in rounds up to these totals.
AL_METHODS = ("epig", "bald", "entropy", "random")
AL_SEEDS = 5
AL_POOL = 2000
AL_TEST = 1000
AL_TARGETS = 200
AL_LABELS = (25, 50, 100, 200, 400)
AL_WEIGHT_SAMPLES = 64
# Fine-tuning the image projection: Adam steps and rate, and the prior's temperature (the weight of the
# fitted posterior's log density; chosen on the random baseline's curve, the same for every method).
FINETUNE_STEPS, FINETUNE_LR, FINETUNE_PRIOR = 300, 1e-2, 0.1
DOMAINS = {"in_domain": "test", "shifted": "shifted"}
# ProbVLM on the fit pairs' normalised embeddings (10 % held out for validation), the published architecture
# and loss weights. Learning rate and batch: the published 8e-5 is made for COCO-sized data; on 8192 pairs
# its validation loss still falls after 100 epochs, while 1e-3 with batches of 256 converges and stops early.
PROBVLM_LR, PROBVLM_BATCH, PROBVLM_EPOCHS, PROBVLM_PATIENCE = 1e-3, 256, 100, 10
PROBVLM_UNCERTAINTY = "total"  # aleatoric (GGD) + epistemic (32 MC dropout passes)


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


def fit_posteriors(model: nn.Module, data: shapes.ShapesData) -> dict[str, KronPosterior]:
    loader = torch.utils.data.DataLoader(PairsDataset(data), batch_size=512)
    return bayesvlm_ext.BayesVLM.fit(model, loader, likelihood="infonce", class_batch_size=FIT_PAIRS,
                                     progress=False).posteriors


def unit_embeddings(posterior: KronPosterior, phi: Tensor) -> Tensor:  # [N, D] float32
    """The model's normalised embeddings (the posterior's MAP mean W* phi + b, normalised): what ProbVLM reads."""
    return torch.nn.functional.normalize(posterior.embed(phi.float()).mean, dim=1)


def fit_probvlm(model: nn.Module, posteriors: dict[str, KronPosterior], data: shapes.ShapesData):
    """(ProbVLM, TrainingHistory): both adapters trained on the pairs' normalised embeddings (SPEC.md section 9)."""
    image = unit_embeddings(posteriors["image"], features(model, "image", shapes.normalise_images(data.images)))
    text = unit_embeddings(posteriors["text"], features(model, "text", shapes.tokenize(data.captions)))
    return bayesvlm_ext.train_probvlm(image, text, lr=PROBVLM_LR, batch_size=PROBVLM_BATCH, epochs=PROBVLM_EPOCHS,
                                      patience=PROBVLM_PATIENCE, seed=SEED, progress=False)


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


def finetune_projection(
    prior: KronPosterior,  # the image tower's posterior from the fit: the starting point W* and the prior
    phi: Tensor,  # [n, P] features of the labelled images
    labels: Tensor,  # [n] their classes
    class_embeddings: Tensor,  # [C, D] the classes' MAP text embeddings
    scale: float,  # s = exp(logit_scale)
) -> Tensor:  # [D, P] the fine-tuned weight
    """The MAP of the new labels under the fitted posterior as a tempered prior: cross-entropy of the
    zero-shot logits s cos(W phi + b, t_c) plus FINETUNE_PRIOR / 2 vec(W - W*)^T Lambda vec(W - W*)
    (`KronPosterior.precision_quadratic`), minimised by Adam from W* (deterministic on the CPU)."""
    target = torch.nn.functional.normalize(class_embeddings.double(), dim=1)
    offset = 0.0 if prior.bias is None else prior.bias.double()
    start = prior.weight.double()
    w = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([w], lr=FINETUNE_LR)
    for _ in range(FINETUNE_STEPS):
        optimizer.zero_grad()
        logits = scale * torch.nn.functional.normalize(phi @ w.T + offset, dim=1) @ target.T
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (loss + 0.5 * FINETUNE_PRIOR * prior.precision_quadratic(w - start)).backward()
        optimizer.step()
    return w.detach()


def active_learning(posteriors: dict[str, KronPosterior], classifier: ZeroShotClassifier, model: nn.Module,
                    logit_scale: float) -> dict[str, list[list[float]]]:
    """Accuracy on the shifted test set against the number of labels, per acquisition method:
    {method: [[labels, accuracy mean, accuracy std over the seeds], ...]} (SPEC.md section 8).

    Each round scores the unlabelled pool with the current posterior (EPIG's targets: AL_TARGETS
    unlabelled test images), labels the top-scoring batch, fine-tunes the image projection on every
    label so far, and folds the new labels into the image posterior (`update_posterior`: A += phi phi^T,
    B += H(x), lambda re-tuned, MAP weight = the fine-tuned one).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and results match on any core count
    try:
        return _active_learning(posteriors, classifier, model, logit_scale)
    finally:
        torch.set_num_threads(threads)


def _active_learning(posteriors: dict[str, KronPosterior], classifier: ZeroShotClassifier, model: nn.Module,
                     logit_scale: float) -> dict[str, list[list[float]]]:
    test = shapes.generate(AL_TEST, "shifted", seed=SEED + 400)
    phi_test = features(model, "image", shapes.normalise_images(test.images))
    text, scale = posteriors["text"], math.exp(logit_scale)
    class_embeddings = classifier.classes.mean.double()

    def test_accuracy(weight: Tensor) -> float:
        start = posteriors["image"]
        current = KronPosterior(start.A, start.B, weight, start.bias, damping=start.damping)
        clf = ZeroShotClassifier(current, text, classifier.class_features, logit_scale)
        return bayesvlm_ext.accuracy(clf.map_probabilities(phi_test), test.shape)

    zero_shot_accuracy = test_accuracy(posteriors["image"].weight)
    curves: dict[str, list] = {method: [] for method in AL_METHODS}
    per_seed = {method: [] for method in AL_METHODS}
    for seed in range(AL_SEEDS):
        pool = shapes.generate(AL_POOL, "shifted", seed=SEED + 500 + seed)
        phi_pool = features(model, "image", shapes.normalise_images(pool.images))
        targets = phi_test[torch.randperm(AL_TEST, generator=torch.Generator().manual_seed(SEED + seed))[:AL_TARGETS]]
        for method in AL_METHODS:
            generator = torch.Generator().manual_seed(SEED + 1000 * seed + AL_METHODS.index(method))
            image, num_data = posteriors["image"], FIT_PAIRS
            labelled = torch.zeros(AL_POOL, dtype=torch.bool)
            accuracies = [zero_shot_accuracy]
            for total in AL_LABELS:
                clf = ZeroShotClassifier(image, text, classifier.class_features, logit_scale)
                candidates = (~labelled).nonzero().squeeze(1)
                samples = (bayesvlm_ext.active.JointSamples(clf, AL_WEIGHT_SAMPLES, generator=generator)
                           if method in ("epig", "bald") else None)
                scores = bayesvlm_ext.active.acquisition_scores(clf, phi_pool[candidates], method, samples=samples,
                                                         targets=targets, generator=generator)
                picked = candidates[bayesvlm_ext.active.select(scores, total - int(labelled.sum()))]
                labelled[picked] = True
                weight = finetune_projection(posteriors["image"], phi_pool[labelled], pool.shape[labelled],
                                             class_embeddings, scale)
                curvature = bayesvlm_ext.active.label_curvature(clf, phi_pool[picked])
                image = bayesvlm_ext.active.update_posterior(image, phi_pool[picked], curvature, num_data,
                                                             weight=weight)
                num_data += len(picked)
                accuracies.append(test_accuracy(weight))
            per_seed[method].append(accuracies)
    for method, runs in per_seed.items():
        acc = torch.tensor(runs, dtype=torch.float64)  # [seeds, rounds + 1]
        std = acc.std(0) if AL_SEEDS > 1 else torch.zeros(acc.shape[1], dtype=torch.float64)
        curves[method] = [[labels, m, s] for labels, m, s in zip((0, *AL_LABELS), acc.mean(0).tolist(), std.tolist())]
    return curves


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

    # 2. the posterior of both towers from data, and the ProbVLM adapters on the same pairs
    fit_data = shapes.generate(FIT_PAIRS, "train", seed=SEED + 100)
    start = time.perf_counter()
    posteriors = fit_posteriors(model, fit_data)
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
    start = time.perf_counter()
    probvlm, history = fit_probvlm(model, posteriors, fit_data)
    timings["probvlm_fit"] = time.perf_counter() - start
    probvlm_summary = {"epochs": len(history.val_loss), "best_epoch": history.best_epoch,
                       "stopped_early": history.stopped_early, "best_val_loss": history.val_loss[history.best_epoch],
                       "first_val_loss": history.val_loss[0]}
    print(f"ProbVLM adapters (h = {probvlm.config['hidden']}, dropout {probvlm.config['dropout']}) trained on the "
          f"same pairs for {len(history.val_loss)} epochs in {timings['probvlm_fit']:.1f} s; validation loss "
          f"{history.val_loss[0]:.4g} -> {history.val_loss[history.best_epoch]:.4g} (epoch {history.best_epoch})")

    # 3. zero-shot classification of the shape, in domain and under shift
    start = time.perf_counter()
    classifier = ZeroShotClassifier.from_templates(posteriors["image"], posteriors["text"], class_templates(model),
                                                   logit_scale)
    zero_shot, eval_features, zero_shot_probs = {}, {}, {}
    # ProbVLM's classes: the text adapter on CLIP's class embedding (the normalised template average).
    probvlm_classes = probvlm.text.embed(torch.nn.functional.normalize(classifier.classes.mean.float(), dim=1),
                                         PROBVLM_UNCERTAINTY)
    for name, domain in DOMAINS.items():
        data = shapes.generate(EVAL_IMAGES, domain, seed=SEED + 200)
        phi = features(model, "image", shapes.normalise_images(data.images))
        eval_features[name] = (phi, data)
        mean, var = classifier.logits(phi)  # once for both links (what classifier.predict does per call)
        mc = predictive(mean, var, link="mc", num_samples=MC_SAMPLES, generator=torch.Generator().manual_seed(SEED + 1))
        probvlm_images = probvlm.image.embed(unit_embeddings(posteriors["image"], phi), PROBVLM_UNCERTAINTY)
        probvlm_mean, probvlm_var = cosine_moments(probvlm_images, probvlm_classes, logit_scale)
        zero_shot_probs[name] = {"map": classifier.map_probabilities(phi),
                                 "bayesvlm_probit": predictive(mean, var, link="probit"), "bayesvlm_mc": mc,
                                 "probvlm": predictive(probvlm_mean, probvlm_var, link="probit")}
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
    phi_txt = features(model, "text", shapes.tokenize(captions))
    images = posteriors["image"].embed(phi_img.float(), against=posteriors["text"])
    texts = posteriors["text"].embed(phi_txt.float(), against=posteriors["image"])
    retrieval_results, bayesvlm_curves = evaluation.retrieval_report(images, texts, image_captions, logit_scale,
                                                                     ks=RETRIEVAL_KS, n_bins=UNCERTAINTY_BINS)
    curves = {"bayesvlm": bayesvlm_curves}
    # ProbVLM with its uncertainty as configured, then each part alone: which part tells good queries from bad.
    unit_images, unit_texts = (torch.nn.functional.normalize(d.mean, dim=1) for d in (images, texts))
    probvlm_parts = {}
    for part in (PROBVLM_UNCERTAINTY, "aleatoric", "epistemic"):
        part_results, part_curves = evaluation.retrieval_report(
            probvlm.image.embed(unit_images, part), probvlm.text.embed(unit_texts, part), image_captions,
            logit_scale, ks=RETRIEVAL_KS, n_bins=UNCERTAINTY_BINS, method="probvlm")
        probvlm_parts[part] = {d: v["spearman"] for d, v in part_results["probvlm"].items()}
        if part == PROBVLM_UNCERTAINTY:
            retrieval_results["probvlm"], curves["probvlm"] = part_results["probvlm"], part_curves
    timings["retrieval"] = time.perf_counter() - start
    print(f"\nretrieval, {len(phi_img)} images (both domains) and their {len(captions)} distinct captions; "
          f"BayesVLM and ProbVLM rank by the probit match probability; Spearman: query uncertainty against "
          f"Recall@1 over {UNCERTAINTY_BINS} equal-count bins:")
    print(f"{'direction':<14} {'method':<9} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'Spearman':>9}")
    for method, rows in retrieval_results.items():
        for direction, values in rows.items():
            rho = f"{values['spearman']:>9.4f}" if "spearman" in values else f"{'':>9}"
            print(f"{direction:<14} {method:<9} {values['recall@1']:>7.4f} {values['recall@5']:>7.4f} "
                  f"{values['recall@10']:>7.4f} {rho}")
    print("ProbVLM's Spearman by the part of its uncertainty that ranks the queries: " + "; ".join(
        f"{part} " + ", ".join("undefined" if rho is None else f"{rho:.4f}" for rho in by_direction.values())
        for part, by_direction in probvlm_parts.items()) + " (image to text, text to image)")

    # 5. active learning on the shifted domain
    start = time.perf_counter()
    active = active_learning(posteriors, classifier, model, logit_scale)
    timings["active_learning"] = time.perf_counter() - start
    print(f"\nactive learning on the shifted domain: accuracy on {AL_TEST} test images against the number of "
          f"labels (mean +- std over {AL_SEEDS} seeds; pools of {AL_POOL}; top-scoring batches; the image "
          "projection fine-tuned on the labels under the fitted posterior as prior; "
          f"{timings['active_learning']:.1f} s):")
    print(f"{'labels':>6} " + " ".join(f"{method:>15}" for method in active))
    for row in range(len(AL_LABELS) + 1):
        print(f"{active[AL_METHODS[0]][row][0]:>6} " + " ".join(
            f"{curve[row][1]:>8.4f} +-{curve[row][2]:.3f}" for curve in active.values()))

    # 6. kernel timings on the demo's sizes: every in-domain test image against every distinct caption
    start = time.perf_counter()
    phi_img, data = eval_features["in_domain"]
    captions = sorted(set(data.captions))
    img = posteriors["image"].embed(phi_img.float(), against=posteriors["text"])
    txt = posteriors["text"].embed(features(model, "text", shapes.tokenize(captions)).float(),
                                   against=posteriors["image"])
    _, fused = timed(lambda: cosine_moments(img, txt, logit_scale))
    var_img, var_txt = img.diagonal_variance(), txt.diagonal_variance()
    _, naive = timed(lambda: reference.cosine_moments_diag(img.mean, var_img, txt.mean, var_txt, logit_scale))
    # ProbVLM's per-dimension variances go through the fused diagonal path (two GEMMs).
    diag_img = probvlm.image.embed(torch.nn.functional.normalize(img.mean, dim=1), PROBVLM_UNCERTAINTY)
    diag_txt = probvlm.text.embed(torch.nn.functional.normalize(txt.mean, dim=1), PROBVLM_UNCERTAINTY)
    _, fused_diag = timed(lambda: cosine_moments(diag_img, diag_txt, logit_scale))
    timings["kernel_timings"] = time.perf_counter() - start
    kernels = {"shape": [len(img), len(txt), img.dim], "fused_kron_seconds": fused,
               "fused_diag_seconds": fused_diag, "reference_diag_seconds": naive, "speedup": naive / fused}
    print(f"\nlogit moments, {len(img)} images x {len(txt)} captions, D = {img.dim} (median of {TIMING_REPEATS}): "
          f"fused 'kron' {1e3 * fused:.2f} ms, fused 'diag' (ProbVLM) {1e3 * fused_diag:.2f} ms, naive published "
          f"'diag' {1e3 * naive:.2f} ms, {naive / fused:.1f}x")

    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    labels = {name: data.shape for name, (_, data) in eval_features.items()}
    plots = save_plots(args.out, zero_shot_probs, labels, retrieval_results, curves, active, AL_LABELS)
    timings["plots"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all
    results = {"zero_shot": zero_shot, "retrieval": retrieval_results, "active_learning": active,
               "timings": timings, "kernels": kernels,
               "posterior": posterior_summary, "probvlm": {**probvlm_summary, "spearman_by_part": probvlm_parts},
               "uncertainty_bins": curves,
               "settings": {"seed": SEED, "fit_pairs": FIT_PAIRS, "eval_images": EVAL_IMAGES,
                            "mc_samples": MC_SAMPLES, "logit_scale": logit_scale, "retrieval_ks": list(RETRIEVAL_KS),
                            "retrieval_score": "probit", "uncertainty": "tr(S) / ||mean||^2 of the query",
                            "uncertainty_bins": UNCERTAINTY_BINS,
                            "probvlm": {**probvlm.config, "lr": PROBVLM_LR, "batch_size": PROBVLM_BATCH,
                                        "max_epochs": PROBVLM_EPOCHS, "patience": PROBVLM_PATIENCE,
                                        "uncertainty": PROBVLM_UNCERTAINTY, "mean": "input",
                                        "inputs": "normalised embeddings of the fit pairs, 10 % held out"},
                            "active_learning": {
                                "seeds": AL_SEEDS, "pool": AL_POOL, "test": AL_TEST, "epig_targets": AL_TARGETS,
                                "labels": list(AL_LABELS), "weight_samples": AL_WEIGHT_SAMPLES, "selection": "top",
                                "finetune": {"steps": FINETUNE_STEPS, "lr": FINETUNE_LR,
                                             "prior_weight": FINETUNE_PRIOR}}}}
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("\ntimings (s): " + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in timings.items()))
    print(f"wrote {path}, " + ", ".join(plots))
    return results


if __name__ == "__main__":
    main()
