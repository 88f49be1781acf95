"""The demo's active learning (SPEC.md section 8) on BayesVLM's published protocol: a pool that mixes domains,
a target domain to get right.

Per seed, one pool of AL_POOL images, AL_POOL_SHIFTED of them from the shifted domain (the target) and the rest
in domain, the same pool for every method and selection variant; accuracy is measured on AL_TEST shifted test
images. EPIG's targets are AL_TARGETS unlabelled shifted images of a separate draw per seed (what a user has:
unlabelled images of the domain they care about; the test images are never scored against). Each round scores
the unlabelled pool with the current posterior, labels a batch ("top": the highest scores; "class_balanced":
round robin over the classes the current model predicts), fine-tunes the image projection on every label so far
and folds the new labels into the image posterior (`update_posterior`: A += phi phi^T, B += H(x), lambda
re-tuned, MAP weight = the fine-tuned one). Besides accuracy, the fraction of labelled images that come from
the target domain tells whether a score found the images that matter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, ZeroShotClassifier
from bayesvlm_ext.demo import shapes
from bayesvlm_ext.demo.common import Workers, image_features, mean_and_std

METHODS = ("epig", "bald", "entropy", "random")
SELECTIONS = ("top", "class_balanced")
SEEDS = 5
POOL, POOL_SHIFTED = 2000, 0.25  # per seed; the shifted (target) share of the pool
TEST = 1000  # shifted test images
TARGETS = 200  # EPIG's unlabelled shifted images, a separate draw per seed
LABELS = (25, 50, 100, 200, 400)
WEIGHT_SAMPLES = 64  # joint weight samples of both towers for BALD and EPIG
# Fine-tuning the image projection: the prior's temperature (the weight of the fitted posterior's log density;
# chosen on the random baseline's curve, the same for every method) and L-BFGS's iteration limit (it converges
# in 10 to 60 iterations on the demo's problems).
FINETUNE_PRIOR, FINETUNE_MAX_ITER = 0.1, 100
# Data seeds, offset from the demo's SEED: distinct from the fit (100), evaluation (200) and validation (300) draws.
TEST_SEED, POOL_SEED, TARGET_SEED = 400, 500, 700


def finetune_projection(
    prior: KronPosterior,  # the image tower's posterior from the fit: the starting point W* and the prior
    phi: Tensor,  # [n, P] features of the labelled images
    labels: Tensor,  # [n] their classes
    class_embeddings: Tensor,  # [C, D] the classes' MAP text embeddings
    scale: float,  # s = exp(logit_scale)
) -> tuple[Tensor, Tensor | None]:  # the fine-tuned weight [D, P] and bias [D] (None without one), float64
    """The MAP of the new labels under the fitted posterior as a tempered prior: cross-entropy of the
    zero-shot logits s cos(W phi + b, t_c) plus FINETUNE_PRIOR / 2 vec(W - W*)^T Lambda vec(W - W*).

    Solved by L-BFGS in the posterior's whitened coordinates z, W = W* + `KronPosterior.displacement(z)`,
    where the prior term is FINETUNE_PRIOR / 2 ||z||^2: the precision's eigenvalues span orders of magnitude,
    so gradient steps on W itself (300 Adam steps before) converge slowly and stopped short of the optimum
    with 400 labels, while here 10 to 60 iterations reach it. Deterministic on the CPU. A projection with a
    bias has its bias fine-tuned with the weight (the posterior covers both).
    """
    target = torch.nn.functional.normalize(class_embeddings.double(), dim=1)
    z = torch.zeros(prior.out_features, prior.A.shape[0], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([z], max_iter=FINETUNE_MAX_ITER, history_size=10, tolerance_grad=1e-6,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def projection() -> tuple[Tensor, Tensor | None]:
        delta = prior.displacement(z)
        weight = prior.weight.double() + delta[:, :prior.in_features]
        return weight, None if prior.bias is None else prior.bias.double() + delta[:, prior.in_features]

    def closure() -> Tensor:
        optimizer.zero_grad()
        weight, bias = projection()
        mean = phi @ weight.T + (0.0 if bias is None else bias)
        logits = scale * torch.nn.functional.normalize(mean, dim=1) @ target.T
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum") + 0.5 * FINETUNE_PRIOR * (z * z).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return projection()


def active_learning(posteriors: dict[str, KronPosterior], classifier: ZeroShotClassifier, model: nn.Module,
                    logit_scale: float, seed: int, fit_pairs: int, workers: Workers | None = None) -> dict:
    """Shifted-domain test accuracy and the target-domain fraction of the labels against the number of labels:
    {"accuracy" | "target_fraction": {selection: {method: [[labels, mean, std over the seeds], ...]}},
     "gain_over_random": {selection: {method: [[labels, mean, std of accuracy - random's on the same pool]]}},
     "per_seed": {selection: {method: [[accuracy at 0, LABELS...] per seed]}}}; accuracy rows at 0 labels (the
    zero-shot model) and at each of LABELS, the others at each of LABELS.

    The data (features of the test images, of each seed's pool and EPIG targets) are computed here; each
    (seed, selection) pair then runs its methods as one single-threaded task on `workers` (inline without).
    """
    test = shapes.generate(TEST, "shifted", seed=seed + TEST_SEED)
    phi_test = image_features(model, test)
    zero_shot = test_accuracy(posteriors, classifier, logit_scale, phi_test, test.shape, posteriors["image"].weight,
                              posteriors["image"].bias)
    calls = []
    for run in range(SEEDS):
        pool = mixed_pool(model, seed + POOL_SEED + run)
        targets = image_features(model, shapes.generate(TARGETS, "shifted", seed=seed + TARGET_SEED + run))
        calls += [(posteriors, classifier, logit_scale, fit_pairs, phi_test, test.shape, pool, targets,
                   seed + 1000 * run, selection) for selection in SELECTIONS]
    outcomes = (workers or Workers(1)).map(run_selection, calls)
    runs = {key: {sel: {method: [] for method in METHODS} for sel in SELECTIONS} for key in ("accuracy", "fraction")}
    for call, outcome in zip(calls, outcomes):  # in seed order within each selection
        for method, (accuracies, fractions) in outcome.items():
            runs["accuracy"][call[-1]][method].append([zero_shot, *accuracies])
            runs["fraction"][call[-1]][method].append(fractions)
    result: dict = {"accuracy": {}, "target_fraction": {}, "per_seed": runs["accuracy"]}
    for key, name, counts in (("accuracy", "accuracy", (0, *LABELS)), ("fraction", "target_fraction", LABELS)):
        for selection, by_method in runs[key].items():
            result[name][selection] = {}
            for method, per_seed in by_method.items():
                mean, std = mean_and_std(per_seed)
                result[name][selection][method] = [[labels, m, s] for labels, m, s in zip(counts, mean, std)]
    # Paired by seed (one pool per seed for every method): the accuracy gain over random, mean and std.
    result["gain_over_random"] = {selection: {} for selection in SELECTIONS}
    for selection, by_method in runs["accuracy"].items():
        for method in METHODS[:-1]:
            gains = [[a - r for a, r in zip(accuracy[1:], random[1:])]
                     for accuracy, random in zip(by_method[method], by_method["random"])]
            mean, std = mean_and_std(gains)
            result["gain_over_random"][selection][method] = [[n, m, s] for n, m, s in zip(LABELS, mean, std)]
    return result


def mixed_pool(model: nn.Module, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(features [POOL, P], labels [POOL], from_target [POOL] bool): shifted images first, then in-domain ones."""
    shifted = shapes.generate(round(POOL_SHIFTED * POOL), "shifted", seed=seed)
    in_domain = shapes.generate(POOL - len(shifted), "test", seed=seed)
    phi = torch.cat([image_features(model, shifted), image_features(model, in_domain)])
    from_target = torch.arange(POOL) < len(shifted)
    return phi, torch.cat([shifted.shape, in_domain.shape]), from_target


def test_accuracy(posteriors: dict[str, KronPosterior], classifier: ZeroShotClassifier, logit_scale: float,
                  phi_test: Tensor, test_labels: Tensor, weight: Tensor, bias: Tensor | None) -> float:
    """Zero-shot accuracy on the test images with the image projection (weight, bias)."""
    start = posteriors["image"]
    current = KronPosterior(start.A, start.B, weight, bias, damping=start.damping)
    clf = ZeroShotClassifier(current, posteriors["text"], classifier.class_features, logit_scale)
    return bayesvlm_ext.accuracy(clf.map_probabilities(phi_test), test_labels)


def run_selection(posteriors: dict[str, KronPosterior], classifier: ZeroShotClassifier, logit_scale: float,
                  fit_pairs: int, phi_test: Tensor, test_labels: Tensor, pool: tuple[Tensor, Tensor, Tensor],
                  targets: Tensor, seed: int, selection: str) -> dict[str, tuple[list[float], list[float]]]:
    """One seed's pool under one selection variant: {method: (accuracy at each of LABELS, target fraction at each)}."""
    phi_pool, pool_labels, from_target = pool
    text, scale = posteriors["text"], math.exp(logit_scale)
    class_embeddings = classifier.classes.mean.double()
    outcome = {}
    for method in METHODS:
        generator = torch.Generator().manual_seed(seed + METHODS.index(method))
        image, num_data = posteriors["image"], fit_pairs
        labelled = torch.zeros(POOL, dtype=torch.bool)
        accuracies, fractions = [], []
        for total in LABELS:
            clf = ZeroShotClassifier(image, text, classifier.class_features, logit_scale)
            candidates = (~labelled).nonzero().squeeze(1)
            samples = (bayesvlm_ext.active.JointSamples(clf, WEIGHT_SAMPLES, generator=generator)
                       if method in ("epig", "bald") else None)
            scores = bayesvlm_ext.active.acquisition_scores(clf, phi_pool[candidates], method, samples=samples,
                                                            targets=targets, generator=generator)
            predicted = clf.map_probabilities(phi_pool[candidates]).argmax(1) if selection == "class_balanced" else None
            picked = candidates[bayesvlm_ext.active.select(scores, total - int(labelled.sum()), strategy=selection,
                                                           predicted=predicted)]
            labelled[picked] = True
            weight, bias = finetune_projection(posteriors["image"], phi_pool[labelled], pool_labels[labelled],
                                               class_embeddings, scale)
            curvature = bayesvlm_ext.active.label_curvature(clf, phi_pool[picked])
            image = bayesvlm_ext.active.update_posterior(image, phi_pool[picked], curvature, num_data, weight=weight,
                                                         bias=bias)
            num_data += len(picked)
            accuracies.append(test_accuracy(posteriors, classifier, logit_scale, phi_test, test_labels, weight, bias))
            fractions.append(from_target[labelled].double().mean().item())
        outcome[method] = (accuracies, fractions)
    return outcome


def print_tables(active: dict, seconds: float) -> None:
    """The accuracy table per selection variant, then the target-domain fraction of the labels at each budget."""
    print(f"\nactive learning, a pool of {POOL} images per seed ({POOL_SHIFTED:.0%} shifted, the rest in domain), "
          f"targeting the shifted domain: accuracy on {TEST} shifted test images against the number of labels "
          f"(mean +- std over {SEEDS} seeds; EPIG's targets: {TARGETS} unlabelled shifted images of a separate "
          f"draw; the image projection fine-tuned on the labels under the fitted posterior as prior; {seconds:.1f} s)")
    for key, title in (("accuracy", "test accuracy"), ("gain_over_random", "accuracy gain over random, paired by seed"),
                       ("target_fraction", "share of labels from the shifted domain")):
        for selection, curves in active[key].items():
            print(f"{title}, selection {selection}:")
            print(f"{'labels':>6} " + " ".join(f"{method:>15}" for method in curves))
            for row in range(len(curves[METHODS[0]])):
                print(f"{curves[METHODS[0]][row][0]:>6} " + " ".join(
                    f"{curve[row][1]:>8.4f} +-{curve[row][2]:.3f}" for curve in curves.values()))


def settings() -> dict:
    return {"seeds": SEEDS, "pool": POOL, "pool_shifted_fraction": POOL_SHIFTED, "test": TEST, "epig_targets": TARGETS,
            "epig_target_source": "a separate draw of unlabelled shifted images per seed (not the test images)",
            "labels": list(LABELS), "weight_samples": WEIGHT_SAMPLES, "selections": list(SELECTIONS),
            "class_balanced_by": "the current model's predicted class (MAP)",
            "finetune": {"optimizer": "L-BFGS (strong Wolfe) in the posterior's whitened coordinates",
                         "max_iter": FINETUNE_MAX_ITER, "prior_weight": FINETUNE_PRIOR}}
