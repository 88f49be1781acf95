"""`bayesvlm-ext fit`: both towers' posteriors from a JSONL of image-caption pairs (BayesVLM.fit / save)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .._files import write_json
from ..curvature import DEFAULT_CLASS_BATCH_SIZE, Likelihood
from ..distributed import sum_over_ranks
from ..fit import ClassBatchSampler, weights_digest
from ..vlm import BayesVLM
from .common import check_at_least_one, check_output_directory
from .distributed import run_distributed
from .inputs import PairsDataset, SkippingLoader

def add_parser(commands) -> argparse.ArgumentParser:
    fit = commands.add_parser("fit", help="fit the posterior of both towers from image-caption pairs")
    fit.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    fit.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: random init)")
    fit.add_argument("--pairs", required=True, help="JSONL file of {\"image\": PATH, \"caption\": TEXT}")
    fit.add_argument("--out", required=True, help="output directory")
    fit.add_argument("--likelihood", choices=[v.value for v in Likelihood], default=None,
                     help="default: siglip for SigLIP models, else infonce")
    fit.add_argument("--class-batch-size", type=int, default=DEFAULT_CLASS_BATCH_SIZE)
    fit.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    fit.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    fit.add_argument("--damping", choices=["kron", "exact"], default="kron")
    fit.add_argument("--pseudo-count", type=float, default=None,
                     help="n of SPEC.md section 2, tempering the curvature (default 1); lambda is tuned at this n")
    fit.add_argument("--val", default=None,
                     help="JSONL of held-out image-caption pairs: choose n on it instead (SPEC.md section 2; each n "
                          "of a log grid with lambda by the evidence, scored by the NLPD of matching each held-out "
                          "image to its caption among all held-out captions)")
    fit.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    fit.add_argument("--precision", default="fp32", help="open_clip precision, e.g. fp32, bf16")
    fit.add_argument("--resume", action="store_true", help="checkpoint to DIR/checkpoint.pt and resume from it (only "
                                                           "a checkpoint of the same pairs, model and settings)")
    fit.add_argument("--seed", type=int, default=0,
                     help="seeds the random initialisation when there is no --pretrained")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    return fit


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Checks the options (parser.error, exit 2, before any work), then fits."""
    check_at_least_one(parser, args, ("class_batch_size", "batch_size"))
    if args.workers < 0:
        parser.error(f"--workers must be at least 0 (0: load in the main process), got {args.workers}")
    if args.pseudo_count is not None and args.val is not None:
        parser.error("--pseudo-count and --val exclude each other: --val chooses the pseudo-count")
    if args.pseudo_count is None:
        args.pseudo_count = 1.0
    if not args.pseudo_count > 0 or args.pseudo_count == float("inf"):
        parser.error(f"--pseudo-count must be a positive finite number, got {args.pseudo_count}")
    for option, path in (("--pairs", args.pairs), ("--val", args.val)):
        if path is not None and not os.path.isfile(path):
            parser.error(f"{option} {path}: no such file")
    check_output_directory(parser, args.out, ["summary.json", *BayesVLM.saved_files()])
    return fit_command(args)


def _pretrained_identity(pretrained: str | None):
    """--pretrained as a resumable fit records it: a tag as given, a checkpoint file by its name and size (so a
    moved file still matches; the model weights' digest catches a changed one)."""
    if pretrained is not None and os.path.isfile(pretrained):
        return {"file": os.path.basename(pretrained), "bytes": os.path.getsize(pretrained)}
    return pretrained


def fit_command(args: argparse.Namespace) -> int:
    return run_distributed(_fit, args, torch.device(args.device))


