"""Command line: `bayesvlm-ext fit` (also `python -m bayesvlm_ext fit`).

    bayesvlm-ext fit --model ViT-B-32 --pretrained CHECKPOINT.pt --pairs PAIRS.jsonl --out DIR

PAIRS.jsonl holds one JSON object per line, {"image": PATH, "caption": TEXT}; relative image paths
are read from the JSONL's folder. Lines that are not such objects, empty captions, missing and
unreadable images are counted, reported and skipped; the run fails only when nothing is left.
DIR receives `posterior_image/` and `posterior_text/` (KronPosterior.save, tuned prior precision)
and `bayesvlm/`, the published factor format of SPEC.md section 10. Without --pretrained the
model is random-initialised (for tests; its factors mean nothing).

Under `torchrun --nproc-per-node K` (gloo on CPU, nccl with --device cuda: rank r uses cuda:LOCAL_RANK)
rank r loads and scores the class batches r, r + K, ... and the sums are all-reduced; rank 0 writes
DIR. When every image is readable the factors equal the one-process run's up to float64 summation
order; an unreadable image shortens its rank's stream, which then groups its class batches differently.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import torch

from .curvature import DEFAULT_CLASS_BATCH_SIZE, Likelihood, collective_device
from .fit import TOWERS, ClassBatchSampler, fit_factors
from .posterior import KronPosterior

PUBLISHED_TOWER = {"image": "img", "text": "txt"}


class PairsDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a JSONL file; an item is (pixels [3, H, W], tokens [L]) or None when unreadable."""

    def __init__(self, path: str, preprocess, tokenizer):
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.skipped: Counter = Counter()
        self.pairs: list[tuple[str, str]] = []
        folder = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image, caption = record["image"], record["caption"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    self.skipped["malformed line"] += 1
                    continue
                if not isinstance(caption, str) or not caption.strip():
                    self.skipped["empty caption"] += 1
                    continue
                image = image if os.path.isabs(image) else os.path.join(folder, image)
                if not os.path.isfile(image):
                    self.skipped["missing image"] += 1
                    continue
                self.pairs.append((image, caption))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        image, caption = self.pairs[index]
        try:
            with Image.open(image) as img:
                pixels = self.preprocess(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError):
            return None
        return pixels, self.tokenizer([caption])[0]


class _SkippingLoader:
    """Yields (pixels, tokens) batches without the unreadable items and counts them."""

    def __init__(self, loader, counter: Counter):
        self.loader, self.counter = loader, counter

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            good = [item for item in items if item is not None]
            if len(good) < len(items):
                self.counter["unreadable image"] += len(items) - len(good)
            if good:
                yield torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good])


def _start_distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); initialises torch.distributed when run by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _sum_over_ranks(counter: Counter, keys: tuple[str, ...], world: int) -> Counter:
    """`counter` with the counts of `keys` summed over the ranks (the other counts are the same on every rank)."""
    if world == 1:
        return counter
    import torch.distributed as dist

    values = torch.tensor([float(counter[k]) for k in keys], dtype=torch.float64, device=collective_device(None))
    dist.all_reduce(values)
    total = Counter(counter)
    for key, value in zip(keys, values.tolist()):
        total[key] = int(value)
    return +total  # drops zero counts


