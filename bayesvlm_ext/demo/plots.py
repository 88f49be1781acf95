"""The demo's three plots (matplotlib, off-screen): DIR/reliability.png (zero-shot reliability diagrams),
DIR/uncertainty_recall.png (Recall@1 per query-uncertainty bin, both methods) and DIR/active_learning.png
(test accuracy against the number of labels, per acquisition method). Called by `bayesvlm_ext.demo.run`.
"""

from __future__ import annotations

import os

import torch

import bayesvlm_ext
from bayesvlm_ext.predictive import reliability

RELIABILITY_BINS = 10  # in the plot; the ECE figures use the 20 bins of bayesvlm_ext.ece
METHOD_NAMES = {"bayesvlm": "BayesVLM", "probvlm": "ProbVLM"}


def save_plots(out: str, zero_shot_probs: dict, labels: dict, retrieval_results: dict, curves: dict,
               active: dict, label_counts: tuple[int, ...]) -> list[str]:
    """DIR/reliability.png, DIR/uncertainty_recall.png and DIR/active_learning.png (matplotlib, off-screen).

    zero_shot_probs {domain: {method: [N, C] probabilities}} with labels {domain: [N] classes};
    retrieval_results and curves as `evaluation.retrieval_report` returns them, per method; active
    {method: [[labels, accuracy mean, accuracy std], ...]}, measured at 0 and at each of `label_counts`.
    Returns the three paths.
    """
    import matplotlib  # on first use: importing the demo does not load matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(out, "reliability.png"), os.path.join(out, "uncertainty_recall.png")]
    fig, axes = plt.subplots(1, len(zero_shot_probs), figsize=(5 * len(zero_shot_probs), 4.6), squeeze=False)
    for ax, (domain, methods) in zip(axes[0], zero_shot_probs.items()):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
        for method, probs in methods.items():
            count, confidence, acc = reliability(probs, labels[domain], RELIABILITY_BINS)
            occupied = count > 0
            ece = bayesvlm_ext.ece(probs, labels[domain])
            ax.plot(confidence[occupied], acc[occupied], marker="o", label=f"{method} (ECE {ece:.3f})")
        ax.set(title=f"zero-shot, {domain.replace('_', ' ')}", xlabel="confidence (top class)",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    directions = list(retrieval_results["map"])
    fig, axes = plt.subplots(1, len(directions), figsize=(5 * len(directions), 4.2), squeeze=False)
    for ax, name in zip(axes[0], directions):
        for method, by_direction in curves.items():  # tr(S) / ||mean||^2 differs in scale between the methods
            recall = by_direction[name]["recall@1"]
            rho = retrieval_results[method][name]["spearman"]
            rho = "undefined" if rho is None else f"{rho:.2f}"
            ax.plot(range(1, len(recall) + 1), recall, marker="o",
                    label=f"{METHOD_NAMES.get(method, method)} (Spearman {rho})")
        ax.axhline(retrieval_results["map"][name]["recall@1"], color="0.5", linestyle="--", label="MAP, all queries")
        ax.set(title=name.replace("_", " "), xlabel="query uncertainty bin (1 = most certain, equal counts)",
               ylabel="Recall@1 in the bin", ylim=(0, 1.02))
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)

    paths.append(os.path.join(out, "active_learning.png"))
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for method, curve in active.items():
        x, mean, std = (torch.tensor(column, dtype=torch.float64) for column in zip(*curve))
        ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=method)
    ax.set_xscale("symlog", linthresh=label_counts[0])
    ax.set(title="active learning, shifted domain", xlabel="labels", ylabel="test accuracy",
           xticks=(0, *label_counts), xticklabels=[str(x) for x in (0, *label_counts)])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
