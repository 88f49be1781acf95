"""Active selection of the unlabelled images worth labelling, on an open_clip or Hugging Face model.

    python python/select_labels.py --library hf --model clip-vit-base-patch32/ --posterior outputs/fit \\
        --pool unlabelled/ --targets deployment.jsonl --classes cat,dog,car --budget 100 --out selection.jsonl
    python python/select_labels.py --library open_clip --model ViT-B-32 --checkpoint open_clip_model.safetensors \\
        --fit-pairs pairs.jsonl --pool pool.jsonl --classes cat,dog,car --method bald --budget 50
    python python/select_labels.py --self-test     # tiny random-init models and generated images, no files needed

SPEC.md section 8 on a user's model and files, with the loading, posterior and feature code of calibrate.py:
the zero-shot classifier of the given classes (prompt templates averaged in feature space) under one
KronPosterior per tower, fitted from image-caption pairs or loaded from a `bayesvlm-ext fit` / calibrate.py
output directory; acquisition scores of every pool image (`bayesvlm_ext.active.acquisition_scores`: analytic variance
or probit entropy, or Monte Carlo aleatoric entropy, BALD or EPIG over joint weight samples of both towers, or
random), optionally on a support set first (the k nearest pool images of each target image,
`bayesvlm_ext.active.nearest_neighbours`); then a batch of `--budget` images (`bayesvlm_ext.active.select`: top scores,
class-balanced round robin over the predicted classes, or stochastic sampling). Writes one JSON line per
selected image in selection order. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter

os.environ["HF_HUB_OFFLINE"] = "1"  # before any import of huggingface_hub: open_clip and transformers stay offline

import torch
from torch import Tensor

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, ZeroShotClassifier
from bayesvlm_ext.active import Acquisition, JointSamples
from bayesvlm_ext.demo import shapes
from bayesvlm_ext.active import SAMPLED, Metric, Selection

import calibrate  # noqa: E402  (this script's folder is on sys.path when it runs as a script)
from calibrate import (DEFAULT_TEMPLATES, SELF_TESTS, ImageFiles, add_model_arguments, check_model_arguments,
                       features, fit_posteriors, image_features, load_model, load_posteriors, load_supported_model,
                       text_features, write_hugging_face_model, write_open_clip_model, write_shapes_data,
                       write_shapes_images)

METHODS = tuple(a.value for a in Acquisition)
STRATEGIES = tuple(s.value for s in Selection)
METRICS = tuple(m.value for m in Metric)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_OUT = os.path.join("outputs", "selection.jsonl")
DEFAULT_SAMPLES = 64
DEFAULT_STRATEGY = "top"
DEFAULT_METRIC = "cosine"
DEFAULT_TEMPERATURE = 1.0
SELF_TEST_BUDGET = 8
SELF_TEST_TARGETS = 16  # generated shifted-domain images
SELF_TEST_SUPPORT_K = 2
SCORE_TOL = 1e-5  # reported EPIG against the in-process recomputation (features from another batching)


# ---- arguments -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--save-posterior", metavar="DIR",
                        help="with --fit-pairs: save the fitted posterior to DIR/posterior_{image,text}/ (for "
                             "--posterior)")
    parser.add_argument("--pool", help="the unlabelled images: JSONL of {\"image\": PATH} or a folder of image files")
    parser.add_argument("--targets", help="images of the distribution you care about (JSONL or folder); needed by "
                                          "epig and --support-k")
    parser.add_argument("--support-k", type=int, metavar="K",
                        help="score only the pool images among the K nearest neighbours of some target")
    parser.add_argument("--metric", choices=METRICS,
                        help=f"distance of --support-k between posterior embeddings (default: {DEFAULT_METRIC})")
    parser.add_argument("--classes", help="comma-separated class names")
    parser.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES), metavar="TEMPLATE",
                        help="prompt templates with one {} for the class name (default: %(default)s)")
    parser.add_argument("--method", choices=METHODS,
                        help="acquisition score (default: epig with --targets, else bald)")
    parser.add_argument("--budget", type=int, help="images to select")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="scores to a batch: top scores, round robin over predicted classes, or sampling "
                             f"(default: {DEFAULT_STRATEGY})")
    parser.add_argument("--temperature", type=float,
                        help="randomised: probabilities softmax(scores / temperature) "
                             f"(default: {DEFAULT_TEMPERATURE})")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="joint posterior draws K for aleatoric, bald and epig (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the draws, the random scores and randomised selection (default: %(default)s)")
    parser.add_argument("--out", help=f"output JSONL (default: {DEFAULT_OUT}); with --self-test, a directory to keep "
                                      "the selections in (default: a temporary one)")
    parser.add_argument("--class-batch-size", type=int, default=calibrate.DEFAULT_CLASS_BATCH_SIZE,
                        help="--fit-pairs: pairs per class batch of the curvature (default: %(default)s)")
    parser.add_argument("--pseudo-count", type=float, default=1.0,
                        help="--fit-pairs: n of SPEC.md section 2 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images or texts per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--self-test", nargs="?", const="all", choices=[*SELF_TESTS, "all"],
                        help="random-init model(s) on generated images, every method (default: all); of the "
                             "options only --model (open_clip), --samples, --seed, --templates, --device, --quiet "
                             "and --out apply; exits 1 when a check fails")
    args = parser.parse_args(argv)
    for name in ("budget", "samples", "support_k", "class_batch_size", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.workers < 0 or not 0 < args.pseudo_count < math.inf or (
            args.temperature is not None and not 0 < args.temperature < math.inf):
        parser.error("--workers must be >= 0, --pseudo-count and --temperature positive finite numbers")
    bad = [t for t in args.templates if t.count("{}") != 1]
    if bad:
        parser.error(f"--templates must each hold exactly one {{}}, got {bad}")
    if args.classes is not None and len(class_names(args.classes)) < 2:
        parser.error("--classes needs at least two distinct comma-separated names")
    if args.self_test:
        given = [f"--{n.replace('_', '-')}" for n in ("library", "checkpoint", "fit_pairs", "posterior",
                                                       "save_posterior", "pool", "targets", "support_k", "metric",
                                                       "classes", "method", "budget", "strategy", "temperature")
                 if getattr(args, n) is not None]
        if given or (args.model and args.self_test != "open_clip"):
            parser.error(f"--self-test generates its own model and data and runs every method: drop "
                         f"{', '.join(given) or '--model'} (--model is allowed with --self-test open_clip: an "
                         "open_clip architecture at random init)")
        args.budget = SELF_TEST_BUDGET
        return args

    missing = [f"--{n}" for n in ("library", "model", "pool", "classes", "budget") if getattr(args, n) is None]
    if missing or not (args.fit_pairs or args.posterior):
        parser.error(f"required without --self-test: {', '.join(missing + ['--fit-pairs or --posterior'])}")
    if args.save_posterior and not args.fit_pairs:
        parser.error("--save-posterior saves a posterior fitted with --fit-pairs")
    args.method = args.method or ("epig" if args.targets else "bald")
    args.strategy, args.metric = args.strategy or DEFAULT_STRATEGY, args.metric or DEFAULT_METRIC
    args.temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    if args.method == "epig" and not args.targets:
        parser.error("--method epig scores the information about target images: give --targets (JSONL or folder)")
    if args.support_k and not args.targets:
        parser.error("--support-k keeps the pool images nearest to the targets: give --targets")
    if args.targets and args.method != "epig" and not args.support_k:
        parser.error(f"--targets is used by --method epig and by --support-k; --method {args.method} alone would "
                     "ignore it")
    check_model_arguments(parser, args)
    if args.out and os.path.isdir(args.out):
        parser.error(f"--out {args.out}: a directory; give the JSONL file to write")
    for name in ("pool", "targets"):
        path = getattr(args, name)
        if path is None:
            continue
        if not os.path.exists(path):
            parser.error(f"--{name} {path}: no such file or directory")
        files, skipped = read_images(path)
        if not files:
            parser.error(f"--{name} {path}: no images (skipped: {dict(skipped) or 'none'}; a folder is read for "
                         f"{', '.join(IMAGE_EXTENSIONS)} files)")
        if name == "pool":
            if args.budget > len(files):
                parser.error(f"--budget {args.budget} is larger than the pool ({len(files)} images in {path})")
            if args.support_k and args.support_k > len(files):
                parser.error(f"--support-k {args.support_k} is larger than the pool ({len(files)} images in {path})")
    return args


def class_names(text: str) -> list[str]:
    return list(dict.fromkeys(c.strip() for c in text.split(",") if c.strip()))


# ---- data --------------------------------------------------------------------------------------------------
def read_images(path: str) -> tuple[list[str], Counter]:
    """Absolute paths of the images of a folder (its image files, by name) or a JSONL of {"image": PATH} (paths
    relative to the JSONL's folder; other keys ignored); malformed lines, missing files and repeats counted."""
    skipped: Counter = Counter()
    if os.path.isdir(path):
        folder = os.path.abspath(path)
        return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(folder, f))], skipped
    folder, files, seen = os.path.dirname(os.path.abspath(path)), [], set()
    with open(path, errors="replace") as f:  # not text at all: every line counts as malformed
        for line in filter(str.strip, f):
            try:
                image = json.loads(line)["image"]
            except (json.JSONDecodeError, KeyError, TypeError):
                skipped["malformed line"] += 1
                continue
            image = os.path.normpath(os.path.join(folder, image)) if isinstance(image, str) and image else ""
            if not os.path.isfile(image):
                skipped["missing image"] += 1
            elif image in seen:  # a repeat would let one image be selected twice
                skipped["repeated image"] += 1
            else:
                seen.add(image)
                files.append(image)
    return files, skipped