def fit_command(args: argparse.Namespace) -> int:
    rank, world, device = _start_distributed(torch.device(args.device))
    try:
        return _fit(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _fit(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    import open_clip

    say = print if rank == 0 else (lambda *a, **k: None)
    pretrained = args.pretrained
    torch.manual_seed(args.seed)  # without --pretrained every rank must draw the same random model
    model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=pretrained, device=device,
                                                                 precision=args.precision)
    model.eval()
    if pretrained is None:
        say("warning: no --pretrained: a random-initialised model (for tests only)", file=sys.stderr)
    tokenizer = open_clip.get_tokenizer(args.model)
    likelihood = args.likelihood or ("siglip" if "siglip" in args.model.lower() else "infonce")

    dataset = PairsDataset(args.pairs, preprocess, tokenizer)
    skipped = dataset.skipped
    if len(dataset) == 0:  # every rank reads the same file, so every rank stops here
        say(f"error: no usable pairs in {args.pairs} (skipped: {dict(skipped)})", file=sys.stderr)
        return 1
    # Loader batches inside class batches: the same forward batches with one process or several.
    sampler = ClassBatchSampler(len(dataset), args.class_batch_size, args.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.workers, collate_fn=list)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    try:
        fits = fit_factors(model, _SkippingLoader(loader, skipped), likelihood=likelihood,
                           class_batch_size=args.class_batch_size, device=device,
                           checkpoint=os.path.join(args.out, "checkpoint.pt") if args.resume else None,
                           progress=not args.quiet, distributed=world > 1)
    except ValueError as error:  # e.g. every image unreadable; the same on every rank after the reduction
        say(f"error: {error} (skipped: {dict(skipped)})", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    skipped = _sum_over_ranks(skipped, ("unreadable image",), world)
    if rank != 0:
        return 0

    published = os.path.join(args.out, "bayesvlm")
    os.makedirs(published, exist_ok=True)
    hyper, summary = {}, {"pairs": fits["image"].count, "skipped": dict(skipped), "seconds": elapsed,
                          "likelihood": likelihood, "processes": world, "pseudo_count": args.pseudo_count,
                          "towers": {}}
    for tower in TOWERS:
        fit = fits[tower]
        posterior = KronPosterior(fit.A, fit.B, fit.weight, fit.bias, pseudo_count=args.pseudo_count,
                                  damping=args.damping)
        lam = posterior.optimize_prior_precision()
        posterior.save(os.path.join(args.out, f"posterior_{tower}"))
        short = PUBLISHED_TOWER[tower]
        for name, factor in (("A", fit.A), ("B", fit.B)):
            torch.save(factor.float().cpu().contiguous(), os.path.join(published, f"{name}_{short}_analytic.pt"))
        hyper[f"lambda_{short}"], hyper[f"n_{short}"] = lam, posterior.pseudo_count
        report = posterior.factor_report
        summary["towers"][tower] = {
            "A_eigenvalues": [report["A"].min_eigenvalue, report["A"].max_eigenvalue],
            "B_eigenvalues": [report["B"].min_eigenvalue, report["B"].max_eigenvalue],
            "prior_precision": lam,
        }
    with open(os.path.join(published, "prior_precision_analytic.json"), "w") as f:
        json.dump(hyper, f, indent=2)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"fitted {summary['pairs']} pairs in {elapsed:.1f} s ({likelihood}, {world} process"
          f"{'es' if world > 1 else ''}); skipped: {dict(skipped) or 'none'}")
    for tower, info in summary["towers"].items():
        print(f"  {tower:5s}  A eigenvalues [{info['A_eigenvalues'][0]:.3g}, {info['A_eigenvalues'][1]:.3g}]  "
              f"B eigenvalues [{info['B_eigenvalues'][0]:.3g}, {info['B_eigenvalues'][1]:.3g}]  "
              f"lambda {info['prior_precision']:.4g}")
    print(f"wrote {args.out}/posterior_image, {args.out}/posterior_text, {published}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayesvlm-ext", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
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
    fit.add_argument("--resume", action="store_true", help="checkpoint to DIR/checkpoint.pt and resume from it")
    fit.add_argument("--seed", type=int, default=0, help="seeds the random initialisation when there is no --pretrained")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("class_batch_size", "batch_size"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.pseudo_count > 0 or args.pseudo_count == float("inf"):
        build_parser().error(f"--pseudo-count must be a positive finite number, got {args.pseudo_count}")
    if not os.path.isfile(args.pairs):
        build_parser().error(f"--pairs {args.pairs}: no such file")
    return fit_command(args)


if __name__ == "__main__":
    sys.exit(main())
