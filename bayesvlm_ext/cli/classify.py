"""`bayesvlm-ext classify`: zero-shot classification of images with calibrated probabilities (SPEC.md section 5).

    bayesvlm-ext classify --model ViT-B-32 --pretrained CHECKPOINT.pt --posterior DIR \\
        --images photos/ --classes cat,dog,car --out predictions.jsonl
    bayesvlm-ext classify --model ViT-B-32 --pretrained CHECKPOINT.pt --factors hessians/DIR ...   # SPEC 10

The posterior comes from `bayesvlm-ext fit` (--posterior, `BayesVLM.load`) or from published factors
(--factors, `BayesVLM.from_published`); each class is described by the prompt templates (default "a photo
of a {}."), averaged in feature space (`template_average`). For each image (a folder's image files, or a
JSONL of {"image": PATH}) it prints the top classes with their predictive probability and the standard
deviation of their logit, and writes one JSON line: {"image", "predicted", "probability", "top": [{"class",
"probability", "logit_std"}, ...], "probabilities": [C], "logit_std": [C]} in the order of --classes.
A line or image that cannot be read is counted, reported with its line number and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch

from .._files import atomic_open, output_file
from ..vlm import BayesVLM
from .common import CommandError, check_at_least_one
from .inputs import decoded_rgb, failure, image_list

DEFAULT_TEMPLATE = "a photo of a {}."


def add_parser(commands) -> argparse.ArgumentParser:
    classify = commands.add_parser("classify", help="zero-shot classify images: calibrated probabilities and logit "
                                                    "standard deviations, as JSONL")
    classify.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    classify.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: random init)")
    source = classify.add_mutually_exclusive_group(required=True)
    source.add_argument("--posterior", help="output directory of `bayesvlm-ext fit` for this model")
    source.add_argument("--factors", help="published factor directory (SPEC.md section 10): A_img_analytic.pt, ...")
    classify.add_argument("--images", required=True, help="folder of images, or JSONL of {\"image\": PATH}")
    classes = classify.add_mutually_exclusive_group(required=True)
    classes.add_argument("--classes", help="comma-separated class names, e.g. cat,dog,car")
    classes.add_argument("--classes-file", help="text file, one class name per line")
    classify.add_argument("--template", action="append", default=None,
                          help=f"prompt template with {{}} for the class name (repeatable; default "
                               f"{DEFAULT_TEMPLATE!r})")
    classify.add_argument("--out", required=True, help="JSONL file: one line per image")
    classify.add_argument("--top-k", type=int, default=3, help="classes printed (and listed in 'top') per image")
    classify.add_argument("--link", choices=["probit", "mc"], default="probit",
                          help="predictive: probit approximation or Monte Carlo over the Gaussian logits")
    classify.add_argument("--mc-samples", type=int, default=1000, help="samples with --link mc")
    classify.add_argument("--mc-seed", type=int, default=0, help="seed of the samples with --link mc")
    classify.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    classify.add_argument("--damping", choices=["kron", "exact"], default="kron", help="with --factors")
    classify.add_argument("--precision", default="fp32", help="open_clip precision, e.g. fp32, bf16")
    classify.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    classify.add_argument("--seed", type=int, default=0,
                          help="seeds the random initialisation when there is no --pretrained")
    classify.add_argument("--quiet", action="store_true", help="print only the summary")
    return classify


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Checks the options (parser.error, exit 2, before any work), then classifies."""
    check_at_least_one(parser, args, ("top_k", "mc_samples", "batch_size"))
    directory, option = (args.posterior, "--posterior") if args.posterior is not None else (args.factors, "--factors")
    if not os.path.isdir(directory):
        parser.error(f"{option} {directory}: no such directory")
    if not os.path.exists(args.images):
        parser.error(f"--images {args.images}: no such file or directory")
    if args.classes_file is not None and not os.path.isfile(args.classes_file):
        parser.error(f"--classes-file {args.classes_file}: no such file")
    args.class_names = _class_names(parser, args)
    args.templates = args.template or [DEFAULT_TEMPLATE]
    for template in args.templates:
        if template.count("{}") != 1:
            parser.error(f"--template {template!r} must hold exactly one {{}} (where the class name goes)")
    try:
        output_file(args.out, "--out", create=False)
    except ValueError as error:
        parser.error(str(error))
    try:
        return _classify(args)
    except CommandError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def _class_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    if args.classes is not None:
        option, names = "--classes", [name.strip() for name in args.classes.split(",")]
    else:
        option = f"--classes-file {args.classes_file}"
        with open(args.classes_file, encoding="utf-8", errors="replace") as f:
            names = [line.strip() for line in f if line.strip()]
    if not names or any(not name for name in names):
        parser.error(f"{option}: class names must be non-empty, got {names}")
    repeated = sorted(name for name, count in Counter(names).items() if count > 1)
    if repeated:
        parser.error(f"{option}: each class must be named once, repeated: {repeated}")
    return names


