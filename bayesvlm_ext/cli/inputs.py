"""The commands' input readers: image-caption pairs and image lists from JSONL (one bad line is counted,
reported with its number and skipped), and memory-mapped feature files."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import warnings
from collections import Counter
from typing import NamedTuple

import torch

from ..distributed import distributed_rank, merged_over_ranks
from ..storage import open_safetensors
from .common import IMAGE_SUFFIXES, CommandError

class LineProblem(Exception):
    """Why one line (or image) of an input list gives no item: `reason` keys the skip counts, str() says what."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkippedItem(NamedTuple):
    """A dataset item standing for a pair whose image or caption failed when loaded (picklable for workers)."""

    line: int
    reason: str
    message: str


def json_lines(path: str, digest=None):
    """(line number, dict or LineProblem) for each non-blank line of a JSONL file.

    Read as bytes and decoded line by line, so a line that is not UTF-8 is one skipped line rather than a
    UnicodeDecodeError that ends the run; `digest` (a hashlib object) sees every byte of the file."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if digest is not None:
                digest.update(raw)
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # editors may start a file with a BOM
            except UnicodeDecodeError as error:
                yield number, LineProblem("not UTF-8", f"not UTF-8 text (byte {raw[error.start]:#04x} at column "
                                                        f"{error.start + 1})")
                continue
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except (ValueError, RecursionError) as error:  # RecursionError: absurdly nested brackets
                detail = f"{error.msg} at column {error.colno}" if isinstance(error, json.JSONDecodeError) else \
                    type(error).__name__
                yield number, LineProblem("malformed line", f"not JSON ({detail})")
                continue
            if not isinstance(record, dict):
                yield number, LineProblem("malformed line", f"not a JSON object (got {_json_text(record)})")
                continue
            yield number, record


def _json_text(value, limit: int = 40) -> str:
    """`value` as JSON wrote it (5, null, [1]), cut to `limit` characters, for messages about input lines."""
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _string_field(record: dict, key: str, empty_reason: str, empty_message: str) -> str:
    """record[key], a non-blank string; LineProblem naming what is wrong otherwise (counted by reason)."""
    if key not in record:
        raise LineProblem("malformed line", f'no "{key}" key')
    value = record[key]
    if not isinstance(value, str):
        raise LineProblem("malformed line", f"{key} is not a string (got {_json_text(value)})")
    if not value.strip():
        raise LineProblem(empty_reason, empty_message)
    return value


def _listed_image(record: dict, folder: str) -> str:
    """The image path a JSONL record names, relative paths taken from `folder`; LineProblem when it names none."""
    image = _string_field(record, "image", "malformed line", "image is an empty string")
    return image if os.path.isabs(image) else os.path.join(folder, image)


def decoded_rgb(path: str):
    """The image at `path` fully decoded (a truncated file fails here, not later) and converted to RGB.

    Pillow's decompression-bomb limit (Image.MAX_IMAGE_PIXELS) holds: above twice the limit Image.open raises
    DecompressionBombError, and its warning between once and twice the limit is turned into an error too, so
    such an image is skipped rather than decoded into gigabytes."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            return img.convert("RGB")


