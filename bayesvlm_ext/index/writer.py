"""Writing a retrieval index: shard by shard, into a new generation, switched over atomically by `finish`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Sequence

import torch
from torch import Tensor

from .._files import output_directory, replacing, sync_folder, write_json
from .._validation import accumulation_dtype, check_tensor
from ..distribution import EmbeddingDistribution
from ..posterior import KronPosterior
from ..probvlm import ProbVLMAdapter
from ..storage import save_aligned
from .ann import AnnSpec, ann_vectors, build as build_ann, faiss_module
from .layout import (DEFAULT_SHARD_ROWS, DTYPE_NAMES, FORMAT, GENERATION_PATTERN, IDS_JSON_FILE, IDS_TENSOR_FILE,
                     LOCK_FILE, MANIFEST_FILE, PROJECTION_TENSORS, SHARED_FILE, VERSION, first_non_finite_row,
                     ann_file_name, new_generation, published_generation, shard_file_name, shard_ranges)
from .reader import RetrievalIndex, open_index

class IndexWriter:
    """Writes an index shard by shard; the shards may be written by different processes, `finish` once.

    `template`: an EmbeddingDistribution of any length (zero rows is fine) carrying what every item of
    the gallery shares: its form, D, dtype (float32 or float64) and shared matrices, and `cross_shared`
    (the query side's matrix) when the gallery caches cross_quad. `IndexWriter.for_posteriors` builds it
    from the two towers' posteriors.

    The files go to a new generation folder `directory/generation` (default: `new_generation()`); the index
    at `directory`, if any, keeps serving until `finish` switches index.json over. Processes writing one
    index together must pass the same `generation` (one of them picks it and sends it to the others).
    After a failure, `abort` removes the new folder.
    """

    def __init__(self, directory: str | os.PathLike, template: EmbeddingDistribution, rows: int, *,
                 shard_rows: int = DEFAULT_SHARD_ROWS, ids: Tensor | Sequence | None = None, tower: str | None = None,
                 logit_scale: float | None = None, logit_bias: float | None = None, posteriors: dict | None = None,
                 generation: str | None = None, projected: bool = False, ann: AnnSpec | str | dict | None = None):
        if generation is None:
            generation = new_generation()
        if not isinstance(generation, str) or not GENERATION_PATTERN.fullmatch(generation):
            raise ValueError(f"argument 'generation' must be a folder name like 'gen-123-abc' (new_generation()), got "
                             f"{generation!r}")
        if not isinstance(template, EmbeddingDistribution):
            raise ValueError(f"argument 'template' must be an EmbeddingDistribution, got {type(template).__name__}")
        if template.mean.dtype not in DTYPE_NAMES:
            raise ValueError(f"argument 'template' must have float32 or float64 means, got {template.mean.dtype}")
        if tower is not None and tower not in ("image", "text"):
            raise ValueError(f"argument 'tower' must be 'image', 'text' or None, got {tower!r}")
        self.ranges = shard_ranges(rows, shard_rows)
        self.directory, self.rows, self.shard_rows = os.fspath(directory), rows, shard_rows
        self.form, self.dim, self.dtype = template.form, template.dim, template.mean.dtype
        # A kron template without its eigenbasis gets it computed here: the index stores every shared tensor.
        self.shared = {name: _cpu(t, self.dtype) for name, t in template.covariance.shared_tensors().items()}
        self.cross_shared = _cpu(template.cross_shared, self.dtype)
        if self.cross_shared is not None:
            self.shared["cross_shared"] = self.cross_shared
        self.ids_kind, self.ids = _check_ids(ids, rows)
        self.tower = tower
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.posteriors = posteriors or {}
        if not isinstance(projected, bool):
            raise ValueError(f"argument 'projected' must be True or False, got {projected!r}")
        self.projected = projected  # store each item's projection statistics (the "projected" variance)
        self.ann = AnnSpec.parse(ann)  # a FAISS structure per shard (index.ann)
        if self.ann is not None:
            faiss_module()  # a missing FAISS fails here, before any work
        self.directory = output_directory(self.directory, "argument 'directory'")
        self.generation = generation
        self.folder = os.path.join(self.directory, generation)  # created by the first write

    @classmethod
    def for_posteriors(
        cls,
        directory: str | os.PathLike,
        gallery_posterior: KronPosterior | ProbVLMAdapter,  # the gallery tower's posterior or ProbVLM adapter
        query_posterior: KronPosterior | ProbVLMAdapter | None,  # the other tower (a posterior's B^-1 is cached
        rows: int,                                               # as cross_quad; an adapter's is recorded)
        dtype: torch.dtype = torch.float32,  # of the stored statistics: accumulation dtype of the features
        embed_options: dict | None = None,  # ProbVLMAdapter.embed's uncertainty, num_samples, seed, mean
        **kwargs,
    ) -> "IndexWriter":
        """A writer for the gallery `gallery_posterior.embed(phi, against=query_posterior)` (SPEC.md section 3),
        or, for ProbVLM (SPEC.md section 9), `gallery_posterior.embed(phi, **embed_options)` of diag form."""
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"argument 'dtype' must be torch.float32 or torch.float64, got {dtype}")
        embed, posteriors = _embedder(gallery_posterior, query_posterior, embed_options)
        template = embed(torch.zeros(0, gallery_posterior.in_features, dtype=dtype, device=gallery_posterior.device),
                         None)
        writer = cls(directory, template, rows, posteriors=posteriors, **kwargs)
        writer._embed = embed
        return writer

    @property
    def num_shards(self) -> int:
        return len(self.ranges)

    def shard_range(self, number: int) -> tuple[int, int]:
        """(start, stop): the gallery rows of shard `number`."""
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < self.num_shards:
            raise ValueError(f"argument 'number' must be a shard number in [0, {self.num_shards}), got {number!r}")
        return self.ranges[number]

    def embed_shard(
        self,
        number: int,
        phi: Tensor,  # [m, P] features of the shard's rows, m = stop - start
        residual: Tensor | None = None,  # [m, D] fixed residual (SigLIP image tower)
        batch_size: int | None = None,  # rows per embed call, counted from the shard's first row (default: all)
    ) -> None:
        """Embeds the shard's features with the writer's posteriors and writes the shard file."""
        embed = getattr(self, "_embed", None)
        if embed is None:
            raise ValueError("embed_shard needs a writer made by IndexWriter.for_posteriors; use write()")
        start, stop = self.shard_range(number)
        check_tensor("phi", phi, dim=2)
        if phi.shape[0] != stop - start:
            raise ValueError(f"argument 'phi' must have {stop - start} rows (shard {number} is rows [{start}, "
                             f"{stop})), got {phi.shape[0]}")
        if accumulation_dtype(phi.dtype) != self.dtype:
            raise ValueError(f"argument 'phi' must be embedded in {self.dtype} like the index (float64 features "
                             f"for a float64 index, any other float dtype for float32), got {phi.dtype}")
        if batch_size is None:
            batch_size = max(phi.shape[0], 1)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"argument 'batch_size' must be an int >= 1, got {batch_size!r}")
        parts = []
        with torch.no_grad():
            for b0 in range(0, phi.shape[0], batch_size):
                part_residual = None if residual is None else residual[b0:b0 + batch_size]
                for name, value in (("phi", phi[b0:b0 + batch_size]), ("residual", part_residual)):
                    row = first_non_finite_row(value)  # named by gallery row: the embed error would not say which
                    if row is not None:
                        raise ValueError(f"argument '{name}' must be finite: gallery row {start + b0 + row} (shard "
                                         f"{number}) holds Inf or NaN")
                parts.append(embed(phi[b0:b0 + batch_size], part_residual))
        self.write(number, parts[0] if len(parts) == 1 else EmbeddingDistribution.cat(parts))

    def write(self, number: int, part: EmbeddingDistribution) -> None:
        """Writes shard `number` from its rows' distribution (statistics not cached on `part` are computed)."""
        start, stop = self.shard_range(number)
        if not isinstance(part, EmbeddingDistribution):
            raise ValueError(f"argument 'part' must be an EmbeddingDistribution, got {type(part).__name__}")
        if len(part) != stop - start or part.dim != self.dim or part.form is not self.form:
            raise ValueError(f"argument 'part' must be {stop - start} '{self.form.value}'-form items of D = {self.dim} "
                             f"(shard {number}), got {len(part)} '{part.form.value}'-form items of D = {part.dim}")
        if part.mean.dtype != self.dtype:
            raise ValueError(f"argument 'part' must have {self.dtype} means like the index, got {part.mean.dtype}")
        for name, stored in self.shared.items():
            given = part.cross_shared if name == "cross_shared" else getattr(part.covariance, name)
            if name in ("shared_eigvals", "basis") and given is None:
                continue  # a kron part without its eigenbasis: the index keeps the template's
            if given is None or not torch.equal(_cpu(given, self.dtype), stored):
                raise ValueError(f"argument 'part' must share the index's '{name}' matrix; it belongs to another "
                                 "posterior or was cached against another query side")
        if part.sq_norm is None or (self.cross_shared is not None and part.cross_quad is None):
            part = part.precompute(against=self.cross_shared)
        if self.projected and part.projection is None:
            part = part.with_projection()  # the statistics the embedding op cached stay as they are
        tensors = {"mean": part.mean, **part.covariance.per_item_tensors(), "sq_norm": part.sq_norm}
        if self.cross_shared is not None:
            tensors["cross_quad"] = part.cross_quad
        if self.projected:
            tensors.update(zip(PROJECTION_TENSORS, part.projection))
        tensors = {name: _cpu(t, self.dtype) for name, t in tensors.items()}
        tensors["row"] = torch.arange(start, stop, dtype=torch.int64)
        os.makedirs(self.folder, exist_ok=True)
        save_aligned(tensors, os.path.join(self.folder, shard_file_name(number)))
        if self.ann is not None:
            structure = build_ann(ann_vectors(part), self.ann, number)
            with replacing(os.path.join(self.folder, ann_file_name(number)), f"index {self.directory}") as temporary:
                faiss_module().write_index(structure, temporary)

    def finish(self) -> None:
        """Writes shared.safetensors and the ids into the generation, then switches the index over to it.

        Once every shard exists: the generation's files are flushed to disk, index.json naming the generation
        replaces the old one in one atomic rename, and the generations older than the replaced one are
        removed (it is kept a round for readers that have read the old index.json but not yet opened its
        files). Concurrent writers' switches are serialised by a lock file; a generation that a concurrent
        writer's clean-up removed is an error here, never an index.json naming missing files.
        """
        files = [shard_file_name(n) for n in range(self.num_shards)]
        if self.ann is not None:
            files += [ann_file_name(n) for n in range(self.num_shards)]
        missing = [name for name in files if not os.path.isfile(os.path.join(self.folder, name))]
        if missing:
            raise ValueError(f"index {self.directory}: {len(missing)} shard(s) not written yet, e.g. {missing[0]}")
        if self.shared:
            files.append(SHARED_FILE)
            save_aligned(self.shared, os.path.join(self.folder, SHARED_FILE))
        if self.ids_kind == "int":
            files.append(IDS_TENSOR_FILE)
            save_aligned({"ids": self.ids}, os.path.join(self.folder, IDS_TENSOR_FILE))
        elif self.ids_kind == "str":
            files.append(IDS_JSON_FILE)
            write_json(os.path.join(self.folder, IDS_JSON_FILE), self.ids, f"index {self.directory}", indent=1)
        sync_folder(self.folder)  # the renames into it reach the disk before index.json points at it
        manifest = {"format": FORMAT, "version": VERSION, "generation": self.generation, "rows": self.rows,
                    "dim": self.dim, "form": self.form.value, "dtype": DTYPE_NAMES[self.dtype], "tower": self.tower,
                    "shard_rows": self.shard_rows, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias,
                    "ids": self.ids_kind, "cross_quad": self.cross_shared is not None, "posteriors": self.posteriors,
                    "projection": self.projected, "ann": None if self.ann is None else self.ann.to_dict(),
                    "shards": [{"file": shard_file_name(n), "start": start, "stop": stop}
                               for n, (start, stop) in enumerate(self.ranges)]}
        with _switch_lock(self.directory):
            previous = published_generation(self.directory)
            gone = [name for name in files if not os.path.isfile(os.path.join(self.folder, name))]
            if gone:
                raise ValueError(f"index {self.directory}: generation {self.generation} lost {gone[0]} while being "
                                 "written (another `index` run into the same directory removed it?); the index "
                                 "was not changed")
            write_json(os.path.join(self.directory, MANIFEST_FILE), manifest, f"index {self.directory}", indent=1)
            _remove_older_generations(self.directory, previous, self.generation)

    def abort(self) -> None:
        """Removes this writer's generation folder after a failure; the index in the directory is untouched.
        Safe to call from every process, and when nothing was written."""
        if published_generation(self.directory) != self.generation:  # never the generation being served
            shutil.rmtree(self.folder, ignore_errors=True)


def _embedder(gallery, query, embed_options):
    """(embed(phi, residual) -> EmbeddingDistribution, {"gallery": summary, "query": summary}) for a gallery model
    (a KronPosterior, or a ProbVLMAdapter with its embed options) and the query side's model of the same kind.
    Both kinds share the protocol embed(phi, residual=, against=, **options), summary(options), embed_options."""
    if not isinstance(gallery, (KronPosterior, ProbVLMAdapter)):
        raise ValueError(f"argument 'gallery_posterior' must be a KronPosterior or a ProbVLMAdapter, got "
                         f"{type(gallery).__name__}")
    if query is not None and type(query) is not type(gallery):
        raise ValueError(f"argument 'query_posterior' must be a {type(gallery).__name__} like the gallery's (the other "
                         f"modality's), got {type(query).__name__}")
    options = gallery.embed_options(embed_options)

    def embed(phi: Tensor, residual: Tensor | None) -> EmbeddingDistribution:
        return gallery.embed(phi, residual=residual, against=query, **options)

    posteriors = {"gallery": gallery.summary(embed_options)}
    if query is not None:
        posteriors["query"] = query.summary(embed_options)
    return embed, posteriors


def build_index(
    directory: str | os.PathLike,
    gallery_posterior: KronPosterior | ProbVLMAdapter,  # the gallery tower's posterior or ProbVLM adapter
    features: Tensor,  # [M, P] the gallery's features (may itself be memory-mapped); [M, D] embeddings for ProbVLM
    query_posterior: KronPosterior | ProbVLMAdapter | None = None,  # the other tower (B^-1 cached as cross_quad)
    *,
    embed_options: dict | None = None,  # ProbVLM only: ProbVLMAdapter.embed's uncertainty, num_samples, seed, mean
    residual: Tensor | None = None,  # [M, D] fixed residual (SigLIP image tower)
    shard_rows: int = DEFAULT_SHARD_ROWS,
    batch_size: int | None = None,  # rows per embed call within a shard (default: the whole shard)
    ids: Tensor | Sequence | None = None,  # [M] int64 tensor, or M ints or strings; default: row numbers
    tower: str | None = None,  # "image" or "text": the gallery's tower, for the command line
    logit_scale: float | None = None,  # log s, stored as the default for search
    logit_bias: float | None = None,
    projected: bool = False,  # also store the "projected" variance's per-item statistics (S u: D more per item)
    ann: AnnSpec | str | dict | None = None,  # a FAISS structure per shard: "ivf-flat", "ivf-pq", "hnsw" (index.ann)
) -> "RetrievalIndex":
    """Embeds a gallery shard by shard into an index at `directory` and opens it (SPEC.md sections 3 and 7).

    Each shard is `gallery_posterior.embed(features[rows], residual[rows], against=query_posterior)`
    (for a ProbVLM adapter `gallery_posterior.embed(features[rows], **embed_options)`, recorded in the
    index with the adapter's fingerprint), `batch_size` rows at a time from the shard's first row: memory
    beyond `features` is one shard.
    Statistics are stored in the accumulation dtype of `features` (float64 for float64, else float32).
    With `ann`, each shard also gets a FAISS structure over its items (`index.ann`), which `search(...,
    candidates=C)` asks for candidates before scoring them exactly; exact search stays the default.
    An index already at `directory` is replaced atomically (a new generation, see the module docstring); a
    failure (say, a non-finite feature: ValueError naming its row) leaves it as it was.
    """
    check_tensor("features", features, dim=2)
    if residual is not None:
        check_tensor("residual", residual, dim=2)
        if residual.shape[0] != features.shape[0]:
            raise ValueError(f"argument 'residual' must have one row per feature row ({features.shape[0]}), got "
                             f"{residual.shape[0]}")
    if features.shape[0] == 0:
        raise ValueError("argument 'features' must have at least one row (an index of nothing cannot be searched)")
    writer = IndexWriter.for_posteriors(directory, gallery_posterior, query_posterior, features.shape[0],
                                        accumulation_dtype(features.dtype), embed_options, shard_rows=shard_rows,
                                        ids=ids, tower=tower, logit_scale=logit_scale, logit_bias=logit_bias,
                                        projected=projected, ann=ann)
    with _aborting_on_failure(writer):
        for number, (start, stop) in enumerate(writer.ranges):
            writer.embed_shard(number, features[start:stop], None if residual is None else residual[start:stop],
                               batch_size=batch_size)
        writer.finish()
    return open_index(directory)


def save_index(
    directory: str | os.PathLike,
    gallery: EmbeddingDistribution,  # M embeddings, ideally `precompute(against=queries)`d
    *,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    ids: Tensor | Sequence | None = None,  # [M] int64 tensor, or M ints or strings; default: row numbers
    tower: str | None = None,
    logit_scale: float | None = None,
    logit_bias: float | None = None,
    projected: bool | None = None,  # store the projection statistics; None: when `gallery` caches them
    ann: AnnSpec | str | dict | None = None,  # a FAISS structure per shard (see build_index)
) -> "RetrievalIndex":
    """Writes an embedded gallery (any form: kron, eigen or diag) as an index and opens it.

    Statistics cached on `gallery` are stored as they are; missing ones are computed shard by shard
    (cross_quad against `gallery.cross_shared`, when set; the projection statistics with `projected`). An
    index already at `directory` is replaced atomically; a failure leaves it as it was.
    """
    if not isinstance(gallery, EmbeddingDistribution):
        raise ValueError(f"argument 'gallery' must be an EmbeddingDistribution, got {type(gallery).__name__}")
    if len(gallery) == 0:
        raise ValueError("argument 'gallery' must have at least one item (an index of nothing cannot be searched)")
    writer = IndexWriter(directory, gallery, len(gallery), shard_rows=shard_rows, ids=ids, tower=tower,
                         logit_scale=logit_scale, logit_bias=logit_bias,
                         projected=gallery.projection is not None if projected is None else projected, ann=ann)
    with _aborting_on_failure(writer):
        for number, (start, stop) in enumerate(writer.ranges):
            writer.write(number, gallery[start:stop])
        writer.finish()
    return open_index(directory)


@contextlib.contextmanager
def _switch_lock(directory: str):
    """An exclusive flock on `directory/.index.lock` for the switch and clean-up of `finish`. Best effort: a
    filesystem without locks (some NFS set-ups) runs unlocked, as one writer at a time needs none."""
    import fcntl

    with open(os.path.join(directory, LOCK_FILE), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:
            pass
        yield  # closing the file releases the lock


def _remove_older_generations(directory: str, previous: str | None, current: str) -> None:
    """Removes what is older than `previous`, the generation index.json named before `current` replaced it.

    `previous` itself stays one round: a reader may have read the old index.json and not yet opened its files.
    Generation names sort by creation time, so a folder newer than `previous` (another writer's, still at
    work) is left alone; one left by a killed run goes once it is older than the replaced generation. Version 1
    files (beside index.json) are older than every generation. With no readable old index.json nothing is
    removed: what is old is then unknown. Called under `_switch_lock`.
    """
    if not previous:  # None: unknown; "": the version 1 files are the previous generation, kept this round
        return
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        if GENERATION_PATTERN.fullmatch(entry) and entry < previous and entry != current:
            shutil.rmtree(path, ignore_errors=True)
        elif (entry in (SHARED_FILE, IDS_TENSOR_FILE, IDS_JSON_FILE) or re.fullmatch(r"shard-\d+\.safetensors", entry)
              or entry.startswith(f".{MANIFEST_FILE}.tmp-")):  # version 1 files; a killed switch's temporary
            with contextlib.suppress(OSError):
                os.remove(path)


@contextlib.contextmanager
def _aborting_on_failure(writer: IndexWriter):
    """Runs the block; on any exception (Ctrl-C included) removes the writer's new generation, then re-raises."""
    try:
        yield
    except BaseException:
        writer.abort()
        raise


def _cpu(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=dtype)


def _check_ids(ids, rows: int) -> tuple[str, Tensor | list | None]:
    """("row", None), ("int", [M] int64 tensor) or ("str", list of M strings)."""
    if ids is None:
        return "row", None
    if isinstance(ids, Tensor):
        if ids.dtype != torch.int64 or tuple(ids.shape) != (rows,):
            raise ValueError(f"argument 'ids' must be an int64 tensor of shape ({rows},), got {ids.dtype} "
                             f"{tuple(ids.shape)}")
        return "int", ids.detach().cpu()
    ids = list(ids)
    if len(ids) != rows:
        raise ValueError(f"argument 'ids' must hold {rows} ids (one per gallery row), got {len(ids)}")
    if all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return "int", torch.tensor(ids, dtype=torch.int64)
    if all(isinstance(i, str) for i in ids):
        return "str", ids
    raise ValueError("argument 'ids' must be all ints or all strings")
