"""`make demo` (`python -m bayesvlm_ext.demo [--out DIR]`): BayesVLM and ProbVLM on the embedded default model.

Everything goes through the public API a user would call, on the package's own data (`shapes`) and
model (`default_model`, whose trained weights ship with the package; nothing is downloaded):

1. the default model: a tiny open_clip CLIP trained contrastively on generated shapes;
2. the posterior of both towers: `fit_factors` over generated in-domain pairs (the curvature code of
   SPEC.md section 6, InfoNCE), one `KronPosterior` per tower, lambda tuned on the evidence at n = 1; and a
   copy with the pseudo-count n chosen on a held-out in-domain validation split (`tuning.tune_pseudo_count`,
   lambda by the evidence at each n of the grid, SPEC.md section 2);
3. the ProbVLM adapters (SPEC.md section 9) on the fit pairs' normalised embeddings: every candidate setting
   over several seeds, the one with the best validation score kept (`probvlm_seeds`);
4. zero-shot shape classification (6 classes; each class prompt averaged over 60 caption templates,
   `ZeroShotClassifier.from_templates`) in domain and under shift (new backgrounds, blur, noise,
   colour-shape combinations never seen in training): accuracy, NLPD and ECE for the MAP model, for
   BayesVLM with the probit approximation and with Monte Carlo, for BayesVLM with the tuned n (probit), and
   for ProbVLM (probit; mean and std over its seeds);
5. retrieval both ways over the images of both domains and their distinct captions: Recall@1/5/10 for
   the MAP model (ranked by cosine) and for both methods (ranked by the probit match probability,
   streamed top-k), with Recall@1 per bin of query uncertainty and the Spearman correlation between
   uncertainty and recall (the ProbVLM paper's calibration check);
6. selective prediction (SPEC.md section 11, `selective`): AURC, E-AURC and error-detection AUROC for zero-shot
   and image-to-text retrieval, per domain;
7. active learning on a mixed-domain pool targeting the shifted domain (`active_protocol`);
8. kernel timings: the fused logit moments against the naive published formulation on the demo's
   sizes (every test image against every distinct caption).

The ProbVLM trainings and the active-learning runs are single-threaded tasks on one worker process per core
(`--processes N`; `common.Workers`): their tensors are too small for threads to help, and their results do not
depend on the number of processes.

Prints the tables and writes the same numbers to DIR/results.json (default outputs/demo):
`zero_shot.{in_domain,shifted}.{map,bayesvlm_probit,bayesvlm_mc,bayesvlm_tuned,probvlm}.{acc,nlpd,ece}`,
`retrieval.{map,bayesvlm,probvlm}.{image_to_text,text_to_image}.{recall@1,recall@5,recall@10,spearman}`,
`selective.{zero_shot,retrieval}.{in_domain,shifted}.{map,bayesvlm,probvlm}.{aurc,eaurc,auroc}` (zero-shot
also `bayesvlm_tuned`), `tuning` (the pseudo-count search), `probvlm` (the selection, and the std and per-seed
values behind the ProbVLM figures, which are seed means), `uncertainty_bins`, `active_learning` and `timings`
(seconds per stage), plus four plots (`plots`): reliability.png, uncertainty_recall.png, risk_coverage.png and
active_learning.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import torch
from torch import nn

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, ZeroShotClassifier, cosine_moments, evaluation, predictive, reference
from bayesvlm_ext.demo import active_protocol, default_model, probvlm_seeds, selective, shapes
from bayesvlm_ext.demo.common import (PairsDataset, Workers, features, image_features, mean_and_std, metrics,
                                     unit_embeddings)
from bayesvlm_ext.demo.plots import save_plots
from bayesvlm_ext.tuning import tune_pseudo_count

SEED = 0
FIT_PAIRS = 8192  # in-domain pairs behind the curvature factors (one class batch)
EVAL_IMAGES = 3000  # per domain
VAL_IMAGES = 1000  # in-domain validation split (a seed of its own): n for BayesVLM, the settings of ProbVLM
EVAL_SEED, VAL_SEED = 200, 300  # offsets from SEED (the fit pairs use 100; active learning 400 and up)
MC_SAMPLES = 1000
TIMING_REPEATS = 5
RETRIEVAL_KS = (1, 5, 10)
UNCERTAINTY_BINS = 10
DOMAINS = {"in_domain": "test", "shifted": "shifted"}
PARTS = (probvlm_seeds.UNCERTAINTY, "aleatoric", "epistemic")  # ProbVLM's uncertainty, then each part alone


def fit_posteriors(model: nn.Module, data: shapes.ShapesData) -> dict[str, KronPosterior]:
    loader = torch.utils.data.DataLoader(PairsDataset(data), batch_size=512)
    return bayesvlm_ext.BayesVLM.fit(model, loader, likelihood="infonce", class_batch_size=FIT_PAIRS,
                                     progress=False).posteriors


def class_templates(model: nn.Module) -> torch.Tensor:  # [C, T, P_txt]
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


def caption_rows(captions: list[str]) -> tuple[list[str], torch.Tensor]:
    """(the distinct captions, sorted; [N] each caption's row among them)."""
    distinct = sorted(set(captions))
    row = {caption: i for i, caption in enumerate(distinct)}
    return distinct, torch.tensor([row[c] for c in captions])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join("outputs", "demo"), help="output directory")
    parser.add_argument("--processes", type=int, default=None,
                        help="worker processes for the ProbVLM trainings and the active-learning runs (default: one "
                             "per core; the results do not depend on it)")
    args = parser.parse_args(argv)
    with Workers(args.processes) as workers:
        return _run(args, workers)


