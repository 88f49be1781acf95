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
    fit.add_argument("--pseudo-count", type=float, default=1.0,
                     help="n of SPEC.md section 2, tempering the curvature; lambda is tuned at this n")
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
    if not args.pseudo_count > 0 or args.pseudo_count == float("inf"):
        parser.error(f"--pseudo-count must be a positive finite number, got {args.pseudo_count}")
    if not os.path.isfile(args.pairs):
        parser.error(f"--pairs {args.pairs}: no such file")
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

    likelihood = vlm.likelihood.value
    summary = {"pairs": vlm.num_data, "skipped": dict(skipped), "seconds": elapsed, "likelihood": likelihood,
               "processes": world, "pseudo_count": args.pseudo_count, "towers": {}}
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
    print(f"wrote {args.out}/posterior_image, {args.out}/posterior_text, {args.out}/bayesvlm/")
    return 0
