"""Command line: `bayesvlm-ext fit`, `index`, `retrieve` and `probvlm-train` (also `python -m bayesvlm_ext ...`).

    bayesvlm-ext fit --model ViT-B-32 --pretrained CHECKPOINT.pt --pairs PAIRS.jsonl --out DIR
    bayesvlm-ext index --posterior DIR --tower image --features GALLERY.safetensors --out INDEX
    bayesvlm-ext retrieve --index INDEX --posterior DIR --queries QUERIES.safetensors --k 10 --out RESULTS.jsonl
    bayesvlm-ext probvlm-train --embeddings PAIRS.safetensors --out ADAPTER
    bayesvlm-ext index --adapter ADAPTER --tower image --features EMBEDDINGS.safetensors --out INDEX

PAIRS.jsonl holds one JSON object per line, {"image": PATH, "caption": TEXT}; relative image paths
are read from the JSONL's folder. A line that is not UTF-8 or not such an object (an image that is a
number or null), an empty caption, a missing image, or an image that fails to decode (truncated, over
Pillow's decompression-bomb limit Image.MAX_IMAGE_PIXELS) or to preprocess is counted in summary.json's
"skipped", reported on stderr as "line N: ...; skipped", and skipped; the run fails only when nothing is
left. `--resume` checkpoints to DIR/checkpoint.pt and resumes only from a checkpoint made from the same
pairs file (its sha256 and usable lines), model (name, --pretrained, --precision, --seed, a digest of its
weights), likelihood, --class-batch-size and --batch-size; any other is refused, naming what differs.
DIR receives what `BayesVLM.save` writes, `BayesVLM.load(DIR, model)` reads: `posterior_image/` and
`posterior_text/` (KronPosterior.save, tuned prior precision), `bayesvlm/`, the published factor format
of SPEC.md section 10, and `bayesvlm.json`; beside them `summary.json`. Without --pretrained the
model is random-initialised (for tests; its factors mean nothing).

Under `torchrun --nproc-per-node K` (gloo on CPU, nccl with --device cuda: rank r uses cuda:LOCAL_RANK)
rank r loads and scores the class batches r, r + K, ... and the sums are all-reduced; rank 0 writes
DIR. When every image is readable the factors equal the one-process run's up to float64 summation
order; an unreadable image shortens its rank's stream, which then groups its class batches differently.

`index` embeds a gallery with one tower's posterior (DIR as written by `fit`; the other tower is the
query side) into memory-mapped safetensors shards (bayesvlm_ext.index); `retrieve` streams queries
through it and writes one JSON line per query: {"query", "ids", "scores", "mean", "variance"}. Under
torchrun both deal out whole shards in contiguous blocks (rank r: shards [S r / K, S (r + 1) / K));
`retrieve` gathers each rank's top-k on rank 0 and merges them (retrieval.merge_topk). Shard bytes and
result lines are then identical to one process at the same thread settings (torchrun sets
OMP_NUM_THREADS=1; BLAS may round differently with other thread counts).

`probvlm-train` trains the ProbVLM adapters (bayesvlm_ext.probvlm, SPEC.md section 9) on a safetensors
file of paired embeddings "image" and "text" [N, D] and writes ADAPTER (ProbVLM.save, history.json).
`index` and `retrieve` take `--adapter ADAPTER` in place of `--posterior DIR`: the features are then the
embeddings themselves [N, D], embedded as diagonal Gaussians with the options `index` records.

Outputs are checked before any work (a directory where a file goes, a device, FIFO or socket: exit 2,
naming --out), written beside their target and renamed over it (bayesvlm_ext._files; a symlink is
written through and stays a link), so a failed or interrupted run leaves the old file and no temporary
one. `index` over an existing INDEX builds a new generation and switches index.json over only when it
is complete: a failure (say, a non-finite feature, named by its row) keeps the old index serving, and
`retrieve` searches one generation even while a rewrite runs (bayesvlm_ext.index).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections import Counter
from typing import NamedTuple

import torch

from ._files import atomic_open, output_directory, output_file, write_json
from ._validation import LOGIT_SCALE_MAX, accumulation_dtype, check_finite_rows
from .curvature import DEFAULT_CLASS_BATCH_SIZE, Likelihood, collective_device
from .distribution import CovarianceForm, EmbeddingDistribution
from .fit import ClassBatchSampler, weights_digest
from .index import DEFAULT_SHARD_ROWS, IndexWriter, RetrievalIndex, first_non_finite_row, new_generation, open_index, \
    open_safetensors, posterior_summary, search
from .posterior import KronPosterior
from .probvlm import (DEFAULT_DEPTH, DEFAULT_DROPOUT, DEFAULT_EMBED_OPTIONS, DEFAULT_HIDDEN, DEFAULT_LR, LossWeights,
                      MeanSource, ProbVLM, ProbVLMAdapter, Uncertainty, train_probvlm)
from .probvlm import CONFIG_FILE as PROBVLM_CONFIG
from .probvlm import TENSORS_FILE as PROBVLM_TENSORS
from .retrieval import Score, merge_topk
from .vlm import BayesVLM

OTHER_TOWER = {"image": "text", "text": "image"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class _LineProblem(Exception):
    """Why one line (or image) of an input list gives no item: `reason` keys the skip counts, str() says what."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class _SkippedItem(NamedTuple):
    """A dataset item standing for a pair whose image or caption failed when loaded (picklable for workers)."""

    line: int
    reason: str
    message: str


def _json_lines(path: str, digest=None):
    """(line number, dict or _LineProblem) for each non-blank line of a JSONL file.

    Read as bytes and decoded line by line, so a line that is not UTF-8 is one skipped line rather than a
    UnicodeDecodeError that ends the run; `digest` (a hashlib object) sees every byte of the file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # editors may start a file with a BOM
            except UnicodeDecodeError as error:
                yield number, _LineProblem("not UTF-8", f"not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                                        f"{error.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as error:  # RecursionError: absurdly nested brackets
                detail = f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else \
                    type(error).__name__
                yield number, _LineProblem("malformed line", f"not JSON ({detail})")
                continue
            if not isinstance(record, dict):
                yield number, _LineProblem("malformed line", f"not a JSON object (got {_json_text(record)})")
                continue
            yield number, record


def _json_text(value, limit: int = 40) -> str:
    """`value` as JSON wrote it (5, null, [1]), cut to `limit` characters, for messages about input lines."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _listed_image(record: dict, folder: str) -> str:
    """The image path a JSONL record names, relative paths taken from `folder`; _LineProblem when it names none."""
    if "image" not in record:
        raise _LineProblem("malformed line", 'no "image" key')
    image = record["image"]
    if not isinstance(image, str):
        raise _LineProblem("malformed line", f"image is not a string (got {_json_text(image)})")
    if not image.strip():
        raise _LineProblem("malformed line", "image is an empty string")
    return image if os.path.isabs(image) else os.path.join(folder, image)


