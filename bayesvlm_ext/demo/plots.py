"""The demo's four plots (matplotlib, off-screen): DIR/reliability.png (zero-shot reliability diagrams),
DIR/uncertainty_recall.png (Recall@1 per query-uncertainty bin, both methods), DIR/risk_coverage.png (selective
prediction: risk against coverage per task and domain) and DIR/active_learning.png (test accuracy against the
number of labels per acquisition method and selection, and the share of labels from the target domain).
Called by `bayesvlm_ext.demo.run`.
"""

from __future__ import annotations

import os

import torch

import bayesvlm_ext
from bayesvlm_ext.evaluation import DEFAULT_COVERAGES
from bayesvlm_ext.predictive import reliability

RELIABILITY_BINS = 10  # in the plot; the ECE figures use the 20 bins of bayesvlm_ext.ece
METHOD_NAMES = {"bayesvlm": "BayesVLM", "probvlm": "ProbVLM (seed mean)", "map": "MAP",
                "bayesvlm_tuned": "BayesVLM, tuned n"}
COLOURS = {"map": "C0", "bayesvlm": "C1", "bayesvlm_tuned": "C2", "probvlm": "C3",  # one colour per method
           "epig": "C0", "bald": "C1", "entropy": "C2", "random": "C3"}


def save_plots(out: str, zero_shot_probs: dict, labels: dict, retrieval_results: dict, curves: dict,
               active: dict, risks: dict) -> list[str]:
    """The four PNGs; returns their paths.

    zero_shot_probs {domain: {method: [N, C] probabilities}} with labels {domain: [N] classes};
    retrieval_results and curves as `evaluation.retrieval_report` returns them, per method; active as
    `active_protocol.active_learning` returns it; risks {task: {domain: {method: risks at 1 %..100 %}}}.
    """
    import matplotlib  # on first use: importing the demo does not load matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(out, name) for name in ("reliability.png", "uncertainty_recall.png", "risk_coverage.png",
                                                  "active_learning.png")]
    fig, axes = plt.subplots(1, len(zero_shot_probs), figsize=(5 * len(zero_shot_probs), 4.6), squeeze=False)
    for ax, (domain, methods) in zip(axes[0], zero_shot_probs.items()):
        ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", label="perfect calibration")
        for method, probs in methods.items():
            count, confidence, acc = reliability(probs, labels[domain], RELIABILITY_BINS)
            occupied = count > 0
            ece = bayesvlm_ext.ece(probs, labels[domain])
            name = "probvlm (first seed)" if method == "probvlm" else method
            ax.plot(confidence[occupied], acc[occupied], marker="o", label=f"{name} (ECE {ece:.3f})")
        ax.set(title=f"zero-shot, {domain.replace('_', ' ')}", xlabel="confidence (top class)",
               ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, paths[0], plt)

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
    _save(fig, paths[1], plt)

    panels = [(task, domain) for task, by_domain in risks.items() for domain in by_domain]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 4.0), squeeze=False)
    coverage = [100 * c for c in DEFAULT_COVERAGES]
    for ax, (task, domain) in zip(axes[0], panels):
        for method, risk in risks[task][domain].items():
            ax.plot(coverage, risk, label=METHOD_NAMES.get(method, method), color=COLOURS.get(method))
        title = "zero-shot" if task == "zero_shot" else "retrieval, image to text"
        ax.set(title=f"{title}, {domain.replace('_', ' ')}", xlabel="coverage (%, most confident first)",
               ylabel="risk (error rate among the answered)", xlim=(0, 100), ylim=(0, None))
        ax.legend(loc="upper left", fontsize=8)
    _save(fig, paths[2], plt)

    selections = list(active["accuracy"])
    fig, axes = plt.subplots(1, len(selections) + 1, figsize=(5.2 * (len(selections) + 1), 4.2), squeeze=False)
    for ax, selection in zip(axes[0], selections):
        for method, curve in active["accuracy"][selection].items():
            x, mean, std = (torch.tensor(column, dtype=torch.float64) for column in zip(*curve))
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=method, color=COLOURS.get(method))
        _label_axis(ax, x, f"active learning, {selection} batches", "shifted-domain test accuracy")
    ax = axes[0][-1]
    for selection, style in zip(selections, ("-", "--", ":")):
        for method, curve in active["target_fraction"][selection].items():
            x, mean, _ = (torch.tensor(column, dtype=torch.float64) for column in zip(*curve))
            ax.plot(x, mean, marker="o", linestyle=style, color=COLOURS.get(method), label=f"{method}, {selection}")
    _label_axis(ax, x, "labels picked from the shifted domain", "share of the labels so far")
    _save(fig, paths[3], plt)
    return paths


def _label_axis(ax, x, title: str, ylabel: str) -> None:
    ticks = [int(v) for v in x.tolist()]
    ax.set_xscale("symlog", linthresh=min(t for t in ticks if t > 0))
    ax.set(title=title, xlabel="labels", ylabel=ylabel, xticks=ticks, xticklabels=[str(v) for v in ticks])
    ax.legend(fontsize=7)


def _save(fig, path: str, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
