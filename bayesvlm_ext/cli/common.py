"""What every command shares: the user-error type, the tower names and the checks of options made before
any work."""

from __future__ import annotations

import argparse
import os


from .._files import output_directory, output_file
from .._validation import LOGIT_SCALE_MAX
from ..posterior import KronPosterior
from ..probvlm import ProbVLM

OTHER_TOWER = {"image": "text", "text": "image"}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class CommandError(Exception):
    """A user error found by a command: printed as "error: ..." and exit status 1."""


def check_at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """parser.error naming the first of the int options `names` (attribute names) that is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")


def check_output_directory(parser: argparse.ArgumentParser, out: str, files: list[str]) -> None:
    """parser.error naming --out unless `out` is (or can be made) a directory and each of `files` in it (paths
    relative to it) can be replaced by a regular file: checked before any work, nothing created."""
    try:
        output_directory(out, "--out", create=False)
        for name in files:
            output_file(os.path.join(out, name), "--out", create=False)
    except ValueError as error:
        parser.error(str(error))


def check_logit_scale_option(parser: argparse.ArgumentParser, value: float | None) -> None:
    """--logit-scale within the API's bound (s^2 finite in float32), refused here before any work is done."""
    if value is not None and value > LOGIT_SCALE_MAX:
        parser.error(f"--logit-scale (log s) must be at most {LOGIT_SCALE_MAX:g}, got {value:g}: the logit variances "
                     "carry s^2, which overflows float32 beyond that (trained models have log s <= log 100 = 4.6)")


def check_model_directory(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    option, path = ("--adapter", args.adapter) if args.adapter is not None else ("--posterior", args.posterior)
    if not os.path.isdir(path):
        parser.error(f"{option} {path}: no such directory")


def load_posteriors(directory: str, gallery_tower: str) -> tuple[KronPosterior, KronPosterior]:
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


def load_models(args: argparse.Namespace, gallery_tower: str):
    """(gallery tower's model, the other tower's, the directory they came from): KronPosteriors from
    --posterior or ProbVLM adapters from --adapter."""
    if args.adapter is None:
        return (*load_posteriors(args.posterior, gallery_tower), args.posterior)
    try:
        model = ProbVLM.load(args.adapter)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"--adapter {args.adapter}: {error}") from None
    return model.adapter(gallery_tower), model.adapter(OTHER_TOWER[gallery_tower]), args.adapter