def _decoded_rgb(path: str):
    """The image at `path` fully decoded (a truncated file fails here, not later) and converted to RGB.

    Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) holds: above twice the limit Image.open raises
    DecompressionBombError, and its warning between once and twice the limit is turned into an error too, so
    such an image is skipped rather than decoded into gigabytes."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            return img.convert("RGB")


def _failure(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 200 else text[:197] + "..."


class PairsDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a JSONL file; an item is (pixels [3, H, W], tokens [L]), or a `_SkippedItem`
    (line number, reason, message) when its image cannot be decoded or preprocessed, or its caption tokenised.

    Lines that give no pair (not UTF-8, not a JSON object with a string "image" and "caption", an empty caption,
    a missing image file) are counted in `skipped` by reason and passed to `report` as "line N: ...; skipped".
    `lines[i]` is the line number of pair i. `sha256` digests the file's bytes and `usable_sha256` the list of
    usable lines: together they tie a resumable fit's checkpoint to this data."""

    def __init__(self, path: str, preprocess, tokenizer, report=lambda message: None):
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.skipped: Counter = Counter()
        self.pairs: list[tuple[str, str]] = []
        self.lines: list[int] = []
        folder = os.path.dirname(os.path.abspath(path))
        digest = hashlib.sha256()
        for number, record in _json_lines(path, digest):
            try:
                if isinstance(record, _LineProblem):
                    raise record
                image = _listed_image(record, folder)
                if "caption" not in record:
                    raise _LineProblem("malformed line", 'no "caption" key')
                caption = record["caption"]
                if not isinstance(caption, str):
                    raise _LineProblem("malformed line", f"caption is not a string (got {_json_text(caption)})")
                if not caption.strip():
                    raise _LineProblem("empty caption", "the caption is empty")
                if not os.path.isfile(image):
                    raise _LineProblem("missing image", f"image {image}: no such file")
            except _LineProblem as problem:
                self.skipped[problem.reason] += 1
                report(f"line {number}: {problem}; skipped")
                continue
            self.pairs.append((image, caption))
            self.lines.append(number)
        self.sha256 = digest.hexdigest()
        self.usable_sha256 = hashlib.sha256(json.dumps(self.lines).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        image, caption = self.pairs[index]
        try:
            pixels = self.preprocess(_decoded_rgb(image))
        except Exception as error:  # whatever one image does (bomb, truncation, preprocess), it costs only its pair
            return _SkippedItem(self.lines[index], "unreadable image", f"image {image}: cannot be read "
                                                                       f"({_failure(error)})")
        try:
            tokens = self.tokenizer([caption])[0]
        except Exception as error:
            return _SkippedItem(self.lines[index], "unusable caption", f"caption cannot be tokenised "
                                                                       f"({_failure(error)})")
        return pixels, tokens


class _SkippingLoader:
    """Yields (pixels, tokens) batches without the pairs that failed to load; counts them by reason and reports
    each with its line number through `report`."""

    def __init__(self, loader, counter: Counter, report=lambda message: None):
        self.loader, self.counter, self.report = loader, counter, report

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            good = []
            for item in items:
                if isinstance(item, _SkippedItem):
                    self.counter[item.reason] += 1
                    self.report(f"line {item.line}: {item.message}; skipped")
                else:
                    good.append(item)
            if good:
                yield torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good])


def _pretrained_identity(pretrained: str | None):
    """--pretrained as a resumable fit records it: a tag as given, a checkpoint file by its name and size (so a
    moved file still matches; the model weights' digest catches a changed one)."""
    if pretrained is not None and os.path.isfile(pretrained):
        return {"file": os.path.basename(pretrained), "bytes": os.path.getsize(pretrained)}
    return pretrained


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
        vlm = BayesVLM.fit(model, _SkippingLoader(loader, skipped, loader_report), likelihood=args.likelihood,
                           damping=args.damping, pseudo_count=args.pseudo_count,
                           class_batch_size=args.class_batch_size, device=device,
                           checkpoint=os.path.join(args.out, "checkpoint.pt") if args.resume else None,
                           fingerprint=fingerprint, progress=not args.quiet, distributed=world > 1)
    except ValueError as error:  # e.g. every image unreadable; the same on every rank after the reduction
        say(f"error: {error} (skipped: {dict(skipped)})", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    skipped = _sum_over_ranks(skipped, ("unreadable image", "unusable caption"), world)
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


# ---- index and retrieve ---------------------------------------------------------------------------------

class CommandError(Exception):
    """A user error found by a command: printed as "error: ..." and exit status 1."""


def _load_posteriors(directory: str, gallery_tower: str) -> tuple[KronPosterior, KronPosterior]:
    """(gallery tower's posterior, the other tower's) from a `fit` output directory."""
    posteriors = []
    for tower in (gallery_tower, OTHER_TOWER[gallery_tower]):
        path = os.path.join(directory, f"posterior_{tower}")
        if not os.path.isdir(path):
            raise CommandError(f"--posterior {directory}: missing posterior_{tower}/ (the output directory of "
                               "`bayesvlm-ext fit` holds posterior_image/ and posterior_text/)")
        try:
            posteriors.append(KronPosterior.load(path))
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(f"--posterior {directory}: {error}") from None
    return posteriors[0], posteriors[1]


def _load_models(args: argparse.Namespace, gallery_tower: str):
    """(gallery tower's model, the other tower's, the directory they came from): KronPosteriors from
    --posterior or ProbVLM adapters from --adapter."""
    if args.adapter is None:
        return (*_load_posteriors(args.posterior, gallery_tower), args.posterior)
    try:
        model = ProbVLM.load(args.adapter)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"--adapter {args.adapter}: {error}") from None
    return model.adapter(gallery_tower), model.adapter(OTHER_TOWER[gallery_tower]), args.adapter


