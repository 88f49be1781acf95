"""Calibrated zero-shot classification and uncertainty-aware retrieval on an open_clip or Hugging Face model.

    python python/calibrate.py --library open_clip --model ViT-B-32 --checkpoint open_clip_model.safetensors \\
        --fit-pairs pairs.jsonl --eval labelled.jsonl --out outputs/calibrate
    python python/calibrate.py --library hf --model clip-vit-base-patch32/ --posterior outputs/fit --eval labelled.jsonl
    python python/calibrate.py --self-test     # tiny random-init models and generated images, no files needed

The whole BayesVLM workflow of `bayesvlm_ext.demo`, on a user's model and files: one KronPosterior per tower
fitted from image-caption pairs with `fit_factors` (InfoNCE for CLIP, the sigmoid likelihood with the logit
bias for SigLIP; SPEC.md section 6) or loaded from a `bayesvlm-ext fit` output directory; zero-shot accuracy,
NLPD and ECE for the MAP model and for BayesVLM (probit and Monte Carlo; SPEC.md section 5); and, when the
evaluation file has captions, retrieval both ways with Recall@k and the Spearman correlation between query
uncertainty and per-bin Recall@1. Prints the tables and writes OUT/results.json in the demo's layout.
Nothing is downloaded: weights, tokenizers and images are files on disk.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter

os.environ["HF_HUB_OFFLINE"] = "1"  # before any import of huggingface_hub: open_clip and transformers stay offline

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, ZeroShotClassifier, evaluation, predictive
from bayesvlm_ext.demo import shapes
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.cli.inputs import PairsDataset, SkippingLoader
from bayesvlm_ext.curvature import DEFAULT_CLASS_BATCH_SIZE
from bayesvlm_ext.fit import TOWERS, unnormalised_encoder

DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
                     "a blurry photo of a {}.", "a drawing of a {}.")
RECALL_KS = (1, 5, 10)
UNCERTAINTY_BINS = 10
REPRODUCTION_TOL = 1e-5  # captured features through the projection against the model's own embeddings
SELF_TESTS = ("open_clip", "hf-clip", "hf-siglip")
DEFAULT_OUT = os.path.join("outputs", "calibrate")
TINY_OPEN_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                  "patch_size": 8},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


# ---- arguments -------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--eval", help="JSONL of {\"image\": PATH, \"label\": CLASS, \"caption\": TEXT (optional)}")
    parser.add_argument("--classes", help="comma-separated class names (default: the distinct labels, sorted)")
    parser.add_argument("--templates", nargs="+", default=list(DEFAULT_TEMPLATES), metavar="TEMPLATE",
                        help="prompt templates with one {} for the class name (default: %(default)s)")
    parser.add_argument("--out", help=f"output directory (default: {DEFAULT_OUT}; a temporary one for --self-test)")
    parser.add_argument("--class-batch-size", type=int, default=DEFAULT_CLASS_BATCH_SIZE,
                        help="pairs per class batch of the curvature (default: %(default)s)")
    parser.add_argument("--pseudo-count", type=float, default=1.0, help="n of SPEC.md section 2 (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="images or texts per forward pass (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default: %(default)s)")
    parser.add_argument("--mc-samples", type=int, default=1000, help="Monte Carlo samples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the Monte Carlo predictive (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--self-test", nargs="?", const="all", choices=[*SELF_TESTS, "all"],
                        help="random-init model(s) on generated data through the whole pipeline (default: all); "
                             "exits 1 when a check fails")
    args = parser.parse_args(argv)
    for name in ("class_batch_size", "batch_size", "mc_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers < 0 or not 0 < args.pseudo_count < math.inf:
        parser.error("--workers must be >= 0 and --pseudo-count a positive finite number")
    bad = [t for t in args.templates if t.count("{}") != 1]
    if bad:
        parser.error(f"--templates must each hold exactly one {{}}, got {bad}")
    if args.classes is not None and len({c.strip() for c in args.classes.split(",") if c.strip()}) < 2:
        parser.error("--classes needs at least two distinct comma-separated names")
    if args.self_test:
        given = [f"--{n.replace('_', '-')}" for n in ("library", "checkpoint", "fit_pairs", "posterior", "eval",
                                                       "classes") if getattr(args, n)]
        if given or (args.model and args.self_test != "open_clip"):
            parser.error(f"--self-test generates its own model and data: drop {', '.join(given) or '--model'} "
                         "(--model is allowed with --self-test open_clip: an open_clip architecture at random init)")
        return args
    missing = [f"--{n}" for n in ("library", "model", "eval") if not getattr(args, n)]
    if missing or not (args.fit_pairs or args.posterior):
        parser.error(f"required without --self-test: {', '.join(missing + ['--fit-pairs or --posterior'])}")
    check_model_arguments(parser, args)
    if not os.path.isfile(args.eval):
        parser.error(f"--eval {args.eval}: no such file")
    return args


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--library, --model, --checkpoint and the posterior's source (--fit-pairs or --posterior); shared with
    select_labels.py."""
    parser.add_argument("--library", choices=["open_clip", "hf"], help="where the model comes from")
    parser.add_argument("--model", help="open_clip: model name (e.g. ViT-B-32) or local-dir:DIR; hf: the model DIR")
    parser.add_argument("--checkpoint", help="open_clip: local checkpoint file (create_model(pretrained=PATH))")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--fit-pairs", help="JSONL of {\"image\": PATH, \"caption\": TEXT}: fit the posterior on them")
    source.add_argument("--posterior", help="directory with posterior_image/ and posterior_text/ (bayesvlm-ext fit)")