def _fit(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    import open_clip
    from tqdm.auto import tqdm

    say = print if rank == 0 else (lambda *a, **k: None)
    pretrained = args.pretrained
    torch.manual_seed(args.seed)  # without --pretrained every rank must draw the same random model
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=pretrained, device=device,
                                                                 precision=args.precision)
    model.eval()
    if pretrained is None:
        say("warning: no --pretrained: a random-initialised model (for tests only)", file=sys.stderr)
    tokenizer = open_clip.get_tokenizer(args.model)

    # Every rank reads the same file and finds the same bad lines: rank 0 reports them.
    dataset = PairsDataset(args.pairs, preprocess, tokenizer, report=lambda message: say(message, file=sys.stderr))
    skipped = dataset.skipped
    if len(dataset) == 0:  # every rank reads the same file, so every rank stops here
        say(f"error: no usable pairs in {args.pairs} (skipped: {dict(skipped)})", file=sys.stderr)
        return 1
    fingerprint = None
    if args.resume:  # what the checkpoint must have been made from; fit_factors adds its own settings
        fingerprint = {"pairs_sha256": dataset.sha256, "usable_lines_sha256": dataset.usable_sha256,
                       "pairs": len(dataset), "model": args.model, "pretrained": _pretrained_identity(pretrained),
                       "precision": args.precision, "seed": args.seed if pretrained is None else None,
                       "batch_size": args.batch_size, "model_weights": weights_digest(model)}
    # Images fail while loading, on the rank that loads them: each rank reports its own.
    prefix = f"rank {rank}: " if world > 1 else ""

    def loader_report(message: str) -> None:
        tqdm.write(prefix + message, file=sys.stderr)  # between the progress bar's updates, not through them

    # Loader batches inside class batches: the same forward batches with one process or several.
    sampler = ClassBatchSampler(len(dataset), args.class_batch_size, args.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=list)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    try:  # factors, both posteriors and their lambdas before any file: a fit that fails writes nothing
        vlm = BayesVLM.fit(model, SkippingLoader(loader, skipped, loader_report), likelihood=args.likelihood,
                           damping=args.damping, pseudo_count=args.pseudo_count,
                           class_batch_size=args.class_batch_size, device=device,
                           checkpoint=os.path.join(args.out, "checkpoint.pt") if args.resume else None,
                           fingerprint=fingerprint, progress=not args.quiet, distributed=world > 1)
    except ValueError as error:  # e.g. every image unreadable; the same on every rank after the reduction
        say(f"error: {error} (skipped: {dict(skipped)})", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    skipped = sum_over_ranks(skipped, ("unreadable image", "unusable caption"))
    if rank != 0:
        return 0

    search = None
    if args.val is not None:  # rank 0 alone: the search needs no collective
        search = _tune_on_held_out_pairs(args, vlm, preprocess, tokenizer, say)
        if search is None:
            return 1
    likelihood = vlm.likelihood.value
    summary = {"pairs": vlm.num_data, "skipped": dict(skipped), "seconds": elapsed, "likelihood": likelihood,
               "processes": world, "pseudo_count": vlm.image.pseudo_count, "towers": {}}
    if search is not None:
        summary["tuning"] = search.as_dict()
    for tower, posterior in vlm.posteriors.items():
        report = posterior.factor_report
        summary["towers"][tower] = {"A_eigenvalues": [report["A"].min_eigenvalue, report["A"].max_eigenvalue],
                                    "B_eigenvalues": [report["B"].min_eigenvalue, report["B"].max_eigenvalue],
                                    "prior_precision": posterior.prior_precision}
    vlm.save(args.out)  # posterior_image/, posterior_text/, bayesvlm/ (SPEC 10), bayesvlm.json
    write_json(os.path.join(args.out, "summary.json"), summary, "--out")
    print(f"fitted {summary['pairs']} pairs in {elapsed:.1f} s ({likelihood}, {world} process"
          f"{'es' if world > 1 else ''}); skipped: {dict(skipped) or 'none'}")
    for tower, info in summary["towers"].items():
        print(f"  {tower:5s}  A eigenvalues [{info['A_eigenvalues'][0]:.3g}, {info['A_eigenvalues'][1]:.3g}]  "
              f"B eigenvalues [{info['B_eigenvalues'][0]:.3g}, {info['B_eigenvalues'][1]:.3g}]  "
              f"lambda {info['prior_precision']:.4g}")
    if search is not None:
        print(f"pseudo-count n chosen on {search.extra['held_out']} held-out pairs ({args.val}): held-out NLPD per n")
        for i, (n, score) in enumerate(zip(search.pseudo_counts, search.nlpd)):
            print(f"  n {n:<8.3g} NLPD {score:.4f}{'  <- chosen' if i == search.best else ''}")
    print(f"wrote {args.out}/posterior_image, {args.out}/posterior_text, {args.out}/bayesvlm/")
    return 0


def _tune_on_held_out_pairs(args: argparse.Namespace, vlm: BayesVLM, preprocess, tokenizer, say):
    """Captures the held-out pairs' features batch by batch and runs `BayesVLM.tune_features` on the matching
    task (labels 0..N-1: each image's own caption); None after an error message when no pair is usable."""
    from tqdm.auto import tqdm

    held_out = PairsDataset(args.val, preprocess, tokenizer, report=lambda message: say(f"--val: {message}",
                                                                                         file=sys.stderr))
    skipped = held_out.skipped
    loader = torch.utils.data.DataLoader(held_out, batch_size=args.batch_size, num_workers=args.workers,
                                         collate_fn=list)
    parts = {"image": [], "text": []}
    for pixels, tokens in SkippingLoader(loader, skipped, lambda m: tqdm.write(f"--val: {m}", file=sys.stderr)):
        for tower, inputs in (("image", pixels), ("text", tokens)):
            captured = vlm.capture(tower, inputs)
            parts[tower].append((captured.features, captured.residual))
    if not parts["image"]:
        say(f"error: no usable pairs in --val {args.val} (skipped: {dict(skipped)})", file=sys.stderr)
        return None
    joined = {tower: (torch.cat([f for f, _ in batches]), None if batches[0][1] is None else
                      torch.cat([r for _, r in batches])) for tower, batches in parts.items()}
    (image, image_residual), (text, text_residual) = joined["image"], joined["text"]
    search = vlm.tune_features(image, torch.arange(image.shape[0]), text, image_residual=image_residual,
                               class_residual=text_residual, progress=not args.quiet)
    search.extra["skipped"] = dict(skipped)
    return search