class _FeatureFile:
    """A safetensors file of "features" [N, P] (any float dtype), optionally "ids" [N] int64 and "residual"
    [N, D]; memory-mapped, so a rank reads only the rows it asks for."""

    def __init__(self, path: str, option: str):
        try:
            self.file = open_safetensors(path)
        except (FileNotFoundError, ValueError) as error:
            raise CommandError(f"{option} {path}: {error}") from None
        floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        entries = self.file.entries
        if "features" not in entries:
            raise CommandError(f"{option} {path}: holds no tensor 'features' (expected features [N, P], optional "
                               f"ids [N] int64 and residual [N, D]; found {sorted(entries)})")
        dtype, shape = entries["features"][:2]
        if len(shape) != 2 or dtype not in floating:
            raise CommandError(f"{option} {path}: 'features' must be a 2-D float tensor [N, P], got {dtype} {shape}")
        self.rows, self.width = shape
        self.features = self.file.tensor("features")
        self.ids = self.residual = None
        if "ids" in entries:
            if entries["ids"][:2] != (torch.int64, (self.rows,)):
                raise CommandError(f"{option} {path}: 'ids' must be int64 of shape ({self.rows},), got "
                                   f"{entries['ids'][0]} {entries['ids'][1]}")
            self.ids = self.file.tensor("ids")
        if "residual" in entries:
            if len(entries["residual"][1]) != 2 or entries["residual"][1][0] != self.rows \
                    or entries["residual"][0] not in floating:
                raise CommandError(f"{option} {path}: 'residual' must be a float tensor [{self.rows}, D], got "
                                   f"{entries['residual'][0]} {entries['residual'][1]}")
            self.residual = self.file.tensor("residual")

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # [n, P], [n, D] or None
        """Rows [start, stop) copied out of the mapping: a fresh, aligned tensor embeds to the same bits as
        the same numbers in memory (BLAS may round differently for the file's arbitrary alignment)."""
        residual = None if self.residual is None else self.residual[start:stop].clone()
        return self.features[start:stop].clone(), residual


class _ImageFeatures:
    """The features entering the image projection of an open_clip model, computed on demand for rows of an
    image list: a JSONL of {"image": PATH} (relative paths from the file's folder) or a folder of images.

    Rows are the usable images in list order. Shards are laid out by row ranges before any is read, so a
    first pass decides which images are usable: every listed image is decoded once (under Pillow's
    decompression-bomb limit); malformed lines, missing and undecodable images are counted in `skipped`,
    reported with their line number and left out. Under torch.distributed the ranks share that pass and
    agree on its result. An image that passed it but fails while its shard is read is an error."""

    def __init__(self, args: argparse.Namespace, device: torch.device, say):
        import open_clip

        from .capture import find_projection
        from .fit import unnormalised_encoder

        def report(message: str) -> None:
            say(f"--images {args.images}: {message}", file=sys.stderr)

        paths, ids, places, self.skipped = _image_list(args.images, report)
        listed = len(paths) + sum(self.skipped.values())
        problems = _unusable_images(paths)
        for i in sorted(problems):
            reason, message = problems[i]
            self.skipped[reason] += 1
            report(f"{places[i]}: {message}; skipped")
        usable = [i for i in range(len(paths)) if i not in problems]
        self.paths, self.ids, self.places = ([items[i] for i in usable] for items in (paths, ids, places))
        if not self.paths:
            raise CommandError(f"--images {args.images}: no usable images among {listed} listed (skipped: "
                               f"{dict(self.skipped)})")
        if self.skipped:
            report(f"skipped {sum(self.skipped.values())} of {listed} listed images ({dict(self.skipped)}); the index "
                   f"holds the other {len(self.paths)}")
        self.source = args.images
        torch.manual_seed(args.seed)  # without --pretrained every rank must draw the same random model
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=args.pretrained, device=device, precision=args.precision)
        self.model.eval()
        if args.pretrained is None:
            say("warning: no --pretrained: a random-initialised model (for tests only)", file=sys.stderr)
        self.site = find_projection(self.model, "image")
        self.encode = unnormalised_encoder(self.model, "image")
        self.width = self.site.layer()[0].shape[1]
        self.device, self.batch_size = device, args.batch_size
        self.logit_scale = float(self.model.logit_scale.detach())
        bias = getattr(self.model, "logit_bias", None)
        self.logit_bias = 0.0 if bias is None else float(bias.detach())

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:  # [n, P], [n, D] or None
        from .capture import capture

        features, residuals = [], []
        for b0 in range(start, stop, self.batch_size):
            pixels = []
            for row in range(b0, min(b0 + self.batch_size, stop)):
                try:
                    pixels.append(self.preprocess(_decoded_rgb(self.paths[row])))
                except Exception as error:  # the rows are laid out: skipping one now would shift every later id
                    raise CommandError(f"--images {self.source}: {self.places[row]}: cannot be read or preprocessed "
                                       f"although the first pass decoded it ({_failure(error)})") from None
            with torch.no_grad():
                captured = capture(self.encode, torch.stack(pixels).to(self.device), self.site)
            features.append(captured.features.float().cpu())
            if captured.residual is not None:
                residuals.append(captured.residual.float().cpu())
        return torch.cat(features), torch.cat(residuals) if residuals else None