def check_model_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """parser.error unless the model and posterior options name files on disk that load without a download
    (--library and --model given, one of --fit-pairs or --posterior given)."""
    if args.library == "hf" and args.checkpoint:
        parser.error("--checkpoint is for open_clip; a Hugging Face model directory holds its own weights")
    if args.library == "hf" and not os.path.isdir(args.model):
        parser.error(f"--model {args.model}: not a directory (--library hf takes a local model directory)")
    if args.library == "open_clip":
        if args.model.startswith("hf-hub:"):
            parser.error("--model hf-hub:... would download; use local-dir:DIR or a name with --checkpoint")
        if args.model.startswith("local-dir:"):
            if args.checkpoint:
                parser.error("--checkpoint contradicts --model local-dir:DIR, which holds its own weights")
            if not os.path.isdir(args.model[len("local-dir:"):]):
                parser.error(f"--model {args.model}: not a directory")
        elif not args.checkpoint:
            parser.error("--library open_clip needs --checkpoint FILE (or --model local-dir:DIR)")
    for name in ("checkpoint", "fit_pairs"):
        path = getattr(args, name)
        if path and not os.path.isfile(path):
            parser.error(f"--{name.replace('_', '-')} {path}: no such file")
    if args.posterior and not all(os.path.isdir(os.path.join(args.posterior, f"posterior_{t}")) for t in TOWERS):
        parser.error(f"--posterior {args.posterior}: needs posterior_image/ and posterior_text/ (bayesvlm-ext fit)")


