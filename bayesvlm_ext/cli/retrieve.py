"""`bayesvlm-ext retrieve`: the top-k of an index for query features, streamed, as JSONL."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

from .._files import atomic_open, output_file
from .._validation import accumulation_dtype
from ..distributed import all_ranks, gather_topk, rank0_name
from ..covariance import CovarianceForm
from ..distribution import EmbeddingDistribution
from ..index import RetrievalIndex, first_non_finite_row, open_index, search
from ..posterior import KronPosterior
from ..probvlm import DEFAULT_EMBED_OPTIONS, ProbVLMAdapter
from ..retrieval import Score, merge_topk
from .common import (OTHER_TOWER, CommandError, check_at_least_one, check_logit_scale_option, check_model_directory,
                     load_models)
from .distributed import block, run_distributed
from .inputs import FeatureFile

def add_parser(commands) -> argparse.ArgumentParser:
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
    retrieve.add_argument("--projected", action="store_true",
                          help="the \"projected\" logit variance (SPEC.md section 4) instead of the published one; "
                               "fastest on an index built with --projected")
    retrieve.add_argument("--candidates", type=int, default=None,
                          help="approximate search on an index built with --ann: items proposed per query and shard "
                               "by its FAISS structure, then scored exactly (at least --k; default: exact search)")
    retrieve.add_argument("--nprobe", type=int, default=None,
                          help="with --candidates, IVF structures: lists scanned per query (default: the index's)")
    retrieve.add_argument("--ef-search", type=int, default=None,
                          help="with --candidates, HNSW: search breadth (default: max(--candidates, the index's))")
    retrieve.add_argument("--out", required=True, help="JSONL file: one line per query")
    retrieve.add_argument("--batch-size", type=int, default=256, help="queries per pass over the gallery")
    retrieve.add_argument("--logit-scale", type=float, default=None, help="log s (default: the index's)")
    retrieve.add_argument("--logit-bias", type=float, default=None, help="beta (default: the index's, else 0)")
    retrieve.add_argument("--quiet", action="store_true", help="no progress bar")

    return retrieve


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    return retrieve_command(checked_args(args, parser))


def checked_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options checked before any work (parser.error: exit 2, naming the option)."""
    check_at_least_one(parser, args, ("k", "batch_size"))
    if args.candidates is None and (args.nprobe is not None or args.ef_search is not None):
        parser.error("--nprobe and --ef-search tune the approximate search: give --candidates too")
    for name in ("candidates", "nprobe", "ef_search"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.candidates is not None and args.candidates < args.k:
        parser.error(f"--candidates {args.candidates} must be at least --k {args.k}")
    for name in ("kappa", "logit_scale", "logit_bias"):
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    check_logit_scale_option(parser, args.logit_scale)
    if not os.path.isdir(args.index):
        parser.error(f"--index {args.index}: no such directory")
    check_model_directory(parser, args)
    if not os.path.isfile(args.queries):
        parser.error(f"--queries {args.queries}: no such file")
    try:  # before any work: a directory, FIFO or device at --out would otherwise fail (or be replaced) at the end
        output_file(args.out, "--out", create=False)
    except ValueError as error:
        parser.error(str(error))
    return args


def retrieve_command(args: argparse.Namespace) -> int:
    return run_distributed(_retrieve, args, torch.device("cpu"))


def _retrieve(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    from tqdm.auto import tqdm

    say = print if rank == 0 else (lambda *a, **k: None)
    start_time = time.perf_counter()
    try:  # every rank reads the same inputs, so every rank fails here alike
        index = _open_one_generation(args.index)  # a snapshot: later rewrites do not change it
        if index.tower is None:
            raise CommandError(f"--index {args.index} names no tower (built in Python without tower=); rebuild it "
                               "with `bayesvlm-ext index` or build_index(..., tower=)")
        built_by_adapter = index.posteriors.get("gallery", {}).get("method") == "probvlm"
        if built_by_adapter != (args.adapter is not None):
            raise CommandError(f"--index {args.index} was {'' if built_by_adapter else 'not '}built with a ProbVLM "
                               f"adapter; give it with {'--adapter' if built_by_adapter else '--posterior'}")
        gallery_posterior, query_posterior, where = load_models(args, index.tower)
        # The queries are embedded with the options the index recorded for its gallery (none for a posterior).
        stored = index.posteriors.get("query") or index.posteriors.get("gallery") or {}
        embed_options = query_posterior.embed_options(
            {key: stored[key] for key in DEFAULT_EMBED_OPTIONS if key in stored} if args.adapter else None)
        _check_index_matches(index, gallery_posterior, query_posterior, where, embed_options)
        queries = FeatureFile(args.queries, "--queries")
        if queries.width != query_posterior.in_features:
            raise CommandError(f"--queries: the features are [N, {queries.width}] but the "
                               f"{OTHER_TOWER[index.tower]} {'adapter' if args.adapter else 'posterior'} in {where} "
                               f"needs {'D' if args.adapter else 'P'} = {query_posterior.in_features}")
        if args.adapter is not None and queries.residual is not None:
            raise CommandError(f"--queries {args.queries}: holds a 'residual', which a ProbVLM adapter does not use")
        if args.candidates is not None and index.ann is None:
            raise CommandError(f"--candidates needs an index built with `index --ann`; {args.index} has no ANN "
                               "structure (drop --candidates for the exact search)")
        if args.candidates is not None and index.ann.kind == "hnsw" and args.nprobe is not None:
            raise CommandError(f"--nprobe applies to IVF structures; {args.index} has 'hnsw' (use --ef-search)")
        if args.candidates is not None and index.ann.kind != "hnsw" and args.ef_search is not None:
            raise CommandError(f"--ef-search applies to HNSW; {args.index} has '{index.ann.kind}' (use --nprobe)")
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
    blocks = [block(len(index.shards), r, world) for r in range(world)]
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
                    embedded = query_posterior.embed(phi, residual=None if residual is None else residual.to(phi.dtype),
                                                     **embed_options)
                if cross_shared is not None and embedded.form is CovarianceForm.KRON:
                    # The index's copy of this tower's B^-1 (checked to match): its cached cross_quad then applies.
                    embedded = EmbeddingDistribution(embedded.mean, embedded.covariance.replace(shared=cross_shared))
                result = search(index, embedded, k, args.score, args.kappa, logit_scale=logit_scale,
                                logit_bias=logit_bias, shards=blocks[rank],
                                variant="projected" if args.projected else None, candidates=args.candidates,
                                nprobe=args.nprobe, ef_search=args.ef_search)
                if world > 1:
                    parts = gather_topk(result, counts, k)
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


def _open_one_generation(directory: str) -> RetrievalIndex:
    """open_index on every rank, all of the same generation: a rewrite that switches index.json between the
    ranks' opens would otherwise have them search (and merge) two different galleries."""
    for _ in range(3):
        index = open_index(directory)
        mine = index.generation or ""  # "" for a version 1 index
        if all_ranks(rank0_name(mine) == mine):
            return index
    raise CommandError(f"--index {directory} was rewritten while the ranks opened it, three times; run again")


def _matches(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same matrix up to the last bits (another machine's eigendecomposition), not merely a similar one."""
    rtol = 1e-10 if a.dtype == torch.float64 else 1e-5
    return a.shape == b.shape and float((a - b.to(a.dtype)).abs().max()) <= rtol * float(a.abs().max())


def _check_index_matches(index: RetrievalIndex, gallery: KronPosterior | ProbVLMAdapter,
                         query: KronPosterior | ProbVLMAdapter, where: str, embed_options: dict | None = None) -> None:
    """Raises CommandError unless `index` was built from these posteriors (sizes, hyper-parameters, matrices)
    or these ProbVLM adapters (configuration, fingerprint of the parameters, embed options): summaries first,
    then the covariance form and shared matrices an empty embedding of the gallery model gives."""
    kind = gallery.KIND
    if index.dim != gallery.out_features:
        raise CommandError(f"--index {index.directory} has D = {index.dim}; the {kind}s in {where} have D = "
                           f"{gallery.out_features}")
    for side, posterior in (("gallery", gallery), ("query", query)):
        stored, given = index.posteriors.get(side), posterior.summary(embed_options)
        if stored is not None and stored != given:
            differing = sorted(key for key in given if stored.get(key) != given[key])
            raise CommandError(f"--index {index.directory} was built with another {side} {kind} than the one in "
                               f"{where} (differs in {', '.join(differing)})")
    template = gallery.embed(torch.zeros(0, gallery.in_features, dtype=index.dtype), against=query, **embed_options)
    if template.form is not index.form:
        raise CommandError(f"--index {index.directory} holds '{index.form.value}'-form items; the {index.tower} "
                           f"{kind} in {where} gives '{template.form.value}'")
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
