"""`bayesvlm-ext probvlm-train`: the ProbVLM adapters (SPEC.md section 9) trained on paired embeddings."""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .._files import write_json
from .._validation import check_finite_rows
from ..storage import open_safetensors
from ..probvlm import DEFAULT_DEPTH, DEFAULT_DROPOUT, DEFAULT_HIDDEN, DEFAULT_LR, LossWeights, train_probvlm
from ..probvlm import CONFIG_FILE as PROBVLM_CONFIG
from ..probvlm import TENSORS_FILE as PROBVLM_TENSORS
from .common import CommandError, check_at_least_one, check_output_directory

def add_parser(commands) -> argparse.ArgumentParser:
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
    return train


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return probvlm_train_command(checked_args(args, parser))


def checked_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options checked before any work (parser.error: exit 2, naming the option)."""
    check_at_least_one(parser, args, ("hidden", "depth", "epochs", "patience", "batch_size"))
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
    check_output_directory(parser, args.out, ["history.json", PROBVLM_TENSORS, PROBVLM_CONFIG])
    return args


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