# ---- models: (model, preprocess(PIL image) -> [3, H, W], tokenizer(list of texts) -> [N, L]) ---------------
def load_model(args: argparse.Namespace):
    device = torch.device(args.device)
    if args.library == "open_clip":
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.checkpoint, device=device, require_pretrained=True, pretrained_text=False)
        return model.eval(), preprocess, open_clip.get_tokenizer(args.model)
    import transformers

    if args.quiet:
        transformers.logging.disable_progress_bar()
    model = transformers.AutoModel.from_pretrained(args.model, local_files_only=True).to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    image_processor = transformers.AutoImageProcessor.from_pretrained(args.model, local_files_only=True)
    length = model.config.text_config.max_position_embeddings  # SigLIP was trained on texts padded to this

    def tokenize(texts: list[str]) -> Tensor:  # [N, length]
        return tokenizer(list(texts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt")["input_ids"]

    def preprocess(image) -> Tensor:  # [3, H, W]
        return image_processor(images=image, return_tensors="pt")["pixel_values"][0]

    return model, preprocess, tokenize


def load_supported_model(args: argparse.Namespace):
    """`load_model` plus `logit_parameters`, stopping with the reason when a tower has no last linear map that
    bayesvlm_ext.capture can find; prints one line about the model."""
    model, preprocess, tokenizer = load_model(args)
    scale, bias, siglip = logit_parameters(model)
    for tower in TOWERS:
        try:
            find_projection(model, tower).layer()
        except ValueError as error:  # e.g. a ModifiedResNet image tower: no separate last linear map
            raise SystemExit(f"--model {args.model}: {error}") from error
    print(f"{args.library} {type(model).__name__} {args.model}: logit scale {math.exp(scale):.2f}"
          + (f", bias {bias:.2f} (SigLIP: sigmoid likelihood)" if siglip else " (CLIP: softmax likelihood)"))
    return model, preprocess, tokenizer, (scale, bias, siglip)


def logit_parameters(model: nn.Module) -> tuple[float, float, bool]:
    """(log s, beta, is SigLIP): a model with a logit bias is scored with sigmoids."""
    bias = getattr(model, "logit_bias", None)  # open_clip CLIP has the attribute set to None
    scale = float(model.logit_scale.detach().reshape(()))
    return scale, 0.0 if bias is None else float(bias.detach().reshape(())), bias is not None


# ---- data and features -------------------------------------------------------------------------------------
def read_labelled(path: str) -> tuple[list[dict], Counter]:
    """Records {"image": absolute path, "label", "caption" or None}; bad lines and missing images counted."""
    folder, records, skipped = os.path.dirname(os.path.abspath(path)), [], Counter()
    with open(path) as f:
        for line in filter(str.strip, f):
            try:
                record = json.loads(line)
                image, label, caption = record["image"], record["label"], record.get("caption")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
                skipped["malformed line"] += 1
                continue
            image = os.path.join(folder, image) if isinstance(image, str) else ""
            if not isinstance(label, str) or not label.strip() or not os.path.isfile(image):
                skipped["missing image or label"] += 1
                continue
            caption = caption.strip() if isinstance(caption, str) and caption.strip() else None
            records.append({"image": image, "label": label.strip(), "caption": caption})
    return records, skipped


class ImageFiles(torch.utils.data.Dataset):
    """(index, pixels [3, H, W]) per file, pixels None when the file cannot be read as an image."""

    def __init__(self, files: list[str], preprocess):
        self.files, self.preprocess = files, preprocess

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        try:
            with Image.open(self.files[index]) as image:
                return index, self.preprocess(image.convert("RGB"))
        except (OSError, ValueError):
            return index, None


def features(model: nn.Module, tower: str, batches, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """[N, P] features entering the tower's projection and [N, D] residual (SigLIP image tower) or None."""
    site, encode, parts = find_projection(model, tower), unnormalised_encoder(model, tower), []
    for inputs in batches:
        captured = capture(encode, inputs.to(device), site)
        parts.append((captured.features.float().cpu(), None if captured.residual is None else
                      captured.residual.float().cpu()))
    if not parts:
        raise SystemExit(f"no {tower} inputs could be read")
    residual = None if parts[0][1] is None else torch.cat([r for _, r in parts])
    return torch.cat([f for f, _ in parts]), residual


def image_features(model, preprocess, files: list[str], args, skipped: Counter):
    """(features [N', P], residual [N', D] or None, indices [N'] of the readable files)."""
    loader = torch.utils.data.DataLoader(ImageFiles(files, preprocess), batch_size=args.batch_size,
                                         num_workers=args.workers, collate_fn=list)
    kept = []

    def pixels():
        for items in tqdm(loader, disable=args.quiet, desc="image features", unit="batch"):
            good = [(i, p) for i, p in items if p is not None]
            if len(good) < len(items):
                skipped["unreadable image"] += len(items) - len(good)
            kept.extend(i for i, _ in good)
            if good:
                yield torch.stack([p for _, p in good])

    phi, residual = features(model, "image", pixels(), torch.device(args.device))
    return phi, residual, torch.tensor(kept)


def text_features(model, tokenizer, texts: list[str], args) -> tuple[Tensor, Tensor | None]:
    batches = (tokenizer(texts[i:i + args.batch_size]) for i in range(0, len(texts), args.batch_size))
    return features(model, "text", batches, torch.device(args.device))


# ---- the posterior of both towers ------------------------------------------------------------------------
def fit_posteriors(model, preprocess, tokenizer, args, siglip: bool, save_to: str | None) -> dict[str, KronPosterior]:
    """One tuned KronPosterior per tower from the pairs of args.fit_pairs, saved to SAVE_TO/posterior_{tower}/
    unless save_to is None."""
    def report(message: str) -> None:  # each skipped line, with its number
        tqdm.write(f"--fit-pairs {args.fit_pairs}: {message}", file=sys.stderr)

    dataset = PairsDataset(args.fit_pairs, preprocess, tokenizer, report)
    if len(dataset) == 0:
        raise SystemExit(f"--fit-pairs {args.fit_pairs}: no usable pairs (skipped: {dict(dataset.skipped)})")
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=list)
    # drops the pairs whose image (or caption) fails to load, counting and reporting them
    readable = SkippingLoader(loader, dataset.skipped, report)
    vlm = bayesvlm_ext.BayesVLM.fit(model, readable, likelihood="siglip" if siglip else "infonce",
                                    class_batch_size=args.class_batch_size, pseudo_count=args.pseudo_count,
                                    progress=not args.quiet)
    print(f"fitted on {vlm.num_data} pairs from {args.fit_pairs} (skipped: {dict(dataset.skipped) or 'none'})")
    if save_to is not None:
        vlm.save(save_to)
        print(f"wrote {save_to}/posterior_image and posterior_text (reuse them with --posterior {save_to})")
    return vlm.posteriors


def load_posteriors(model: nn.Module, directory: str) -> dict[str, KronPosterior]:
    """The saved posteriors; refused when their MAP layer is not this model's projection."""
    try:
        return bayesvlm_ext.BayesVLM.load(directory, model).posteriors
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--posterior {directory}: {error}") from None


# ---- evaluation ----------------------------------------------------------------------------------------
def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    return {"acc": bayesvlm_ext.accuracy(probs, labels), "nlpd": bayesvlm_ext.nlpd(probs, labels),
            "ece": bayesvlm_ext.ece(probs, labels)}


def zero_shot(posteriors, template_features: Tensor, template_residual, phi, residual, labels: Tensor,
              scale: float, bias: float, siglip: bool, args) -> dict[str, dict[str, float]]:
    """MAP, BayesVLM probit and BayesVLM MC: accuracy, NLPD, ECE (SigLIP: per-class sigmoid probabilities)."""
    classifier = ZeroShotClassifier.from_templates(posteriors["image"], posteriors["text"], template_features, scale,
                                                   bias, "sigmoid" if siglip else "softmax", template_residual)
    mean, var = classifier.logits(phi, residual)
    generator = torch.Generator().manual_seed(args.seed)
    probs = {"map": classifier.map_probabilities(phi, residual),
             "bayesvlm_probit": predictive(mean, var, link="sigmoid" if siglip else "probit"),
             "bayesvlm_mc": predictive(mean, var, link="mc_sigmoid" if siglip else "mc", num_samples=args.mc_samples,
                                       generator=generator)}
    return {method: classification_metrics(p, labels) for method, p in probs.items()}


def retrieval(posteriors, image, text, image_captions: Tensor, scale: float, bias: float) -> dict:
    """Retrieval both ways (`bayesvlm_ext.evaluation.retrieval_report`): images find their caption among the
    distinct captions, captions an image with that caption. image, text: (features, residual or None)."""
    results, _ = evaluation.retrieval_report(posteriors["image"].embed(*image, against=posteriors["text"]),
                                             posteriors["text"].embed(*text, against=posteriors["image"]),
                                             image_captions, scale, bias, ks=RECALL_KS, n_bins=UNCERTAINTY_BINS)
    return results


def print_tables(results: dict) -> None:
    print(f"\nzero-shot, {results['data']['eval_images']} images, {len(results['data']['classes'])} classes:")
    print(f"{'method':<18} {'accuracy':>8} {'NLPD':>8} {'ECE':>8}")
    for method, values in results["zero_shot"]["eval"].items():
        print(f"{method:<18} {values['acc']:>8.4f} {values['nlpd']:>8.4f} {values['ece']:>8.4f}")
    if "retrieval" in results:
        print(f"\nretrieval, {results['data']['retrieval_images']} images and their "
              f"{results['data']['distinct_captions']} distinct captions (Spearman: query uncertainty against "
              "Recall@1 per bin; empty when Recall@1 is the same in every bin):")
        print(f"{'direction':<14} {'method':<9} " + " ".join(f"{f'R@{k}':>7}" for k in RECALL_KS) + f" {'Spearman':>9}")
        for method, rows in results["retrieval"].items():
            for direction, values in rows.items():
                recalls = " ".join(f"{values[f'recall@{k}']:>7.4f}" if f"recall@{k}" in values else f"{'-':>7}"
                                   for k in RECALL_KS)
                rho = values.get("spearman")
                print(f"{direction:<14} {method:<9} {recalls} {'' if rho is None else f'{rho:>9.4f}'}".rstrip())


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    """The workflow on the files named in `args`; returns what it writes to OUT/results.json."""
    start_all = time.perf_counter()
    records, skipped = read_labelled(args.eval)  # checked before any model runs
    classes = sorted({r["label"] for r in records}) if args.classes is None else \
        list(dict.fromkeys(c.strip() for c in args.classes.split(",") if c.strip()))
    unknown = sorted({r["label"] for r in records} - set(classes))
    if unknown or len(records) < 2 or len(classes) < 2:
        raise SystemExit(f"--eval {args.eval}: " + (f"labels not among the classes: {unknown[:10]}" if unknown else
                         f"needs two images and two classes (skipped: {dict(skipped)})"))
    timings = {}
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    model, preprocess, tokenizer, (scale, bias, siglip) = load_supported_model(args)
    timings["load_model"] = time.perf_counter() - start

    start = time.perf_counter()
    posteriors = (fit_posteriors(model, preprocess, tokenizer, args, siglip, args.out) if args.fit_pairs
                  else load_posteriors(model, args.posterior))
    timings["posterior"] = time.perf_counter() - start
    for tower, posterior in posteriors.items():
        print(f"{tower:5s} posterior: {posterior}")

    start = time.perf_counter()
    phi, residual, kept = image_features(model, preprocess, [r["image"] for r in records], args, skipped)
    records = [records[i] for i in kept.tolist()]
    if len(records) < 2:
        raise SystemExit(f"--eval {args.eval}: fewer than two readable images (skipped: {dict(skipped)})")
    timings["image_features"] = time.perf_counter() - start

    start = time.perf_counter()
    prompts = [template.format(c) for c in classes for template in args.templates]
    phi_t, residual_t = text_features(model, tokenizer, prompts, args)
    shape = (len(classes), len(args.templates))
    class_index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([class_index[r["label"]] for r in records])
    results = {"model": {"library": args.library, "model": args.model, "likelihood": "sigmoid" if siglip else
                         "softmax", "logit_scale": scale, "logit_bias": bias},
               "posterior": {t: {"prior_precision": p.prior_precision, "in_features": p.in_features,
                                 "out_features": p.out_features} for t, p in posteriors.items()},
               "data": {"eval_images": len(records), "classes": classes, "templates": args.templates,
                        "skipped": dict(skipped)},
               "zero_shot": {"eval": zero_shot(posteriors, phi_t.reshape(*shape, -1), None if residual_t is None
                                               else residual_t.reshape(*shape, -1), phi, residual, labels, scale,
                                               bias, siglip, args)}}
    timings["zero_shot"] = time.perf_counter() - start

    with_caption = torch.tensor([i for i, r in enumerate(records) if r["caption"] is not None], dtype=torch.long)
    if len(with_caption) >= 2:
        start = time.perf_counter()
        captions = sorted({records[i]["caption"] for i in with_caption.tolist()})
        caption_index = {c: i for i, c in enumerate(captions)}
        image_captions = torch.tensor([caption_index[records[i]["caption"]] for i in with_caption.tolist()])
        image = (phi[with_caption], None if residual is None else residual[with_caption])
        results["retrieval"] = retrieval(posteriors, image, text_features(model, tokenizer, captions, args),
                                         image_captions, scale, bias)
        results["data"].update(retrieval_images=len(with_caption), distinct_captions=len(captions))
        timings["retrieval"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - start_all
    results["timings"] = timings
    print_tables(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nwrote {os.path.join(args.out, 'results.json')}")
    return results


# ---- self-test ------------------------------------------------------------------------------------------
def write_shapes_data(folder: str) -> tuple[str, str]:
    """64 generated training pairs and 48 labelled test images as PNG files plus fit.jsonl and eval.jsonl."""
    return (write_shapes_images(folder, "fit", "train", 64, seed=1, labelled=False),
            write_shapes_images(folder, "eval", "test", 48, seed=2, labelled=True))


def write_shapes_images(folder: str, name: str, domain: str, n: int, seed: int, labelled: bool) -> str:
    """n generated images of `domain` as FOLDER/NAME/0000.png, ... and FOLDER/NAME.jsonl of {"image", "caption"}
    (plus "label", the shape, when `labelled`), image paths relative to the JSONL's folder; returns the JSONL."""
    from PIL import Image

    data = shapes.generate(n, domain, seed=seed)
    os.makedirs(os.path.join(folder, name))
    pixels = (data.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        for i, caption in enumerate(data.captions):
            Image.fromarray(pixels[i]).save(os.path.join(folder, name, f"{i:04d}.png"))
            record = {"image": f"{name}/{i:04d}.png", "caption": caption}  # relative to the JSONL's folder
            if labelled:
                record["label"] = shapes.SHAPES[int(data.shape[i])]
            f.write(json.dumps(record) + "\n")
    return path


def write_open_clip_model(folder: str, name: str | None) -> str:
    """A random-init open_clip model as local-dir:FOLDER (config + safetensors); the tokenizer ships with open_clip."""
    import open_clip
    from safetensors.torch import save_file

    config = open_clip.get_model_config(name) if name else TINY_OPEN_CLIP
    if config is None:
        raise SystemExit(f"--model {name}: not an open_clip model name ({', '.join(open_clip.list_models()[:5])}, ...)")
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": config}, f)
    model = open_clip.create_model(name, pretrained=None) if name else open_clip.CLIP(**config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def write_hugging_face_model(folder: str, siglip: bool) -> str:
    """A tiny random-init CLIPModel or SiglipModel with an image processor and a word-level tokenizer built offline
    (the shapes vocabulary plus the default templates' words; the end token is the largest id)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = set(shapes.VOCABULARY) | {w for t in DEFAULT_TEMPLATES for w in t.replace(".", " .").split() if w != "{}"}
    vocab = {w: i for i, w in enumerate(["<pad>", *sorted(words), "<unk>", "<start>", "<end>"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", vocab["<start>"]), ("<end>", vocab["<end>"])])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                         bos_token="<start>", eos_token="<end>").save_pretrained(folder)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    # CLIP pools the text at the first eos_token_id (SigLIP at the last position, a pad here, as in training).
    text = dict(hidden_size=32, intermediate_size=29, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=len(vocab), max_position_embeddings=16, pad_token_id=0, bos_token_id=vocab["<start>"],
                eos_token_id=vocab["<end>"])
    if siglip:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text))
        with torch.no_grad():  # SigLIP's initial scale and bias (HF initialises both to 0): the bias path is exercised
            model.logit_scale.fill_(math.log(10.0)), model.logit_bias.fill_(-10.0)
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    else:
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                               projection_dim=16))
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # saving checks a default text config's token ids against our vocabulary
    try:
        model.save_pretrained(folder)
    finally:
        transformers.logging.set_verbosity(verbosity)
    processor.save_pretrained(folder)
    return folder


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@torch.no_grad()
def reproduction_failures(args: argparse.Namespace, files: list[str], texts: list[str]) -> list[str]:
    """The captured features through the projection, and each posterior's mean, against the model's own
    unnormalised embeddings of the same inputs (a second, independent forward)."""
    model, preprocess, tokenizer = load_model(args)
    posteriors = load_posteriors(model, args.out)
    images = ImageFiles(files, preprocess)
    inputs = {"image": torch.stack([images[i][1] for i in range(len(files))]), "text": tokenizer(texts)}
    failures = []
    for tower, x in inputs.items():
        expected = unnormalised_encoder(model, tower)(x.to(args.device)).float().cpu()
        phi, residual = features(model, tower, [x], torch.device(args.device))
        weight, bias = find_projection(model, tower).layer()
        projected = phi @ weight.float().cpu().T + (0 if bias is None else bias.float().cpu()) + (
            0 if residual is None else residual)
        for what, actual in (("features through the projection", projected),
                             ("posterior mean", posteriors[tower].embed(phi, residual).mean)):
            error = max_relative_error(actual, expected)
            ok = error <= REPRODUCTION_TOL
            print(f"  {tower:<5} {what:<32} vs the model's embeddings: max rel error {error:.2e} "
                  f"{'ok' if ok else f'FAIL (> {REPRODUCTION_TOL:g})'}")
            if not ok:
                failures.append(f"{tower} {what}")
    return failures


def numbers(tree) -> list:
    return [x for v in tree.values() for x in numbers(v)] if isinstance(tree, dict) else [tree]


def self_test(kind: str, args: argparse.Namespace, out: str) -> list[str]:
    """`run` on a random-init model written to disk and generated image files, then checks; returns failures."""
    print(f"=== self-test {kind}: random-init model, generated images, bayesvlm_ext backend "
          f"{bayesvlm_ext.backend(args.device)!r}")
    torch.manual_seed(0)
    if args.quiet and kind != "open_clip":
        import transformers

        transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        os.makedirs(os.path.join(folder, "model"))
        model = (write_open_clip_model(os.path.join(folder, "model"), args.model) if kind == "open_clip" else
                 write_hugging_face_model(os.path.join(folder, "model"), siglip=kind == "hf-siglip"))
        fit, evaluate = write_shapes_data(folder)
        common = ["--library", "open_clip" if kind == "open_clip" else "hf", "--model", model, "--eval", evaluate,
                  "--class-batch-size", "32", "--batch-size", "16", "--mc-samples", str(args.mc_samples),
                  "--seed", str(args.seed), "--device", args.device, "--templates", *args.templates]
        common += ["--quiet"] if args.quiet else []
        fitted = run(parse_args(common + ["--fit-pairs", fit, "--out", out]))
        print("\nthe same evaluation with the saved posterior (--posterior):")
        reloaded = run(parse_args(common + ["--posterior", out, "--out", os.path.join(out, "from_posterior")]))
        failures = reproduction_failures(parse_args(common + ["--posterior", out, "--out", out]),
                                         [os.path.join(folder, "eval", f"{i:04d}.png") for i in range(8)],
                                         ["a small red circle on the left", "a photo of a square."])
    scores = {k: fitted[k] for k in ("zero_shot", "retrieval")}
    values = [x for x in numbers(scores) if x is not None]  # a Spearman is None when recall is flat across bins
    if not values or not all(math.isfinite(x) for x in values):
        failures.append("non-finite metrics")
    pairs = list(zip(numbers(scores), numbers({k: reloaded[k] for k in scores}), strict=True))
    if not all(x is y is None or (None not in (x, y) and math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9))
               for x, y in pairs):
        failures.append("the saved posterior gives other metrics than the fitted one")
    return failures


def run_self_tests(test, args: argparse.Namespace) -> int:
    """Runs `test(kind, args, folder)` (a list of failures) for `args.self_test` ("all": every kind), in
    args.out or a temporary folder; prints the verdict and returns the exit status."""
    kinds = SELF_TESTS if args.self_test == "all" else (args.self_test,)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or scratch
        failures = [f"{kind}: {failure}" for kind in kinds
                    for failure in test(kind, args, root if len(kinds) == 1 else os.path.join(root, kind))]
    if failures:
        print(f"self-test FAILED: {'; '.join(failures)}", file=sys.stderr)
        return 1
    print(f"\nself-test passed ({', '.join(kinds)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.self_test:
        args.out = args.out or DEFAULT_OUT
        run(args)
        return 0
    return run_self_tests(self_test, args)


if __name__ == "__main__":
    sys.exit(main())