def _image_list(source: str, report) -> tuple[list[str], list[str], list[str], Counter]:
    """(absolute paths, ids as written, where each was listed, skip counts) of the images a JSONL of
    {"image": PATH} or a folder lists; a JSONL line that names no image is counted, passed to `report` as
    "line N: ...; skipped" and left out."""
    skipped: Counter = Counter()
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise CommandError(f"--images {source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        paths = [os.path.join(source, n) for n in names]
        return paths, names, [f"image {p}" for p in paths], skipped
    folder = os.path.dirname(os.path.abspath(source))
    paths, ids, places = [], [], []
    for number, record in _json_lines(source):
        try:
            if isinstance(record, _LineProblem):
                raise record
            path = _listed_image(record, folder)
        except _LineProblem as problem:
            skipped[problem.reason] += 1
            report(f"line {number}: {problem}; skipped")
            continue
        paths.append(path)
        ids.append(record["image"])
        places.append(f"line {number}: image {path}")
    if not paths and not skipped:
        raise CommandError(f"--images {source}: no images listed")
    return paths, ids, places, skipped


def _unusable_images(paths: list[str]) -> dict[int, tuple[str, str]]:
    """{position: (reason, message)} of the images in `paths` that are missing or fail to decode fully
    (not an image, truncated, over Pillow's decompression-bomb limit).

    Under torch.distributed each rank decodes every K-th image and the findings are gathered, so every rank
    holds the same answer (and lays out the same rows) for 1/K of the decoding."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    problems = {}
    for i in range(rank, len(paths), world):
        if not os.path.isfile(paths[i]):
            problems[i] = ("missing image", "no such file")
            continue
        try:
            _decoded_rgb(paths[i])
        except Exception as error:  # whatever one image does, it costs only its row
            problems[i] = ("unreadable image", f"cannot be read ({_failure(error)})")
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, problems)
        problems = {i: problem for part in gathered for i, problem in part.items()}
    return problems


def _block(count: int, rank: int, world: int) -> range:
    """The contiguous block of `count` items that rank `rank` of `world` takes."""
    return range(count * rank // world, count * (rank + 1) // world)


def _all_ok(ok: bool, world: int) -> bool:
    """True when `ok` holds on every rank (one all-reduce), so that all ranks stop or go on together."""
    if world == 1:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([0.0 if ok else 1.0], device=collective_device(None))
    dist.all_reduce(flag)
    return flag.item() == 0


def _run_distributed(command, args: argparse.Namespace, device: torch.device) -> int:
    rank, world, device = _start_distributed(device)
    try:
        return command(args, rank, world, device)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def index_command(args: argparse.Namespace) -> int:
    return _run_distributed(_index, args, torch.device(args.device))


def _index(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    from tqdm.auto import tqdm

    say = print if rank == 0 else (lambda *a, **k: None)
    start_time = time.perf_counter()
    generation = _shared_generation(rank, world)  # every rank writes its shards into this one new folder
    try:  # every rank reads the same inputs, so every rank fails here alike
        gallery_posterior, query_posterior, where = _load_models(args, args.tower)
        embed_options = None
        if args.adapter is not None:
            embed_options = {option: getattr(args, name) for name, option in _EMBED_OPTION_NAMES.items()}
        if args.features is not None:
            source = _FeatureFile(args.features, "--features")
            option, ids, logit_scale, logit_bias = "--features", source.ids, args.logit_scale, args.logit_bias
            if args.adapter is not None and source.residual is not None:
                raise CommandError(f"--features {args.features}: holds a 'residual', which a ProbVLM adapter does not "
                                   "use (its features are the embeddings themselves)")
        else:
            if args.adapter is not None:
                raise CommandError("--images computes features for a posterior; with --adapter give --features, the "
                                   "embeddings the adapter was trained on")
            if args.tower != "image":
                raise CommandError("--images computes image features: use it with --tower image")
            source = _ImageFeatures(args, device, say)
            option, ids = "--images", source.ids
            logit_scale = source.logit_scale if args.logit_scale is None else args.logit_scale
            logit_bias = source.logit_bias if args.logit_bias is None else args.logit_bias
        if source.width != gallery_posterior.in_features:
            raise CommandError(f"{option}: the features are [N, {source.width}] but the {args.tower} "
                               f"{'adapter' if args.adapter else 'posterior'} in {where} needs "
                               f"{'D' if args.adapter else 'P'} = {gallery_posterior.in_features}")
        if len(source) == 0:
            raise CommandError(f"{option}: no gallery items")
        dtype = torch.float32
        if isinstance(source, _FeatureFile):
            dtype = accumulation_dtype(source.features.dtype)
        writer = IndexWriter.for_posteriors(args.out, gallery_posterior, query_posterior, len(source), dtype,
                                            embed_options, shard_rows=args.shard_rows, ids=ids, tower=args.tower,
                                            logit_scale=logit_scale, logit_bias=logit_bias, generation=generation)
    except (CommandError, ValueError, OSError) as error:
        say(f"error: {error}", file=sys.stderr)
        return 1
    # The shards go to a new generation folder; the index already at --out serves until rank 0's `finish`
    # switches index.json over, and every failure path below removes the new folder (writer.abort).
    mine = _block(writer.num_shards, rank, world)
    failure = None
    bar = tqdm(total=sum(stop - start for start, stop in writer.ranges[mine.start:mine.stop]), unit="item",
               disable=args.quiet or rank != 0, desc="indexing")
    try:
        for number in mine:
            start, stop = writer.shard_range(number)
            phi, residual = source.read(start, stop)
            for name, values in (("feature", phi), ("residual", residual)):
                row = first_non_finite_row(values)
                if row is not None:
                    raise CommandError(f"{option} {args.features or args.images}: the {name} row of gallery item "
                                       f"{start + row} holds Inf or NaN; an index needs finite features (an index "
                                       f"already at --out is kept)")
            writer.embed_shard(number, phi, residual, batch_size=args.batch_size)
            bar.update(stop - start)
    except (CommandError, ValueError, OSError) as error:
        failure = str(error)
    except BaseException:  # Ctrl-C: no half-written generation stays behind
        writer.abort()
        raise
    finally:
        bar.close()
    if not _all_ok(failure is None, world):  # collective: after it no rank writes into the generation any more
        if failure is not None:
            print(f"error: {failure}" + (f" (rank {rank})" if world > 1 else ""), file=sys.stderr)
        if rank == 0:
            writer.abort()
        return 1
    if rank != 0:
        return 0
    try:
        writer.finish()
    except (ValueError, OSError) as error:
        writer.abort()
        print(f"error: {error}", file=sys.stderr)
        return 1
    except BaseException:
        writer.abort()
        raise
    elapsed = time.perf_counter() - start_time
    print(f"indexed {len(source)} {args.tower} items ({writer.form.value} form, D = {writer.dim}, "
          f"{str(writer.dtype).replace('torch.', '')}) in {writer.num_shards} shard"
          f"{'s' if writer.num_shards > 1 else ''}, {elapsed:.1f} s ({world} process{'es' if world > 1 else ''}); "
          f"wrote {args.out}/")
    return 0


def _shared_generation(rank: int, world: int) -> str:
    """A new index generation name (index.new_generation), picked by rank 0 and sent to every rank."""
    return _rank0_name(new_generation() if rank == 0 else "", world)


def _rank0_name(name: str, world: int) -> str:
    """Rank 0's `name` (ASCII, at most 128 characters) on every rank: a broadcast."""
    if world == 1:
        return name
    import torch.distributed as dist

    width = 128  # bytes: more than any generation name; a collective needs one shape on every rank
    codes = torch.zeros(width, dtype=torch.int64)
    if name:
        codes[:len(name)] = torch.tensor(list(name.encode("ascii")), dtype=torch.int64)
    codes = codes.to(collective_device(None))
    dist.broadcast(codes, src=0)
    return bytes(c for c in codes.cpu().tolist() if c).decode("ascii")


def _open_one_generation(directory: str, world: int) -> RetrievalIndex:
    """open_index on every rank, all of the same generation: a rewrite that switches index.json between the
    ranks' opens would otherwise have them search (and merge) two different galleries."""
    for _ in range(3):
        index = open_index(directory)
        mine = index.generation or ""  # "" for a version 1 index
        if _all_ok(_rank0_name(mine, world) == mine, world):
            return index
    raise CommandError(f"--index {directory} was rewritten while the ranks opened it, three times; run again")


def _matches(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same matrix up to the last bits (another machine's eigendecomposition), not merely a similar one."""
    rtol = 1e-10 if a.dtype == torch.float64 else 1e-5
    return a.shape == b.shape and float((a - b.to(a.dtype)).abs().max()) <= rtol * float(a.abs().max())


def _check_index_matches(index: RetrievalIndex, gallery: KronPosterior | ProbVLMAdapter,
                         query: KronPosterior | ProbVLMAdapter, where: str, embed_options: dict | None = None) -> None:
    """Raises CommandError unless `index` was built from these posteriors (sizes, hyper-parameters, matrices)
    or these ProbVLM adapters (configuration, fingerprint of the parameters, embed options)."""
    adapter = isinstance(gallery, ProbVLMAdapter)
    if index.dim != gallery.out_features:
        raise CommandError(f"--index {index.directory} has D = {index.dim}; the "
                           f"{'adapters' if adapter else 'posteriors'} in {where} have D = {gallery.out_features}")
    for side, posterior in (("gallery", gallery), ("query", query)):
        stored, given = index.posteriors.get(side), posterior_summary(posterior, embed_options)
        if stored is not None and stored != given:
            differing = sorted(key for key in given if stored.get(key) != given[key])
            raise CommandError(f"--index {index.directory} was built with another {side} "
                               f"{'adapter' if adapter else 'posterior'} than the one in "
                               f"{where} (differs in {', '.join(differing)})")
    if adapter:  # no shared matrices: the fingerprints above identify the adapters
        if index.form is not CovarianceForm.DIAG:
            raise CommandError(f"--index {index.directory} holds '{index.form.value}'-form items; a ProbVLM adapter "
                               "gives 'diag'")
        return
    template = gallery.embed(torch.zeros(0, gallery.in_features, dtype=index.dtype), against=query)
    if template.form is not index.form:
        raise CommandError(f"--index {index.directory} holds '{index.form.value}'-form items; the {index.tower} "
                           f"posterior in {where} gives '{template.form.value}'")
    # The kron form's eigenbasis is derived from "shared"; an eigen-form basis is compared up to column signs,
    # which another machine's eigendecomposition may flip.
    compared = {"shared": (template.shared, False), "cross_shared": (template.cross_shared, False)}
    if index.form is CovarianceForm.EIGEN:
        compared["basis"] = (template.basis, True)
    for name, stored in index.shared.items():
        given, up_to_sign = compared.get(name, (None, False))
        if up_to_sign and given is not None:
            stored, given = stored.abs(), given.abs()
        if name in compared and (given is None or not _matches(stored, given)):
            side = f"query ({OTHER_TOWER[index.tower]})" if name == "cross_shared" else f"gallery ({index.tower})"
            raise CommandError(f"--index {index.directory}: its {side} covariance matrix '{name}' does not match the "
                               f"posterior in {where}; rebuild the index with this posterior")
    if "cross_shared" not in index.shared and template.cross_shared is not None:
        raise CommandError(f"--index {index.directory} was built without the query side's matrix; rebuild it with "
                           f"the posterior in {where}")


def retrieve_command(args: argparse.Namespace) -> int:
    return _run_distributed(_retrieve, args, torch.device("cpu"))


def _retrieve(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    from tqdm.auto import tqdm

    say = print if rank == 0 else (lambda *a, **k: None)
    start_time = time.perf_counter()
    try:  # every rank reads the same inputs, so every rank fails here alike
        index = _open_one_generation(args.index, world)  # a snapshot: later rewrites do not change it
        if index.tower is None:
            raise CommandError(f"--index {args.index} names no tower (built in Python without tower=); rebuild it "
                               "with `bayesvlm-ext index` or build_index(..., tower=)")
        built_by_adapter = index.posteriors.get("gallery", {}).get("method") == "probvlm"
        if built_by_adapter != (args.adapter is not None):
            raise CommandError(f"--index {args.index} was {'' if built_by_adapter else 'not '}built with a ProbVLM "
                               f"adapter; give it with {'--adapter' if built_by_adapter else '--posterior'}")
        gallery_posterior, query_posterior, where = _load_models(args, index.tower)
        embed_options = None
        if args.adapter is not None:  # the queries are embedded as the index's gallery was
            stored = index.posteriors.get("query") or index.posteriors.get("gallery") or {}
            embed_options = {key: stored[key] for key in DEFAULT_EMBED_OPTIONS if key in stored}
        _check_index_matches(index, gallery_posterior, query_posterior, where, embed_options)
        queries = _FeatureFile(args.queries, "--queries")
        if queries.width != query_posterior.in_features:
            raise CommandError(f"--queries: the features are [N, {queries.width}] but the "
                               f"{OTHER_TOWER[index.tower]} {'adapter' if args.adapter else 'posterior'} in {where} "
                               f"needs {'D' if args.adapter else 'P'} = {query_posterior.in_features}")
        if args.adapter is not None and queries.residual is not None:
            raise CommandError(f"--queries {args.queries}: holds a 'residual', which a ProbVLM adapter does not use")
        if args.k > len(index):
            raise CommandError(f"--k {args.k} is larger than the gallery ({len(index)} items in {args.index})")
        logit_scale = index.logit_scale if args.logit_scale is None else args.logit_scale
        if logit_scale is None:
            raise CommandError(f"--logit-scale is needed: the index {args.index} stores none")
        logit_bias = args.logit_bias if args.logit_bias is not None else (index.logit_bias or 0.0)
    except (CommandError, ValueError, OSError) as error:
        say(f"error: {error}", file=sys.stderr)
        return 1

    k, cross_shared = args.k, index.shared.get("cross_shared")
    blocks = [_block(len(index.shards), r, world) for r in range(world)]
    counts = [min(k, sum(len(index.shards[n]) for n in block)) for block in blocks]  # columns each rank returns
    try:  # rank 0 writes beside --out and renames at the end: a failure leaves the old --out and no temporary file
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(atomic_open(args.out, "w", "--out")) if rank == 0 else None
            bar = stack.enter_context(tqdm(total=len(queries), unit="query", disable=args.quiet or rank != 0,
                                           desc="retrieving"))
            for b0 in range(0, len(queries), args.batch_size):
                b1 = min(b0 + args.batch_size, len(queries))
                phi, residual = queries.read(b0, b1)
                for name, values in (("feature", phi), ("residual", residual)):
                    row = first_non_finite_row(values)  # every rank reads the same queries: all stop here alike
                    if row is not None:
                        raise CommandError(f"--queries {args.queries}: the {name} row of query {b0 + row} holds Inf "
                                           "or NaN; every query needs finite features")
                if accumulation_dtype(phi.dtype) != index.dtype:
                    phi = phi.to(index.dtype)  # queries are embedded in the index's dtype, like its cached statistics
                with torch.no_grad():
                    if embed_options is not None:
                        embedded = query_posterior.embed(phi, **embed_options)
                    else:
                        embedded = query_posterior.embed(phi, None if residual is None else residual.to(phi.dtype))
                if cross_shared is not None and embedded.form is CovarianceForm.KRON:
                    # The index's copy of this tower's B^-1 (checked to match): its cached cross_quad then applies.
                    embedded = EmbeddingDistribution(embedded.mean, embedded.form, alpha=embedded.alpha,
                                                     shared=cross_shared, shared_eigvals=embedded.shared_eigvals,
                                                     basis=embedded.basis)
                result = search(index, embedded, k, args.score, args.kappa, logit_scale=logit_scale,
                                logit_bias=logit_bias, shards=blocks[rank])
                if world > 1:
                    parts = _gather_topk(result, counts, k, rank, world)
                    result = merge_topk(parts, k, args.score, args.kappa) if rank == 0 else None
                if rank == 0:
                    values, rows, mean, var = result
                    query_ids = list(range(b0, b1)) if queries.ids is None else queries.ids[b0:b1].tolist()
                    item_ids = index.ids_of(rows)
                    for i, query_id in enumerate(query_ids):
                        out.write(json.dumps({"query": query_id, "ids": item_ids[i], "scores": values[i].tolist(),
                                              "mean": mean[i].tolist(), "variance": var[i].tolist()}) + "\n")
                bar.update(b1 - b0)
    except (CommandError, ValueError, OSError) as error:
        say(f"error: {error}", file=sys.stderr)
        return 1
    if rank != 0:
        return 0
    elapsed = time.perf_counter() - start_time
    print(f"retrieved the top {k} of {len(index)} {index.tower} items by '{args.score}' for {len(queries)} queries in "
          f"{elapsed:.1f} s ({world} process{'es' if world > 1 else ''}); wrote {args.out}")
    return 0


def _gather_topk(result, counts: list[int], k: int, rank: int, world: int):
    """Every rank's (values, rows, mean, var) [n, counts[r]] on rank 0, as merge_topk parts; None elsewhere.

    Collectives need one shape on every rank, so each result is padded to k columns; rank 0 cuts the
    padding off again by the counts, which every rank knows from the shard layout."""
    import torch.distributed as dist

    values, rows, mean, var = result
    n, mine = values.shape[0], counts[rank]
    device = collective_device(None)
    floats = torch.zeros(3, n, k, dtype=values.dtype)
    floats[:, :, :mine] = torch.stack([values, mean, var])
    indices = torch.full((n, k), -1, dtype=torch.int64)
    indices[:, :mine] = rows
    floats, indices = floats.to(device), indices.to(device)
    float_list = [torch.empty_like(floats) for _ in range(world)] if rank == 0 else None
    index_list = [torch.empty_like(indices) for _ in range(world)] if rank == 0 else None
    dist.gather(floats, float_list, dst=0)
    dist.gather(indices, index_list, dst=0)
    if rank != 0:
        return None
    return [(f[0, :, :c].cpu(), i[:, :c].cpu(), f[1, :, :c].cpu(), f[2, :, :c].cpu())
            for f, i, c in zip(float_list, index_list, counts) if c > 0]


# ---- probvlm-train ---------------------------------------------------------------------------------------

def probvlm_train_command(args: argparse.Namespace) -> int:
    try:
        tensors = _embedding_pairs(args.embeddings)
        for name, t in tensors.items():  # refused up front, naming the file's tensor and rows, before any training
            try:
                check_finite_rows(name, t)
            except ValueError as error:
                raise CommandError(f"--embeddings {args.embeddings}: {error}") from None
        weights = LossWeights(args.l1_weight, args.nll_weight, args.cross_weight)
    except (CommandError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    try:
        model, history = train_probvlm(
            tensors["image"], tensors["text"], val_image=tensors.get("val_image"), val_text=tensors.get("val_text"),
            val_fraction=args.val_fraction, hidden=args.hidden, depth=args.depth, dropout=args.dropout,
            weights=weights, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, patience=args.patience,
            seed=args.seed, checkpoint=os.path.join(args.out, "checkpoint.pt") if args.resume else None,
            progress=not args.quiet, device=device)
    except ValueError as error:  # a checkpoint of another run, too few pairs, training that diverged (non-finite)
        print(f"error: {error}", file=sys.stderr)  # nothing of the adapter is written: no half-trained model
        return 1
    model.cpu().save(args.out)
    summary = {"pairs": tensors["image"].shape[0], "dim": model.dim, "epochs": len(history.train_loss),
               "best_epoch": history.best_epoch, "stopped_early": history.stopped_early,
               "best_val_loss": history.val_loss[history.best_epoch], "seconds": history.seconds,
               "train_loss": history.train_loss, "val_loss": history.val_loss,
               "settings": {name: getattr(args, name) for name in (
                   "val_fraction", "hidden", "depth", "dropout", "epochs", "patience", "batch_size", "lr",
                   "l1_weight", "nll_weight", "cross_weight", "seed")}}
    write_json(os.path.join(args.out, "history.json"), summary, "--out")
    print(f"trained ProbVLM on {summary['pairs']} pairs (D = {model.dim}) for {summary['epochs']} epochs in "
          f"{history.seconds:.1f} s{' (stopped early)' if history.stopped_early else ''}; best validation loss "
          f"{summary['best_val_loss']:.6g} at epoch {history.best_epoch}; wrote {args.out}/")
    return 0


def _embedding_pairs(path: str) -> dict[str, torch.Tensor]:
    """"image", "text" [N, D] and optionally "val_image", "val_text" [V, D] of a safetensors file, in memory."""
    try:
        file = open_safetensors(path)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"--embeddings {path}: {error}") from None
    entries = file.entries
    floating = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if "image" not in entries or "text" not in entries:
        raise CommandError(f"--embeddings {path}: needs tensors 'image' and 'text' [N, D] (row i of each a pair), "
                           f"optional 'val_image' and 'val_text' [V, D]; found {sorted(entries)}")
    if ("val_image" in entries) != ("val_text" in entries):
        raise CommandError(f"--embeddings {path}: 'val_image' and 'val_text' go together")
    tensors = {}
    for name in ("image", "text", "val_image", "val_text"):
        if name not in entries:
            continue
        dtype, shape = entries[name][:2]
        if len(shape) != 2 or dtype not in floating or shape[0] == 0:
            raise CommandError(f"--embeddings {path}: '{name}' must be a non-empty 2-D float tensor, got {dtype} "
                               f"{shape}")
        tensors[name] = file.tensor(name).clone()
    for first, second in (("image", "text"), ("val_image", "val_text")):
        if first in tensors and tensors[first].shape != tensors[second].shape:
            raise CommandError(f"--embeddings {path}: '{first}' and '{second}' must have one shape (paired rows), got "
                               f"{tuple(tensors[first].shape)} and {tuple(tensors[second].shape)}")
    if "val_image" in tensors and tensors["val_image"].shape[1] != tensors["image"].shape[1]:
        raise CommandError(f"--embeddings {path}: 'val_image' must have D = {tensors['image'].shape[1]} like 'image'")
    return tensors


# `index` options for --adapter only (ProbVLMAdapter.embed's arguments); None when not given.
_ADAPTER_OPTIONS = {
    "--uncertainty": dict(choices=[u.value for u in Uncertainty], default=None,
                          help="with --adapter: aleatoric, epistemic (MC dropout) or total (default "
                               f"{DEFAULT_EMBED_OPTIONS['uncertainty']})"),
    "--mc-samples": dict(type=int, default=None, help="with --adapter: Monte Carlo dropout passes (default "
                                                      f"{DEFAULT_EMBED_OPTIONS['num_samples']})"),
    "--mc-seed": dict(type=int, default=None,
                      help=f"with --adapter: seed of the dropout masks (default {DEFAULT_EMBED_OPTIONS['seed']})"),
    "--mean": dict(choices=[m.value for m in MeanSource], default=None,
                   help="with --adapter: the embedding itself (input) or the adapter's mu as the mean (default "
                        f"{DEFAULT_EMBED_OPTIONS['mean']})"),
}
_EMBED_OPTION_NAMES = {"uncertainty": "uncertainty", "mc_samples": "num_samples", "mc_seed": "seed", "mean": "mean"}


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
    fit.add_argument("--resume", action="store_true", help="checkpoint to DIR/checkpoint.pt and resume from it (only "
                                                           "a checkpoint of the same pairs, model and settings)")
    fit.add_argument("--seed", type=int, default=0, help="seeds the random initialisation when there is no --pretrained")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    index = commands.add_parser("index", help="embed a gallery into a retrieval index on disk (memory-mapped shards)")
    model = index.add_mutually_exclusive_group(required=True)
    model.add_argument("--posterior", help="output directory of `bayesvlm-ext fit` (posterior_image/, posterior_text/)")
    model.add_argument("--adapter", help="output directory of `bayesvlm-ext probvlm-train` (ProbVLM, SPEC.md "
                                         "section 9); --features then holds the embeddings [M, D]")
    index.add_argument("--tower", required=True, choices=["image", "text"],
                       help="the gallery's tower; the other one is the query side")
    source = index.add_mutually_exclusive_group(required=True)
    source.add_argument("--features", help="safetensors file: features [M, P], optional ids [M] int64, residual [M, D]")
    source.add_argument("--images", help="JSONL of {\"image\": PATH} or a folder of images (with --model)")
    index.add_argument("--out", required=True, help="index directory")
    index.add_argument("--shard-rows", type=int, default=DEFAULT_SHARD_ROWS, help="gallery rows per shard file")
    index.add_argument("--batch-size", type=int, default=1024,
                       help="rows embedded at a time (images per forward pass with --images)")
    index.add_argument("--logit-scale", type=float, default=None,
                       help="log s stored as retrieve's default (with --images: the model's unless given)")
    index.add_argument("--logit-bias", type=float, default=None, help="beta stored as retrieve's default")
    index.add_argument("--model", default=None, help="open_clip model name, with --images")
    index.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint path (default: random init)")
    index.add_argument("--precision", default="fp32", help="open_clip precision, with --images")
    index.add_argument("--device", default="cpu", help="device of the model's forward with --images")
    index.add_argument("--seed", type=int, default=0,
                       help="seeds the random initialisation when there is no --pretrained")
    for option, value in _ADAPTER_OPTIONS.items():
        index.add_argument(option, **value)
    index.add_argument("--quiet", action="store_true", help="no progress bar")

    retrieve = commands.add_parser("retrieve", help="top-k of an index for query features, as JSONL")
    retrieve.add_argument("--index", required=True, help="index directory written by `bayesvlm-ext index`")
    model = retrieve.add_mutually_exclusive_group(required=True)
    model.add_argument("--posterior", help="the `fit` output directory the index was built with")
    model.add_argument("--adapter", help="the `probvlm-train` output directory the index was built with; the queries "
                                         "are embedded with the index's --uncertainty, --mc-samples, --mc-seed, --mean")
    retrieve.add_argument("--queries", required=True,
                          help="safetensors file: features [N, Q] of the other tower (embeddings [N, D] with "
                               "--adapter), optional ids [N] int64, residual [N, D]")
    retrieve.add_argument("--k", type=int, default=10, help="gallery items per query")
    retrieve.add_argument("--score", choices=[s.value for s in Score], default="mean",
                          help="ranking: logit mean, mean -/+ kappa sd, or probit match probability")
    retrieve.add_argument("--kappa", type=float, default=1.0, help="standard deviations for pessimistic/optimistic")
    retrieve.add_argument("--out", required=True, help="JSONL file: one line per query")
    retrieve.add_argument("--batch-size", type=int, default=256, help="queries per pass over the gallery")
    retrieve.add_argument("--logit-scale", type=float, default=None, help="log s (default: the index's)")
    retrieve.add_argument("--logit-bias", type=float, default=None, help="beta (default: the index's, else 0)")
    retrieve.add_argument("--quiet", action="store_true", help="no progress bar")

    train = commands.add_parser("probvlm-train", help="train the ProbVLM adapters on paired embeddings (SPEC.md "
                                                      "section 9)")
    train.add_argument("--embeddings", required=True,
                       help="safetensors file: image [N, D] and text [N, D] (row i a pair), optional val_image and "
                            "val_text [V, D]")
    train.add_argument("--out", required=True, help="output directory (ProbVLM.save, history.json)")
    train.add_argument("--val-fraction", type=float, default=0.1,
                       help="pairs held out for validation when the file has no val_image / val_text")
    train.add_argument("--hidden", type=int, default=DEFAULT_HIDDEN, help="hidden width h")
    train.add_argument("--depth", type=int, default=DEFAULT_DEPTH, help="hidden h -> h layers in the trunk")
    train.add_argument("--dropout", type=float, default=DEFAULT_DROPOUT)
    train.add_argument("--epochs", type=int, default=100, help="at most this many epochs")
    train.add_argument("--patience", type=int, default=10, help="stop after this many epochs without a better "
                                                                "validation loss")
    train.add_argument("--batch-size", type=int, default=128)
    train.add_argument("--lr", type=float, default=DEFAULT_LR, help="Adam learning rate")
    train.add_argument("--l1-weight", type=float, default=1.0, help="T1")
    train.add_argument("--nll-weight", type=float, default=1e-4, help="T2")
    train.add_argument("--cross-weight", type=float, default=1e-4, help="lambda_cross")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    train.add_argument("--resume", action="store_true", help="checkpoint to OUT/checkpoint.pt and resume from it")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "index":
        return index_command(_checked_index_args(args))
    if args.command == "retrieve":
        return retrieve_command(_checked_retrieve_args(args))
    if args.command == "probvlm-train":
        return probvlm_train_command(_checked_train_args(args))
    for name in ("class_batch_size", "batch_size"):
        if getattr(args, name) < 1:
            build_parser().error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0:
        build_parser().error(f"--workers must be at least 0 (0: load in the main process), got {args.workers}")
    if not args.pseudo_count > 0 or args.pseudo_count == float("inf"):
        build_parser().error(f"--pseudo-count must be a positive finite number, got {args.pseudo_count}")
    if not os.path.isfile(args.pairs):
        build_parser().error(f"--pairs {args.pairs}: no such file")
    _check_output_directory(build_parser(), args.out, ["summary.json", *BayesVLM.saved_files()])
    return fit_command(args)


def _checked_index_args(args: argparse.Namespace) -> argparse.Namespace:
    parser = build_parser()
    for name in ("shard_rows", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    _check_model_directory(parser, args)
    given = [option for option in _ADAPTER_OPTIONS if getattr(args, option[2:].replace("-", "_")) is not None]
    if args.adapter is None and given:
        parser.error(f"{', '.join(given)} apply to --adapter only (a posterior's embeddings have no such options)")
    if args.adapter is not None:
        for name, option in _EMBED_OPTION_NAMES.items():
            if getattr(args, name) is None:
                setattr(args, name, DEFAULT_EMBED_OPTIONS[option])
        if args.mc_samples < 2:
            parser.error(f"--mc-samples must be at least 2, got {args.mc_samples}")
    if args.features is not None and not os.path.isfile(args.features):
        parser.error(f"--features {args.features}: no such file")
    if args.images is not None:
        if not os.path.exists(args.images):
            parser.error(f"--images {args.images}: no such file or directory")
        if args.model is None:
            parser.error("--images needs --model (the open_clip model that computes the features)")
    for name in ("logit_scale", "logit_bias"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    _check_logit_scale_option(parser, args.logit_scale)
    _check_output_directory(parser, args.out, ["index.json"])
    return args


def _checked_retrieve_args(args: argparse.Namespace) -> argparse.Namespace:
    parser = build_parser()
    for name in ("k", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("kappa", "logit_scale", "logit_bias"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    _check_logit_scale_option(parser, args.logit_scale)
    if not os.path.isdir(args.index):
        parser.error(f"--index {args.index}: no such directory")
    _check_model_directory(parser, args)
    if not os.path.isfile(args.queries):
        parser.error(f"--queries {args.queries}: no such file")
    try:  # before any work: a directory, FIFO or device at --out would otherwise fail (or be replaced) at the end
        output_file(args.out, "--out", create=False)
    except ValueError as error:
        parser.error(str(error))
    return args


def _check_output_directory(parser: argparse.ArgumentParser, out: str, files: list[str]) -> None:
    """parser.error naming --out unless `out` is (or can be made) a directory and each of `files` in it (paths
    relative to it) can be replaced by a regular file: checked before any work, nothing created."""
    try:
        output_directory(out, "--out", create=False)
        for name in files:
            output_file(os.path.join(out, name), "--out", create=False)
    except ValueError as error:
        parser.error(str(error))


def _check_logit_scale_option(parser: argparse.ArgumentParser, value: float | None) -> None:
    """--logit-scale within the API's bound (s^2 finite in float32), refused here before any work is done."""
    if value is not None and value > LOGIT_SCALE_MAX:
        parser.error(f"--logit-scale (log s) must be at most {LOGIT_SCALE_MAX:g}, got {value:g}: the logit variances "
                     "carry s^2, which overflows float32 beyond that (trained models have log s <= log 100 = 4.6)")


def _check_model_directory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    option, path = ("--adapter", args.adapter) if args.adapter is not None else ("--posterior", args.posterior)
    if not os.path.isdir(path):
        parser.error(f"{option} {path}: no such directory")


def _checked_train_args(args: argparse.Namespace) -> argparse.Namespace:
    parser = build_parser()
    for name in ("hidden", "depth", "epochs", "patience", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a positive finite number, got {args.lr}")
    for name in ("l1_weight", "nll_weight", "cross_weight"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if not os.path.isfile(args.embeddings):
        parser.error(f"--embeddings {args.embeddings}: no such file")
    _check_output_directory(parser, args.out, ["history.json", PROBVLM_TENSORS, PROBVLM_CONFIG])
    return args


if __name__ == "__main__":
    sys.exit(main())