def _run(args: argparse.Namespace, workers: Workers) -> dict:
    timings: dict[str, float] = {}
    start_all = time.perf_counter()
    print(f"bayesvlm_ext {bayesvlm_ext.__version__}, torch {torch.__version__}, backend('cpu') = "
          f"{bayesvlm_ext.backend('cpu')!r}, {torch.get_num_threads()} threads, {workers.processes} worker processes")

    # 1. the default model (the weights shipped with the package)
    start = time.perf_counter()
    model = default_model.load_default_model()
    timings["default_model"] = time.perf_counter() - start
    logit_scale = model.logit_scale.item()
    print(f"default model: open_clip CLIP, logit scale {math.exp(logit_scale):.1f}, loaded in "
          f"{timings['default_model']:.1f} s ({default_model.SHIPPED})")

    # 2. the posterior of both towers from data; n chosen on the validation split for a tuned copy
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
    classifier = ZeroShotClassifier.from_templates(posteriors["image"], posteriors["text"], class_templates(model),
                                                   logit_scale)
    val = shapes.generate(VAL_IMAGES, "test", seed=SEED + VAL_SEED)
    phi_val = image_features(model, val)
    tuned = {tower: copy.deepcopy(post) for tower, post in posteriors.items()}  # the n = 1 posteriors stay
    search = tune_pseudo_count(tuned["image"], tuned["text"], phi_val, val.shape, classifier.class_features,
                               logit_scale)
    search.extra.update({"split": f"{VAL_IMAGES} in-domain images (seed {SEED + VAL_SEED}), the shape labels",
                         "link": "probit"})
    tuned_classifier = ZeroShotClassifier(tuned["image"], tuned["text"], classifier.class_features, logit_scale)
    timings["tune_pseudo_count"] = time.perf_counter() - start
    print(f"\npseudo-count n on {VAL_IMAGES} held-out in-domain images (zero-shot labels; lambda by the evidence "
          f"at each n; {timings['tune_pseudo_count']:.1f} s):")
    print(f"{'n':>9} {'val NLPD':>9} {'lambda image':>13} {'lambda text':>12}")
    for i, n in enumerate(search.pseudo_counts):
        print(f"{n:>9.4g} {search.nlpd[i]:>9.4f} {search.prior_precisions['image'][i]:>13.4g} "
              f"{search.prior_precisions['text'][i]:>12.4g}" + ("  <- chosen" if i == search.best else ""))

    # 3. ProbVLM: the candidate settings over the seeds, chosen on the validation split
    start = time.perf_counter()
    fit_images = unit_embeddings(posteriors["image"], image_features(model, fit_data))
    fit_texts = unit_embeddings(posteriors["text"], features(model, "text", shapes.tokenize(fit_data.captions)))
    val_captions, val_rows = caption_rows(val.captions)
    val_texts = unit_embeddings(posteriors["text"], features(model, "text", shapes.tokenize(val_captions)))
    validation = (unit_embeddings(posteriors["image"], phi_val), val_texts, val_rows, val_texts[val_rows])
    probvlms, selection = probvlm_seeds.train_and_select(fit_images, fit_texts, validation, logit_scale, workers)
    timings["probvlm_fit"] = time.perf_counter() - start
    probvlm_seeds.print_selection(selection)
    print(f"(all candidates and seeds trained in {timings['probvlm_fit']:.1f} s)")

    # 4. zero-shot classification of the shape, in domain and under shift
    start = time.perf_counter()
    zero_shot, eval_features, zero_shot_probs, probvlm_probs = {}, {}, {}, {}
    for name, domain in DOMAINS.items():
        data = shapes.generate(EVAL_IMAGES, domain, seed=SEED + EVAL_SEED)
        phi = image_features(model, data)
        eval_features[name] = (phi, data)
        mean, var = classifier.logits(phi)  # once for both links (what classifier.predict does per call)
        mc = predictive(mean, var, link="mc", num_samples=MC_SAMPLES, generator=torch.Generator().manual_seed(SEED + 1))
        zero_shot_probs[name] = {"map": classifier.map_probabilities(phi),
                                 "bayesvlm_probit": predictive(mean, var, link="probit"), "bayesvlm_mc": mc,
                                 "bayesvlm_tuned": tuned_classifier.predict(phi, link="probit")}
        zero_shot[name] = {method: metrics(probs, data.shape) for method, probs in zero_shot_probs[name].items()}
        # ProbVLM's classes: the text adapter on CLIP's class embedding (the normalised template average).
        unit_classes = torch.nn.functional.normalize(classifier.classes.mean.float(), dim=1)
        probvlm_probs[name] = []
        for probvlm in probvlms:
            images = probvlm.image.embed(unit_embeddings(posteriors["image"], phi), probvlm_seeds.UNCERTAINTY)
            mean, var = cosine_moments(images, probvlm.text.embed(unit_classes, probvlm_seeds.UNCERTAINTY), logit_scale)
            probvlm_probs[name].append(predictive(mean, var, link="probit"))
        zero_shot_probs[name]["probvlm"] = probvlm_probs[name][0]  # the reliability diagram shows the first seed
    probvlm_zero_shot = [{name: metrics(probvlm_probs[name][i], eval_features[name][1].shape) for name in DOMAINS}
                         for i in range(len(probvlms))]
    probvlm_mean, probvlm_std = {}, {}
    probvlm_mean["zero_shot"], probvlm_std["zero_shot"] = mean_and_std(probvlm_zero_shot)
    for name in DOMAINS:
        zero_shot[name]["probvlm"] = probvlm_mean["zero_shot"][name]
    timings["zero_shot"] = time.perf_counter() - start
    print(f"\nzero-shot shape classification, {EVAL_IMAGES} images per domain, {len(shapes.SHAPES)} classes "
          f"(chance {1 / len(shapes.SHAPES):.3f}; bayesvlm_tuned: n = {search.pseudo_count:.4g}; probvlm: mean over "
          f"{len(probvlms)} seeds, +- std):")
    print(f"{'domain':<10} {'method':<18} {'accuracy':>8} {'NLPD':>8} {'ECE':>8}")
    for name, rows in zero_shot.items():
        for method, values in rows.items():
            spread = probvlm_std["zero_shot"][name] if method == "probvlm" else None
            print(f"{name:<10} {method:<18} {values['acc']:>8.4f} {values['nlpd']:>8.4f} {values['ece']:>8.4f}"
                  + (f"  +- {spread['acc']:.4f} {spread['nlpd']:.4f} {spread['ece']:.4f}" if spread else ""))

    # 5. retrieval both ways over the images of both domains and their distinct captions
    start = time.perf_counter()
    captions, image_captions = caption_rows([c for _, data in eval_features.values() for c in data.captions])
    phi_img = torch.cat([phi for phi, _ in eval_features.values()])
    phi_txt = features(model, "text", shapes.tokenize(captions))
    images = posteriors["image"].embed(phi_img.float(), against=posteriors["text"])
    texts = posteriors["text"].embed(phi_txt.float(), against=posteriors["image"])
    retrieval_results, bayesvlm_curves = evaluation.retrieval_report(images, texts, image_captions, logit_scale,
                                                                     ks=RETRIEVAL_KS, n_bins=UNCERTAINTY_BINS)
    query_domains = {name: slice(i * EVAL_IMAGES, (i + 1) * EVAL_IMAGES) for i, name in enumerate(DOMAINS)}
    sel_zero_shot = {name: {} for name in DOMAINS}
    risks = {"zero_shot": {name: {} for name in DOMAINS}, "retrieval": {name: {} for name in DOMAINS}}
    for name in DOMAINS:
        for method, key in (("map", "map"), ("bayesvlm", "bayesvlm_probit"), ("bayesvlm_tuned", "bayesvlm_tuned")):
            sel_zero_shot[name][method], risks["zero_shot"][name][method] = selective.zero_shot(
                zero_shot_probs[name][key], eval_features[name][1].shape)
    sel_retrieval = {name: {} for name in DOMAINS}
    point_images, point_texts = selective.point_masses(images), selective.point_masses(texts)
    for method, query, gallery, score in (("map", point_images, point_texts, "mean"),
                                          ("bayesvlm", images, texts, "probit")):
        per_domain, per_domain_risks = selective.split_by_domain(
            *selective.image_to_text_top1(query, gallery, image_captions, logit_scale, score), query_domains)
        for name in DOMAINS:
            sel_retrieval[name][method], risks["retrieval"][name][method] = per_domain[name], per_domain_risks[name]
    # ProbVLM per seed: its uncertainty as configured, then each part alone (which part tells good queries from bad)
    unit_images, unit_texts = (torch.nn.functional.normalize(d.mean, dim=1) for d in (images, texts))
    per_seed = []
    for i, probvlm in enumerate(probvlms):
        run: dict = {"retrieval": None, "bins": None, "spearman_by_part": {}, "selective": {"zero_shot": {},
                                                                                             "retrieval": {}}}
        for part in PARTS:
            query, gallery = probvlm.image.embed(unit_images, part), probvlm.text.embed(unit_texts, part)
            part_results, part_curves = evaluation.retrieval_report(query, gallery, image_captions, logit_scale,
                                                                    ks=RETRIEVAL_KS, n_bins=UNCERTAINTY_BINS,
                                                                    method="probvlm")
            run["spearman_by_part"][part] = {d: v["spearman"] for d, v in part_results["probvlm"].items()}
            if part == probvlm_seeds.UNCERTAINTY:
                run["retrieval"], run["bins"] = part_results["probvlm"], part_curves
                run["selective"]["retrieval"], run["risks_retrieval"] = selective.split_by_domain(
                    *selective.image_to_text_top1(query, gallery, image_captions, logit_scale, "probit"),
                    query_domains)
        for name in DOMAINS:
            run["selective"]["zero_shot"][name], risks_zero_shot = selective.zero_shot(
                probvlm_probs[name][i], eval_features[name][1].shape)
            run.setdefault("risks_zero_shot", {})[name] = risks_zero_shot
        per_seed.append(run)
    for key in ("retrieval", "bins", "spearman_by_part", "selective", "risks_zero_shot", "risks_retrieval"):
        probvlm_mean[key], probvlm_std[key] = mean_and_std([run[key] for run in per_seed])
    retrieval_results["probvlm"] = probvlm_mean["retrieval"]
    curves = {"bayesvlm": bayesvlm_curves, "probvlm": probvlm_mean["bins"]}
    for name in DOMAINS:
        sel_zero_shot[name]["probvlm"] = probvlm_mean["selective"]["zero_shot"][name]
        sel_retrieval[name]["probvlm"] = probvlm_mean["selective"]["retrieval"][name]
        risks["zero_shot"][name]["probvlm"] = probvlm_mean["risks_zero_shot"][name]
        risks["retrieval"][name]["probvlm"] = probvlm_mean["risks_retrieval"][name]
    selective_results = {"zero_shot": sel_zero_shot, "retrieval": sel_retrieval}
    timings["retrieval"] = time.perf_counter() - start
    print(f"\nretrieval, {len(phi_img)} images (both domains) and their {len(captions)} distinct captions; "
          f"BayesVLM and ProbVLM rank by the probit match probability; Spearman: query uncertainty against "
          f"Recall@1 over {UNCERTAINTY_BINS} equal-count bins; ProbVLM: mean over {len(probvlms)} seeds, +- std:")
    print(f"{'direction':<14} {'method':<9} {'R@1':>7} {'R@5':>7} {'R@10':>7} {'Spearman':>9}")
    for method, rows in retrieval_results.items():
        for direction, values in rows.items():
            rho = f"{values['spearman']:>9.4f}" if values.get("spearman") is not None else f"{'':>9}"
            spread = probvlm_std["retrieval"][direction]["spearman"] if method == "probvlm" else None
            print(f"{direction:<14} {method:<9} {values['recall@1']:>7.4f} {values['recall@5']:>7.4f} "
                  f"{values['recall@10']:>7.4f} {rho}" + ("" if spread is None else f" +- {spread:.4f}"))
    print("ProbVLM's Spearman per seed (image to text, text to image): " + "; ".join(
        ", ".join("undefined" if v["spearman"] is None else f"{v['spearman']:.4f}" for v in run["retrieval"].values())
        for run in per_seed))
    print("ProbVLM's Spearman by the part of its uncertainty (mean over seeds; image to text, text to image): "
          + "; ".join(f"{part} " + ", ".join("undefined" if rho is None else f"{rho:.4f}" for rho in by_dir.values())
                      for part, by_dir in probvlm_mean["spearman_by_part"].items()))
    selective.print_table(selective_results, {task: {name: {"probvlm": probvlm_std["selective"][task][name]}
                                                     for name in DOMAINS} for task in selective_results})

    # 6. active learning on a mixed-domain pool, targeting the shifted domain
    start = time.perf_counter()
    active = active_protocol.active_learning(posteriors, classifier, model, logit_scale, SEED, FIT_PAIRS, workers)
    timings["active_learning"] = time.perf_counter() - start
    active_protocol.print_tables(active, timings["active_learning"])

    # 7. kernel timings on the demo's sizes: every in-domain test image against every distinct caption
    start = time.perf_counter()
    phi_img, data = eval_features["in_domain"]
    img = posteriors["image"].embed(phi_img.float(), against=posteriors["text"])
    txt = posteriors["text"].embed(features(model, "text", shapes.tokenize(sorted(set(data.captions)))).float(),
                                   against=posteriors["image"])
    _, fused = timed(lambda: cosine_moments(img, txt, logit_scale))
    var_img, var_txt = img.diagonal_variance(), txt.diagonal_variance()
    _, naive = timed(lambda: reference.cosine_moments_diag(img.mean, var_img, txt.mean, var_txt, logit_scale))
    # ProbVLM's per-dimension variances go through the fused diagonal path (two GEMMs).
    diag_img = probvlms[0].image.embed(torch.nn.functional.normalize(img.mean, dim=1), probvlm_seeds.UNCERTAINTY)
    diag_txt = probvlms[0].text.embed(torch.nn.functional.normalize(txt.mean, dim=1), probvlm_seeds.UNCERTAINTY)
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
    plots = save_plots(args.out, zero_shot_probs, labels, retrieval_results, curves, active, risks)
    timings["plots"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all
    probvlm_summary = {"selection": selection, "seeds": list(probvlm_seeds.SEEDS),
                       "spearman_by_part": probvlm_mean["spearman_by_part"],
                       "std": {key: probvlm_std[key] for key in ("zero_shot", "retrieval", "spearman_by_part",
                                                                 "selective")},
                       "per_seed": [{"zero_shot": z, **{k: run[k] for k in ("retrieval", "spearman_by_part",
                                                                            "selective")}}
                                    for z, run in zip(probvlm_zero_shot, per_seed)]}
    results = {"zero_shot": zero_shot, "retrieval": retrieval_results, "selective": selective_results,
               "tuning": search.as_dict(), "active_learning": active, "timings": timings, "kernels": kernels,
               "posterior": posterior_summary, "probvlm": probvlm_summary, "uncertainty_bins": curves,
               "settings": {"seed": SEED, "fit_pairs": FIT_PAIRS, "eval_images": EVAL_IMAGES, "val_images": VAL_IMAGES,
                            "mc_samples": MC_SAMPLES, "logit_scale": logit_scale, "retrieval_ks": list(RETRIEVAL_KS),
                            "retrieval_score": "probit", "uncertainty": "tr(S) / ||mean||^2 of the query",
                            "uncertainty_bins": UNCERTAINTY_BINS,
                            "selective": {"zero_shot": "max predictive probability (MAP: max softmax probability)",
                                          "retrieval": "image-to-text queries split by the image's domain; the "
                                                       "rank-1 score (MAP cosine, else the probit match probability)"},
                            "probvlm": {**probvlms[0].config, "uncertainty": probvlm_seeds.UNCERTAINTY,
                                        "mean": "input", "chosen": selection["chosen"],
                                        **selection["candidates"][selection["chosen"]]["settings"],
                                        "batch_size": probvlm_seeds.BATCH, "train_pairs": probvlm_seeds.TRAIN_PAIRS},
                            "active_learning": active_protocol.settings()}}
    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("\ntimings (s): " + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in timings.items()))
    print(f"wrote {path}, " + ", ".join(plots))
    return results


if __name__ == "__main__":
    main()
