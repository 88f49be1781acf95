"""ProbVLM in the demo: training settings chosen on a validation split, then the chosen settings over several seeds.

With one seed ProbVLM's uncertainty is an anecdote: at lr 1e-3 with early stopping (patience 10) the sign of its
Spearman correlation with Recall@1 changes from seed to seed, because early stopping on a loss dominated by the
L1 term stops before the alpha head (whose NLL term weighs 1e-4) has learnt. So the demo trains every candidate
of CANDIDATES for every seed of SEEDS on the fit pairs' normalised embeddings (10 % of them held out for the
early stopping, as `train_probvlm` does), scores each on a validation retrieval set of in-domain images that are
neither fit nor test data, and keeps the candidate with the best mean validation score; the test figures are
then reported as mean and std over the seeds of that candidate.

The validation score (CRITERION) is the AUROC of telling the validation image queries whose rank-1 caption is
wrong from those whose is right by the query uncertainty tr(S) / ||mean||^2: the use the demo reports ProbVLM's
uncertainty for (ranking queries by reliability, the Spearman check and selective prediction), measured per
query rather than over 10 bins, so that the 1000 validation queries decide and not 10 bin averages. The
validation GGD NLL is recorded beside it: it measures whether the GGD fits the embeddings, not whether its
variance tracks errors.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

import bayesvlm_ext
from bayesvlm_ext import EmbeddingDistribution, evaluation
from bayesvlm_ext.demo.common import Workers, mean_and_std
from bayesvlm_ext.demo.selective import image_to_text_top1
from bayesvlm_ext.probvlm import ggd_nll

SEEDS = (0, 1, 2)
TRAIN_PAIRS = 2048  # of the fit pairs: ProbVLM's training time grows with them, 32-dimensional embeddings need few
BATCH = 256
# The candidates: today's settings (the published architecture and loss, lr 1e-3, early stopping) and the slower
# rate without early stopping that lets the alpha head learn (`patience` = epochs: the run never stops early; the
# epoch with the lowest validation loss is still the one returned).
CANDIDATES = {
    "lr 1e-3, early stopping (patience 10)": {"lr": 1e-3, "epochs": 100, "patience": 10},
    "lr 1e-4, no early stopping": {"lr": 1e-4, "epochs": 100, "patience": 100},
}
CRITERION = "val_auroc_image_to_text"
UNCERTAINTY = "total"  # aleatoric (GGD) + epistemic (32 MC dropout passes)


def query_uncertainty(dist: EmbeddingDistribution) -> Tensor:  # [N] tr(S) / ||mean||^2, as retrieval_report
    return dist.trace().double().cpu() / dist.mean.double().cpu().pow(2).sum(1)


def validation_scores(
    probvlm: bayesvlm_ext.ProbVLM,
    images: Tensor,  # [V, D] normalised validation image embeddings
    texts: Tensor,  # [M, D] normalised embeddings of their distinct captions
    image_captions: Tensor,  # [V] each image's row of `texts`
    pair_texts: Tensor,  # [V, D] each image's own caption embedding (for the NLL)
    logit_scale: float,
) -> dict[str, float | None]:
    """The criterion and what is recorded beside it, on the validation split (dropout off for the NLL)."""
    queries, gallery = probvlm.image.embed(images, UNCERTAINTY), probvlm.text.embed(texts, UNCERTAINTY)
    _, correct = image_to_text_top1(queries, gallery, image_captions, logit_scale, "probit")
    auroc = evaluation.error_auroc(-query_uncertainty(queries), correct)
    report, _ = evaluation.retrieval_report(queries, gallery, image_captions, logit_scale, method="probvlm")
    with torch.no_grad():
        nll = 0.5 * (ggd_nll(images, *probvlm.image(images)).mean() + ggd_nll(pair_texts, *probvlm.text(pair_texts))
                     .mean()).item()
    return {CRITERION: auroc if auroc == auroc else None, "val_ggd_nll": nll,
            "val_spearman_image_to_text": report["probvlm"]["image_to_text"]["spearman"],
            "val_spearman_text_to_image": report["probvlm"]["text_to_image"]["spearman"]}


def train_one(
    images: Tensor,  # [N, D] normalised training embeddings
    texts: Tensor,  # [N, D]
    validation: tuple[Tensor, Tensor, Tensor, Tensor],  # validation_scores' images, texts, image_captions, pair_texts
    logit_scale: float,
    config: dict,  # one of CANDIDATES
    seed: int,
) -> tuple[bayesvlm_ext.ProbVLM, dict]:
    """One candidate and seed: the trained adapters and their record (validation scores, epochs, seconds)."""
    start = time.perf_counter()
    probvlm, history = bayesvlm_ext.train_probvlm(images, texts, batch_size=BATCH, seed=seed, progress=False, **config)
    return probvlm, {**validation_scores(probvlm, *validation, logit_scale), "epochs": len(history.val_loss),
                     "best_epoch": history.best_epoch, "stopped_early": history.stopped_early,
                     "first_val_loss": history.val_loss[0], "best_val_loss": history.val_loss[history.best_epoch],
                     "seconds": time.perf_counter() - start}


def train_and_select(
    fit_images: Tensor,  # [N, D] normalised embeddings of the fit pairs
    fit_texts: Tensor,  # [N, D]
    validation: tuple[Tensor, Tensor, Tensor, Tensor],  # validation_scores' images, texts, image_captions, pair_texts
    logit_scale: float,
    workers: Workers | None = None,  # runs the candidates x seeds trainings side by side (inline without)
) -> tuple[list[bayesvlm_ext.ProbVLM], dict]:
    """(the chosen candidate's adapters, one per seed; the selection record for results.json)."""
    record: dict = {"criterion": CRITERION, "seeds": list(SEEDS), "train_pairs": TRAIN_PAIRS, "batch_size": BATCH,
                    "candidates": {}}
    calls = [(fit_images[:TRAIN_PAIRS], fit_texts[:TRAIN_PAIRS], validation, logit_scale, config, seed)
             for config in CANDIDATES.values() for seed in SEEDS]
    outcomes = iter((workers or Workers(1)).map(train_one, calls))
    models = {}
    for name, config in CANDIDATES.items():
        models[name], runs = map(list, zip(*[next(outcomes) for _ in SEEDS]))
        mean, std = mean_and_std(runs)
        record["candidates"][name] = {"settings": config, "per_seed": runs, "mean": mean, "std": std}
    scored = {name: c["mean"][CRITERION] for name, c in record["candidates"].items()}
    record["chosen"] = max(scored, key=lambda name: -1.0 if scored[name] is None else scored[name])
    return models[record["chosen"]], record


def print_selection(record: dict) -> None:
    print(f"\nProbVLM settings chosen on the validation split by {record['criterion']} (mean over seeds "
          f"{record['seeds']}; {record['train_pairs']} training pairs, batches of {record['batch_size']}):")
    print(f"{'candidate':<40} {'AUROC':>15} {'Spearman i2t':>15} {'GGD NLL':>9} {'epochs':>7} {'s/seed':>7}")
    for name, c in record["candidates"].items():
        m, s = c["mean"], c["std"]
        auroc = f"{m[CRITERION]:.3f} +-{s[CRITERION]:.3f}" if m[CRITERION] is not None else "n/a"
        rho = m["val_spearman_image_to_text"]
        rho = "n/a" if rho is None else f"{rho:.3f} +-{s['val_spearman_image_to_text']:.3f}"
        print(f"{name:<40} {auroc:>15} {rho:>15} {m['val_ggd_nll']:>9.3f} {m['epochs']:>7.1f} {m['seconds']:>7.1f}"
              + ("  <- chosen" if name == record["chosen"] else ""))