def failure(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 200 else text[:197] + "..."


class PairsDataset(torch.utils.data.Dataset):
    """Image-caption pairs from a JSONL file; an item is (pixels [3, H, W], tokens [L]), or a `SkippedItem`
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
        for number, record in json_lines(path, digest):
            try:
                if isinstance(record, LineProblem):
                    raise record
                image = _listed_image(record, folder)
                caption = _string_field(record, "caption", "empty caption", "the caption is empty")
                if not os.path.isfile(image):
                    raise LineProblem("missing image", f"image {image}: no such file")
            except LineProblem as problem:
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
            pixels = self.preprocess(decoded_rgb(image))
        except Exception as error:  # whatever one image does (bomb, truncation, preprocess), it costs only its pair
            return SkippedItem(self.lines[index], "unreadable image", f"image {image}: cannot be read "
                                                                       f"({failure(error)})")
        try:
            tokens = self.tokenizer([caption])[0]
        except Exception as error:
            return SkippedItem(self.lines[index], "unusable caption", f"caption cannot be tokenised "
                                                                       f"({failure(error)})")
        return pixels, tokens


class SkippingLoader:
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
                if isinstance(item, SkippedItem):
                    self.counter[item.reason] += 1
                    self.report(f"line {item.line}: {item.message}; skipped")
                else:
                    good.append(item)
            if good:
                yield torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good])


class FeatureFile:
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


class ImageFeatures:
    """The features entering the image projection of an open_clip model, computed on demand for rows of an
    image list: a JSONL of {"image": PATH} (relative paths from the file's folder) or a folder of images.

    Rows are the usable images in list order. Shards are laid out by row ranges before any is read, so a
    first pass decides which images are usable: every listed image is decoded once (under Pillow's
    decompression-bomb limit); malformed lines, missing and undecodable images are counted in `skipped`,
    reported with their line number and left out. Under torch.distributed the ranks share that pass and
    agree on its result. An image that passed it but fails while its shard is read is an error."""

    def __init__(self, args: argparse.Namespace, device: torch.device, say):
        import open_clip

        from ..capture import find_projection
        from ..fit import unnormalised_encoder

        def report(message: str) -> None:
            say(f"--images {args.images}: {message}", file=sys.stderr)

        paths, ids, places, self.skipped = image_list(args.images, report)
        listed = len(paths) + sum(self.skipped.values())
        problems = unusable_images(paths)
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
        from ..capture import capture

        features, residuals = [], []
        for b0 in range(start, stop, self.batch_size):
            pixels = []
            for row in range(b0, min(b0 + self.batch_size, stop)):
                try:
                    pixels.append(self.preprocess(decoded_rgb(self.paths[row])))
                except Exception as error:  # the rows are laid out: skipping one now would shift every later id
                    raise CommandError(f"--images {self.source}: {self.places[row]}: cannot be read or preprocessed "
                                       f"although the first pass decoded it ({failure(error)})") from None
            with torch.no_grad():
                captured = capture(self.encode, torch.stack(pixels).to(self.device), self.site)
            features.append(captured.features.float().cpu())
            if captured.residual is not None:
                residuals.append(captured.residual.float().cpu())
        return torch.cat(features), torch.cat(residuals) if residuals else None


def image_list(source: str, report) -> tuple[list[str], list[str], list[str], Counter]:
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
    for number, record in json_lines(source):
        try:
            if isinstance(record, LineProblem):
                raise record
            path = _listed_image(record, folder)
        except LineProblem as problem:
            skipped[problem.reason] += 1
            report(f"line {number}: {problem}; skipped")
            continue
        paths.append(path)
        ids.append(record["image"])
        places.append(f"line {number}: image {path}")
    if not paths and not skipped:
        raise CommandError(f"--images {source}: no images listed")
    return paths, ids, places, skipped


def unusable_images(paths: list[str]) -> dict[int, tuple[str, str]]:
    """{position: (reason, message)} of the images in `paths` that are missing or fail to decode fully
    (not an image, truncated, over Pillow's decompression-bomb limit).

    Under torch.distributed each rank decodes every K-th image and the findings are gathered, so every rank
    holds the same answer (and lays out the same rows) for 1/K of the decoding."""
    rank, world = distributed_rank()
    problems = {}
    for i in range(rank, len(paths), world):
        if not os.path.isfile(paths[i]):
            problems[i] = ("missing image", "no such file")
            continue
        try:
            decoded_rgb(paths[i])
        except Exception as error:  # whatever one image does, it costs only its row
            problems[i] = ("unreadable image", f"cannot be read ({failure(error)})")
    return merged_over_ranks(problems)