def _classify(args: argparse.Namespace) -> int:
    import open_clip
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained, device=device,
                                                                 precision=args.precision)
    model.eval()
    if args.pretrained is None:
        print("warning: no --pretrained: a random-initialised model (for tests only)", file=sys.stderr)
    try:
        if args.posterior is not None:
            vlm = BayesVLM.load(args.posterior, model, map_location=device)
        else:
            vlm = BayesVLM.from_published(model, args.factors, damping=args.damping, map_location=device)
    except (FileNotFoundError, ValueError) as error:
        where = f"--posterior {args.posterior}" if args.posterior is not None else f"--factors {args.factors}"
        raise CommandError(f"{where}: {error}") from None

    def report(message: str) -> None:
        tqdm.write(f"--images {args.images}: {message}", file=sys.stderr)

    paths, ids, places, skipped = image_list(args.images, report)
    names, templates = args.class_names, args.templates
    tokenizer = open_clip.get_tokenizer(args.model)
    tokens = tokenizer([template.format(name) for name in names for template in templates])
    classifier = vlm.zero_shot(tokens.reshape(len(names), len(templates), -1))
    generator = torch.Generator(device=device).manual_seed(args.mc_seed)
    top_k = min(args.top_k, len(names))
    classified = 0
    with atomic_open(args.out, "w", "--out") as out, \
            tqdm(total=len(paths), unit="image", disable=args.quiet, desc="classifying") as bar:
        for b0 in range(0, len(paths), args.batch_size):
            rows, pixels = [], []
            for row in range(b0, min(b0 + args.batch_size, len(paths))):
                try:
                    pixels.append(preprocess(decoded_rgb(paths[row])))
                    rows.append(row)
                except Exception as error:  # one image costs only its own line
                    reason = "missing image" if not os.path.isfile(paths[row]) else "unreadable image"
                    skipped[reason] += 1
                    report(f"{places[row]}: cannot be read ({failure(error)}); skipped")
            bar.update(min(args.batch_size, len(paths) - b0))
            if not rows:
                continue
            mean, var = classifier.logits(torch.stack(pixels))
            probs = classifier.classifier.probabilities(mean, var, args.link, args.mc_samples, generator).cpu()
            std = var.clamp_min(0).sqrt().cpu()
            for i, row in enumerate(rows):
                best = torch.argsort(probs[i], descending=True, stable=True)[:top_k].tolist()
                top = [{"class": names[c], "probability": float(probs[i, c]), "logit_std": float(std[i, c])}
                       for c in best]
                out.write(json.dumps({"image": ids[row], "predicted": top[0]["class"],
                                      "probability": top[0]["probability"], "top": top,
                                      "probabilities": probs[i].tolist(), "logit_std": std[i].tolist()}) + "\n")
                if not args.quiet:
                    shown = ", ".join(f"{t['class']} {t['probability']:.3f} (logit sd {t['logit_std']:.2f})"
                                      for t in top)
                    tqdm.write(f"{ids[row]}: {shown}")
            classified += len(rows)
        if classified == 0:  # raising inside atomic_open leaves --out as it was
            raise CommandError(f"--images {args.images}: no image could be classified (skipped: {dict(skipped)})")
    print(f"classified {classified} images into {len(names)} classes ({len(templates)} template"
          f"{'s' if len(templates) > 1 else ''} each, {vlm.likelihood.value}, {args.link}) in "
          f"{time.perf_counter() - start:.1f} s; skipped: {dict(skipped) or 'none'}; wrote {args.out}")
    return 0
