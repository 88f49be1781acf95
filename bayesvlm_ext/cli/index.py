"""`bayesvlm-ext index`: a gallery embedded with one tower's posterior (or ProbVLM adapter) into an on-disk,
memory-mapped index (bayesvlm_ext.index), written as a new generation and switched over atomically."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from .._validation import accumulation_dtype
from ..distributed import all_ranks, rank0_name
from ..index import DEFAULT_SHARD_ROWS, IndexWriter, first_non_finite_row, new_generation
from ..index.ann import ANN_KINDS, AnnSpec, faiss_module
from ..probvlm import DEFAULT_EMBED_OPTIONS, MeanSource, Uncertainty
from .common import (CommandError, check_at_least_one, check_logit_scale_option, check_model_directory,
                     check_output_directory, load_models)
from .distributed import block, run_distributed
from .inputs import FeatureFile, ImageFeatures

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


# `index` options for --ann only (AnnSpec's fields); None when not given.
_ANN_OPTIONS = {
    "--ann-nlist": "with --ann ivf-*: IVF lists per shard (default 4 sqrt(rows), at most rows / 39)",
    "--ann-nprobe": "with --ann ivf-*: lists scanned per query, retrieve's default (default 32)",
    "--ann-pq-m": "with --ann ivf-pq: sub-quantisers, a divisor of D (default the largest divisor <= D / 8)",
    "--ann-hnsw-m": "with --ann hnsw: links per item (default 32)",
    "--ann-train-rows": "with --ann ivf-*: training sample per shard (default 65536)",
}

_EMBED_OPTION_NAMES = {"uncertainty": "uncertainty", "mc_samples": "num_samples", "mc_seed": "seed", "mean": "mean"}


def add_parser(commands) -> argparse.ArgumentParser:
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
    index.add_argument("--projected", action="store_true",
                       help="also store each item's statistics of the \"projected\" variance (D more floats per item), "
                            "so that `retrieve --projected` does not recompute them per call")
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
    index.add_argument("--ann", choices=ANN_KINDS, default=None,
                       help="also build a FAISS structure per shard, for `retrieve --candidates` (approximate "
                            "candidates, exact scores; needs faiss-cpu)")
    for option, help_text in _ANN_OPTIONS.items():
        index.add_argument(option, type=int, default=None, help=help_text)
    index.add_argument("--quiet", action="store_true", help="no progress bar")

    return index


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return index_command(checked_args(args, parser))


def checked_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options checked before any work (parser.error: exit 2, naming the option)."""
    check_at_least_one(parser, args, ("shard_rows", "batch_size"))
    check_model_directory(parser, args)
    given = [option for option in _ADAPTER_OPTIONS if getattr(args, option[2:].replace("-", "_")) is not None]
    if args.adapter is None and given:
        parser.error(f"{', '.join(given)} apply to --adapter only (a posterior's embeddings have no such options)")
    if args.adapter is not None:
        for name, option in _EMBED_OPTION_NAMES.items():
            if getattr(args, name) is None:
                setattr(args, name, DEFAULT_EMBED_OPTIONS[option])
        if args.mc_samples < 2:
            parser.error(f"--mc-samples must be at least 2, got {args.mc_samples}")
    given = [option for option in _ANN_OPTIONS if getattr(args, option[2:].replace("-", "_")) is not None]
    if args.ann is None and given:
        parser.error(f"{', '.join(given)} apply to --ann only")
    args.ann_spec = None
    if args.ann is not None:
        options = {option[6:].replace("-", "_"): getattr(args, option[2:].replace("-", "_")) for option in given}
        try:
            args.ann_spec = AnnSpec(args.ann, **options)
            faiss_module()
        except (ValueError, ImportError) as error:
            parser.error(f"--ann {args.ann}: {error}")
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
    check_logit_scale_option(parser, args.logit_scale)
    check_output_directory(parser, args.out, ["index.json"])
    return args


def index_command(args: argparse.Namespace) -> int:
    return run_distributed(_index, args, torch.device(args.device))


def _index(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    from tqdm.auto import tqdm

    say = print if rank == 0 else (lambda *a, **k: None)
    start_time = time.perf_counter()
    generation = _shared_generation(rank)  # every rank writes its shards into this one new folder
    try:  # every rank reads the same inputs, so every rank fails here alike
        gallery_posterior, query_posterior, where = load_models(args, args.tower)
        embed_options = None
        if args.adapter is not None:
            embed_options = {option: getattr(args, name) for name, option in _EMBED_OPTION_NAMES.items()}
        if args.features is not None:
            source = FeatureFile(args.features, "--features")
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
            source = ImageFeatures(args, device, say)
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
        if isinstance(source, FeatureFile):
            dtype = accumulation_dtype(source.features.dtype)
        writer = IndexWriter.for_posteriors(args.out, gallery_posterior, query_posterior, len(source), dtype,
                                            embed_options, shard_rows=args.shard_rows, ids=ids, tower=args.tower,
                                            logit_scale=logit_scale, logit_bias=logit_bias, generation=generation,
                                            projected=args.projected, ann=args.ann_spec)
    except (CommandError, ValueError, OSError) as error:
        say(f"error: {error}", file=sys.stderr)
        return 1
    # The shards go to a new generation folder; the index already at --out serves until rank 0's `finish`
    # switches index.json over, and every failure path below removes the new folder (writer.abort).
    mine = block(writer.num_shards, rank, world)
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
    if not all_ranks(failure is None):  # collective: after it no rank writes into the generation any more
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


def _shared_generation(rank: int) -> str:
    """A new index generation name (index.new_generation), picked by rank 0 and sent to every rank."""
    return rank0_name(new_generation() if rank == 0 else "")