def readable_features(model, preprocess, files: list[str], skipped: Counter, args):
    """(the readable files, their features [N, P] and residual [N, D] or None); unreadable ones counted."""
    phi, residual, kept = image_features(model, preprocess, files, args, skipped)
    return [files[i] for i in kept.tolist()], phi, residual


def zero_shot_classifier(model, tokenizer, posteriors: dict[str, KronPosterior], classes: list[str], args,
                         logit: tuple[float, float, bool]) -> ZeroShotClassifier:
    """The classes as averages of their prompt templates in feature space (ZeroShotClassifier.from_templates)."""
    scale, bias, siglip = logit
    prompts = [template.format(c) for c in classes for template in args.templates]
    phi_t, residual_t = text_features(model, tokenizer, prompts, args)
    shape = (len(classes), len(args.templates))
    return ZeroShotClassifier.from_templates(posteriors["image"], posteriors["text"], phi_t.reshape(*shape, -1),
                                             scale, bias, "sigmoid" if siglip else "softmax",
                                             None if residual_t is None else residual_t.reshape(*shape, -1))


def rows(x: Tensor | None, index: Tensor) -> Tensor | None:
    return None if x is None else x[index]


# ---- the selection -----------------------------------------------------------------------------------------
@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    """Scores the pool named in `args`, selects args.budget images, writes args.out; returns a summary."""
    start_all, timings = time.perf_counter(), {}
    classes, method = class_names(args.classes), Acquisition(args.method)
    pool_files, skipped = read_images(args.pool)
    target_files, target_skipped = read_images(args.targets) if args.targets else ([], Counter())

    start = time.perf_counter()
    model, preprocess, tokenizer, logit = load_supported_model(args)
    timings["load_model"] = time.perf_counter() - start
    start = time.perf_counter()
    posteriors = (fit_posteriors(model, preprocess, tokenizer, args, logit[2], args.save_posterior) if args.fit_pairs
                  else load_posteriors(model, args.posterior))
    timings["posterior"] = time.perf_counter() - start
    for tower, posterior in posteriors.items():
        print(f"{tower:5s} posterior: {posterior}")

    start = time.perf_counter()
    pool_files, phi, residual = readable_features(model, preprocess, pool_files, skipped, args)
    if target_files:
        target_files, phi_t, residual_t = readable_features(model, preprocess, target_files, target_skipped, args)
    classifier = zero_shot_classifier(model, tokenizer, posteriors, classes, args, logit)
    timings["features"] = time.perf_counter() - start

    start = time.perf_counter()
    candidates = torch.arange(len(pool_files))
    if args.support_k:
        if args.support_k > len(pool_files):
            raise SystemExit(f"--support-k {args.support_k} is larger than the {len(pool_files)} readable pool images "
                             f"(skipped: {dict(skipped)})")
        image = posteriors["image"]
        candidates, _ = bayesvlm_ext.active.nearest_neighbours(image.embed(phi, residual),
                                                               image.embed(phi_t, residual_t), args.support_k,
                                                               args.metric)
    if args.budget > len(candidates):
        raise SystemExit(f"--budget {args.budget} is larger than the {len(candidates)} images left to score "
                         f"({len(pool_files)} readable pool images, skipped: {dict(skipped) or 'none'}"
                         + (f"; support of --support-k {args.support_k}" if args.support_k else "") + ")")
    generator = torch.Generator().manual_seed(args.seed)  # draws first, then random scores, then selection
    samples = JointSamples(classifier, args.samples, generator=generator) if method in SAMPLED else None
    epig = method is Acquisition.EPIG
    scores = bayesvlm_ext.active.acquisition_scores(classifier, phi[candidates], method, samples=samples,
                                             targets=phi_t if epig else None,
                                             pool_residual=rows(residual, candidates),
                                             target_residual=residual_t if epig else None, generator=generator)
    probability, predicted = classifier.predict(phi[candidates], rows(residual, candidates), link="probit").max(1)
    picked = bayesvlm_ext.active.select(scores, args.budget, strategy=args.strategy, predicted=predicted,
                                 temperature=args.temperature, generator=generator)
    timings["scores_and_selection"] = time.perf_counter() - start

    selection = [{"rank": rank, "image": pool_files[int(candidates[i])], "score": float(scores[i]),
                  "predicted": classes[int(predicted[i])], "probability": float(probability[i])}
                 for rank, i in enumerate(picked.tolist(), start=1)]
    out = args.out or DEFAULT_OUT
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in selection)
    timings["total"] = time.perf_counter() - start_all

    chosen = scores[picked]
    print(f"method {method.value}" + (f" (K={args.samples} joint draws of both towers)" if samples else "")
          + f", strategy {args.strategy}, budget {args.budget}, seed {args.seed}")
    print(f"pool {len(pool_files)} images (skipped: {dict(skipped) or 'none'})"
          + (f", targets {len(target_files)} (skipped: {dict(target_skipped) or 'none'})" if target_files else ""))
    print(f"support {len(candidates)} images: " + (f"the {args.support_k} nearest ({args.metric}) of each target"
                                                   if args.support_k else "the whole pool"))
    print(f"scores over the support: min {float(scores.min()):.4g}, median {float(scores.median()):.4g}, max "
          f"{float(scores.max()):.4g}; selected: {float(chosen.min()):.4g} .. {float(chosen.max()):.4g}, predicted "
          + ", ".join(f"{name} {count}" for name, count in Counter(r["predicted"] for r in selection).most_common()))
    print(f"wrote {out} ({len(selection)} images) in {timings['total']:.1f} s (" +
          ", ".join(f"{k} {v:.1f} s" for k, v in timings.items() if k != "total") + ")")
    return {"method": method.value, "pool": len(pool_files), "support": len(candidates),
            "targets": len(target_files), "selection": selection, "timings": timings}


