"""Print the README's demo tables, as GitHub markdown, from the results.json of one `make demo` run.

    python tools/demo_tables.py [outputs/demo/results.json]

Paste the output into the README's "What the demo shows" section so that its tables are those of one run;
the prose around them quotes the same file. Standard library only.
"""

import json
import math
import sys

SHOWN_N = (1e-4, 0.01, 0.1, 1.0, 10.0, 1e4)  # pseudo-count rows always shown, beside the chosen n and its neighbours
AL_METHODS = ("epig", "bald", "entropy", "random")
AL_NAMES = {"epig": "EPIG", "bald": "BALD", "entropy": "entropy", "random": "random"}
AL_SELECTIONS = {"top": "top", "class_balanced": "balanced"}


def table(header, rows, right_from=0):
    """A markdown table; columns from right_from on are right-aligned."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["|" + "|".join(" %s " % c if c != "" else " " for c in row) + "|" for row in rows]
    return "\n".join(lines)


def fmt_n(n):
    """A pseudo-count to two significant digits: 1e-4, 0.01, 0.032, 1, 10, 1e4."""
    if 1e-3 <= n < 1e3:
        return "%g" % float("%.2g" % n)
    mantissa, exponent = ("%.1e" % n).split("e")
    return "%se%d" % (mantissa.rstrip("0").rstrip("."), int(exponent))


def sig3(x):
    """Three significant digits, trailing zeros kept: 6.68, 23.0, 63.1."""
    return "%.*f" % (max(0, 2 - math.floor(math.log10(abs(x)))), x)


def pm(mean, std, digits, std_digits=None):
    return "%.*f +- %.*f" % (digits, mean, digits if std_digits is None else std_digits, std)


def zero_shot(r):
    zs, sd, n = r["zero_shot"], r["probvlm"]["std"]["zero_shot"], fmt_n(r["tuning"]["pseudo_count"])
    methods = [("map", "MAP"), ("bayesvlm_probit", "BayesVLM, probit (n = 1)"),
               ("bayesvlm_mc", "BayesVLM, Monte Carlo (%d; n = 1)" % r["settings"]["mc_samples"]),
               ("bayesvlm_tuned", "BayesVLM, probit, tuned n = " + n), ("probvlm", "ProbVLM, probit")]
    rows = []
    for domain, domain_name in (("in_domain", "in domain"), ("shifted", "shifted")):
        for key, name in methods:
            if domain == "in_domain" and key == "map":
                name = "MAP (the deterministic model)"
            m = zs[domain][key]
            if key == "probvlm":
                cells = [pm(m[k], sd[domain][k], 4) for k in ("acc", "nlpd", "ece")]
            else:
                cells = ["%.4f" % m[k] for k in ("acc", "nlpd", "ece")]
            rows.append([domain_name, name] + cells)
    return table(["domain", "method", "accuracy", "NLPD", "ECE"], rows, right_from=2)


def pseudo_count(r):
    t = r["tuning"]
    grid, best = t["pseudo_counts"], t["best"]
    rows = []
    for i, n in enumerate(grid):
        if not (abs(i - best) <= 1 or any(math.isclose(n, s, rel_tol=1e-6) for s in SHOWN_N)):
            continue
        label, nlpd = fmt_n(n), "%.4f" % t["nlpd"][i]
        notes = (["chosen"] if i == best else []) + (["the published default"] if n == 1.0 else [])
        if i == best:
            label, nlpd = "**%s**" % label, "**%s**" % nlpd
        if notes:
            label += " (%s)" % "; ".join(notes)
        rows.append([label, nlpd, sig3(t["prior_precisions"]["image"][i]), sig3(t["prior_precisions"]["text"][i])])
    return table(["n", "validation NLPD", "lambda, image", "lambda, text"], rows)


def retrieval(r):
    ret, sd = r["retrieval"], r["probvlm"]["std"]["retrieval"]
    rows = []
    names = {"map": "MAP (cosine)", "bayesvlm": "BayesVLM (probit)", "probvlm": "ProbVLM (probit)"}
    order = [(d, m) for m in ("map", "bayesvlm") for d in ("image_to_text", "text_to_image")]
    order = sorted(order, key=lambda dm: dm[0]) + [(d, "probvlm") for d in ("image_to_text", "text_to_image")]
    for direction, method in order:
        name = names[method]
        m = ret[method][direction]
        if method == "probvlm":
            spearman = pm(m["spearman"], sd[direction]["spearman"], 2)
        else:
            spearman = "%.4f" % m["spearman"] if "spearman" in m else ""
        recalls = ["%.4f" % m["recall@%d" % k] for k in (1, 5, 10)]
        rows.append([direction.replace("_", " "), name, *recalls, spearman])
    return table(["direction", "method", "R@1", "R@5", "R@10", "Spearman"], rows, right_from=2)


def probvlm_candidates(r):
    sel = r["probvlm"]["selection"]
    rows = []
    for name, c in sel["candidates"].items():
        s, mean, std = c["settings"], c["mean"], c["std"]
        if s["patience"] < s["epochs"]:
            label = "%s, at most %d epochs)" % (name[:-1], s["epochs"])
        else:
            label = "%s (%d epochs)" % (name, s["epochs"])
        if name == sel["chosen"]:
            label = "**%s: chosen**" % label
        rows.append([label, pm(mean["val_auroc_image_to_text"], std["val_auroc_image_to_text"], 3),
                     pm(mean["val_spearman_image_to_text"], std["val_spearman_image_to_text"], 2),
                     "%.2f" % mean["val_ggd_nll"], ("%.1f" % mean["epochs"]).rstrip("0").rstrip(".")])
    header = ["candidate", "validation AUROC", "validation Spearman (image to text)", "validation GGD NLL", "epochs"]
    return table(header, rows, right_from=1)


def selective(r):
    rows = []
    for task, methods in (("zero_shot", [("map", "MAP"), ("bayesvlm", "BayesVLM (n = 1)"),
                                         ("bayesvlm_tuned", "BayesVLM, tuned n"), ("probvlm", "ProbVLM")]),
                          ("retrieval", [("map", "MAP"), ("bayesvlm", "BayesVLM"), ("probvlm", "ProbVLM")])):
        for domain in ("in_domain", "shifted"):
            for key, name in methods:
                m = r["selective"][task][domain][key]
                rows.append([task.replace("_", "-"), domain.replace("_", " "), name]
                            + ["%.4f" % m[k] for k in ("aurc", "eaurc", "auroc")])
    return table(["task", "domain", "method", "AURC", "E-AURC", "AUROC"], rows, right_from=3)


def active_learning(r, what, labels, fmt):
    """One active-learning table: a row per number of labels, a column per (selection, method)."""
    data = r["active_learning"][what]
    columns = [(sel, m) for sel in AL_SELECTIONS for m in AL_METHODS]
    rows = []
    for n in labels:
        row = [n]
        for sel, m in columns:
            entry = next(e for e in data[sel][m] if e[0] == n)
            row.append(fmt(entry[1], entry[2]))
        rows.append(row)
    header = ["labels"] + ["%s, %s" % (AL_NAMES[m], AL_SELECTIONS[sel]) for sel, m in columns]
    return table(header, rows)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "outputs/demo/results.json"
    with open(path) as f:
        r = json.load(f)
    labels = r["settings"]["active_learning"]["labels"]
    print("\n\n".join([
        zero_shot(r), pseudo_count(r), retrieval(r), probvlm_candidates(r), selective(r),
        active_learning(r, "accuracy", labels, lambda mean, std: pm(mean, std, 4, 3)),
        active_learning(r, "target_fraction", [n for n in (25, 100, 400) if n in labels],
                        lambda mean, std: "%.2f" % mean),
    ]))


if __name__ == "__main__":
    main()
