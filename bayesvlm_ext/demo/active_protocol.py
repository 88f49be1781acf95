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
from bayesvlm_ext.demo.common import image_features, mean_and_std

METHODS = ("epig", "bald", "entropy", "random")
SELECTIONS = ("top", "class_balanced")
SEEDS = 5
POOL, POOL_SHIFTED = 2000, 0.25  # per seed; the shifted (target) share of the pool
TEST = 1000  # shifted test images
TARGETS = 200  # EPIG's unlabelled shifted images, a separate draw per seed
LABELS = (25, 50, 100, 200, 400)
WEIGHT_SAMPLES = 64  # joint weight samples of both towers for BALD and EPIG
# Fine-tuning the image projection: Adam steps and rate, and the prior's temperature (the weight of the
# fitted posterior's log density; chosen on the random baseline's curve, the same for every method).
FINETUNE_STEPS, FINETUNE_LR, FINETUNE_PRIOR = 300, 1e-2, 0.1
# Data seeds, offset from the demo's SEED: distinct from the fit (100), evaluation (200) and validation (300) draws.
TEST_SEED, POOL_SEED, TARGET_SEED = 400, 500, 700


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
                    logit_scale: float, seed: int, fit_pairs: int) -> dict:
    """Shifted-domain test accuracy and the target-domain fraction of the labels against the number of labels:
    {"accuracy" | "target_fraction": {selection: {method: [[labels, mean, std over the seeds], ...]}},
     "gain_over_random": {selection: {method: [[labels, mean, std of accuracy - random's on the same pool]]}},
     "per_seed": {selection: {method: [[accuracy at 0, LABELS...] per seed]}}}; accuracy rows at 0 labels (the
    zero-shot model) and at each of LABELS, the others at each of LABELS.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give, and results match on any core count
    try:
        return _active_learning(posteriors, classifier, model, logit_scale, seed, fit_pairs)
    finally:
        torch.set_num_threads(threads)


def mixed_pool(model: nn.Module, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(features [POOL, P], labels [POOL], from_target [POOL] bool): shifted images first, then in-domain ones."""
    shifted = shapes.generate(round(POOL_SHIFTED * POOL), "shifted", seed=seed)
    in_domain = shapes.generate(POOL - len(shifted), "test", seed=seed)
    phi = torch.cat([image_features(model, shifted), image_features(model, in_domain)])
    from_target = torch.arange(POOL) < len(shifted)
    return phi, torch.cat([shifted.shape, in_domain.shape]), from_target


def _active_learning(posteriors: dict[str, KronPosterior], classifier: ZeroShotClassifier, model: nn.Module,
                     logit_scale: float, seed: int, fit_pairs: int) -> dict:
    test = shapes.generate(TEST, "shifted", seed=seed + TEST_SEED)
    phi_test = image_features(model, test)
    text, scale = posteriors["text"], math.exp(logit_scale)
    class_embeddings = classifier.classes.mean.double()

    def test_accuracy(weight: Tensor) -> float:
        start = posteriors["image"]
        current = KronPosterior(start.A, start.B, weight, start.bias, damping=start.damping)
        clf = ZeroShotClassifier(current, text, classifier.class_features, logit_scale)
        return bayesvlm_ext.accuracy(clf.map_probabilities(phi_test), test.shape)

    zero_shot_accuracy = test_accuracy(posteriors["image"].weight)
    runs = {key: {sel: {method: [] for method in METHODS} for sel in SELECTIONS} for key in ("accuracy", "fraction")}
    for run in range(SEEDS):
        phi_pool, pool_labels, from_target = mixed_pool(model, seed + POOL_SEED + run)
        targets = image_features(model, shapes.generate(TARGETS, "shifted", seed=seed + TARGET_SEED + run))
        for selection in SELECTIONS:
            for method in METHODS:
                generator = torch.Generator().manual_seed(seed + 1000 * run + METHODS.index(method))
                image, num_data = posteriors["image"], fit_pairs
                labelled = torch.zeros(POOL, dtype=torch.bool)
                accuracies, fractions = [zero_shot_accuracy], []
                for total in LABELS:
                    clf = ZeroShotClassifier(image, text, classifier.class_features, logit_scale)
                    candidates = (~labelled).nonzero().squeeze(1)
                    samples = (bayesvlm_ext.active.JointSamples(clf, WEIGHT_SAMPLES, generator=generator)
                               if method in ("epig", "bald") else None)
                    scores = bayesvlm_ext.active.acquisition_scores(clf, phi_pool[candidates], method, samples=samples,
                                                                    targets=targets, generator=generator)
                    predicted = clf.map_probabilities(phi_pool[candidates]).argmax(1) \
                        if selection == "class_balanced" else None
                    picked = candidates[bayesvlm_ext.active.select(scores, total - int(labelled.sum()),
                                                                   strategy=selection, predicted=predicted)]
                    labelled[picked] = True
                    weight = finetune_projection(posteriors["image"], phi_pool[labelled], pool_labels[labelled],
                                                 class_embeddings, scale)
                    curvature = bayesvlm_ext.active.label_curvature(clf, phi_pool[picked])
                    image = bayesvlm_ext.active.update_posterior(image, phi_pool[picked], curvature, num_data,
                                                                 weight=weight)
                    num_data += len(picked)
                    accuracies.append(test_accuracy(weight))
                    fractions.append(from_target[labelled].double().mean().item())
                runs["accuracy"][selection][method].append(accuracies)
                runs["fraction"][selection][method].append(fractions)
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
            "finetune": {"steps": FINETUNE_STEPS, "lr": FINETUNE_LR, "prior_weight": FINETUNE_PRIOR}}