# ---- self-test ------------------------------------------------------------------------------------------
def read_selection(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def selection_failures(records: list[dict], budget: int, pool: set[str], classes: list[str],
                       strategy: str) -> list[str]:
    """What is wrong with one output file: size, distinct pool images, ranks, fields, order of the scores."""
    failures = []
    images = [r.get("image") for r in records]
    if len(records) != budget or len(set(images)) != budget or not set(images) <= pool:
        failures.append(f"{len(records)} records, {len(set(images))} distinct pool images; expected {budget}")
    if [r.get("rank") for r in records] != list(range(1, len(records) + 1)):
        failures.append("ranks are not 1, 2, ...")
    if not all(r.get("predicted") in classes and 0 <= r.get("probability", -1) <= 1
               and math.isfinite(r.get("score", math.nan)) for r in records):
        failures.append("a record with an unknown class, a probability outside [0, 1] or a non-finite score")
    scores = [r.get("score", math.nan) for r in records]
    if strategy == "top" and scores != sorted(scores, reverse=True):
        failures.append("strategy top but the scores are not in decreasing order")
    return failures


@torch.no_grad()
def recomputed_epig(args: argparse.Namespace, pool: list[str], targets: list[str]) -> Tensor:  # [N]
    """EPIG of every pool image straight from the API: a fresh model, the whole pool in one forward (no DataLoader),
    the class features from one text batch, JointSamples and acquisition_scores seeded as documented."""
    model, preprocess, tokenizer = load_model(args)
    scale, bias, siglip = calibrate.logit_parameters(model)
    posteriors = load_posteriors(model, args.posterior)
    device = torch.device(args.device)

    def image_inputs(files):  # [N, P], [N, D] or None
        images = ImageFiles(files, preprocess)
        return features(model, "image", [torch.stack([images[i][1] for i in range(len(files))])], device)

    (phi, residual), (phi_t, residual_t) = image_inputs(pool), image_inputs(targets)
    classes = class_names(args.classes)
    prompts = tokenizer([t.format(c) for c in classes for t in args.templates])
    text, text_residual = features(model, "text", [prompts], device)
    shape = (len(classes), len(args.templates), -1)
    classifier = ZeroShotClassifier.from_templates(
        posteriors["image"], posteriors["text"], text.reshape(shape), scale, bias, "sigmoid" if siglip else "softmax",
        None if text_residual is None else text_residual.reshape(shape))
    samples = JointSamples(classifier, args.samples, generator=torch.Generator().manual_seed(args.seed))
    return bayesvlm_ext.active.acquisition_scores(classifier, phi, "epig", samples=samples, targets=phi_t,
                                           pool_residual=residual, target_residual=residual_t)


def self_test(kind: str, args: argparse.Namespace, out: str) -> list[str]:
    """Every method end to end on a random-init model written to disk and generated image files; returns failures."""
    print(f"=== self-test {kind}: random-init model, generated images, bayesvlm_ext backend "
          f"{bayesvlm_ext.backend(args.device)!r}")
    torch.manual_seed(0)
    if args.quiet and kind != "open_clip":
        import transformers

        transformers.logging.disable_progress_bar()
    failures = []
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "model"))
        model = (write_open_clip_model(os.path.join(folder, "model"), args.model) if kind == "open_clip" else
                 write_hugging_face_model(os.path.join(folder, "model"), siglip=kind == "hf-siglip"))
        fit, _ = write_shapes_data(folder)  # 64 training pairs; the 48 test images in FOLDER/eval are the pool
        pool = os.path.join(folder, "eval")
        targets = write_shapes_images(folder, "targets", "shifted", SELF_TEST_TARGETS, seed=3, labelled=False)
        posterior = os.path.join(out, "posterior")
        pool_files, classes = set(read_images(pool)[0]), list(shapes.SHAPES)
        common = ["--library", "open_clip" if kind == "open_clip" else "hf", "--model", model, "--pool", pool,
                  "--classes", ",".join(classes), "--budget", str(args.budget), "--samples", str(args.samples),
                  "--class-batch-size", "32", "--batch-size", "16", "--device", args.device,
                  "--templates", *args.templates] + (["--quiet"] if args.quiet else [])

        def selected(name: str, *options: str, seed: int = args.seed, echo: bool = True) -> tuple[list[dict], dict]:
            argv = [*common, "--seed", str(seed), "--out", os.path.join(out, f"{name}.jsonl"), *options]
            if echo:
                print(f"\n--- {name}: {' '.join(options)} --seed {seed}")
            with contextlib.redirect_stdout(sys.stdout if echo else io.StringIO()):
                parsed = parse_args(argv)
                summary = run(parsed)
            records = read_selection(parsed.out)
            failures.extend(f"{name}: {f}" for f in selection_failures(records, args.budget, pool_files, classes,
                                                                       parsed.strategy))
            return records, summary

        with_targets = ["--targets", targets]
        fitted, _ = selected("epig-fitted", "--method", "epig", *with_targets, "--fit-pairs", fit,
                             "--save-posterior", posterior)
        first = {}
        for method in METHODS:
            options = ["--posterior", posterior, "--method", method, *(with_targets if method == "epig" else [])]
            first[method], _ = selected(method, *options)
            same = selected(f"{method}-again", *options, echo=False)[0] == first[method]
            print(f"the same run again: {'identical selection' if same else 'ANOTHER SELECTION'}")
            if not same:
                failures.append(f"{method}: two runs with seed {args.seed} selected differently")
        other, _ = selected("random-other-seed", "--posterior", posterior, "--method", "random", seed=args.seed + 1,
                            echo=False)
        differs = [r["image"] for r in other] != [r["image"] for r in first["random"]]
        print(f"random with seed {args.seed + 1}: {'another selection' if differs else 'THE SAME SELECTION'}")
        if not differs:
            failures.append(f"random: seeds {args.seed} and {args.seed + 1} selected the same images")
        if [r["image"] for r in fitted] != [r["image"] for r in first["epig"]] or not all(
                math.isclose(a["score"], b["score"], rel_tol=1e-6, abs_tol=1e-12)
                for a, b in zip(fitted, first["epig"])):
            failures.append("epig: the saved posterior (--posterior) selects otherwise than the fitted one")
        selected("bald-class-balanced", "--posterior", posterior, "--method", "bald", "--strategy", "class_balanced")
        selected("epig-randomised", "--posterior", posterior, *with_targets, "--strategy", "randomised",
                 "--temperature", "0.01")
        _, support = selected("epig-support", "--posterior", posterior, *with_targets, "--support-k",
                              str(SELF_TEST_SUPPORT_K), "--metric", "wasserstein")
        if not args.budget <= support["support"] <= min(len(pool_files), SELF_TEST_SUPPORT_K * SELF_TEST_TARGETS):
            failures.append(f"epig-support: a support of {support['support']} images")

        recompute_args = parse_args([*common, "--posterior", posterior, *with_targets, "--seed", str(args.seed)])
        ordered_pool = read_images(pool)[0]
        expected = recomputed_epig(recompute_args, ordered_pool, read_images(targets)[0])
    epig, index = first["epig"], {image: i for i, image in enumerate(ordered_pool)}
    reported = torch.tensor([r["score"] for r in epig], dtype=torch.float64)
    again = expected[[index[r["image"]] for r in epig]]
    error = float((reported - again).abs().max() / expected.abs().max().clamp_min(1e-30))
    unselected = expected[[i for image, i in index.items() if image not in {r["image"] for r in epig}]]
    top = float(again.min()) >= float(unselected.max()) - SCORE_TOL * float(expected.abs().max())
    print(f"\nepig scores in {os.path.join(out, 'epig.jsonl')} against acquisition_scores recomputed in-process: max "
          f"rel error {error:.2e}, selection = top {args.budget} of the recomputed scores: {top} "
          + ("ok" if error <= SCORE_TOL and top else "FAIL"))
    if error > SCORE_TOL or not top:
        failures.append(f"epig: the reported scores are not acquisition_scores' (rel error {error:.2e}, top {top})")
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.self_test:
        run(args)
        return 0
    return calibrate.run_self_tests(self_test, args)


if __name__ == "__main__":
    sys.exit(main())
