"""A retrieval index on disk: a gallery's means and per-item statistics in memory-mapped shards (SPEC.md section 7).

Scoring a gallery item against queries needs its mean and a few per-item numbers (SPEC.md section 4):
the Kronecker scalar alpha (or the eigen-form variances k), ||mean||^2 and mean^T B_query^-1 mean. An
index stores exactly those, computed once, so that `search` streams the gallery through the fused top-k
kernel at O(M D) per query batch with no O(M D^2) work for the kron form (the eigen form's "exact" moments
still rotate each shard's means into the query basis, O(m D^2) per shard and pass, in
`moments.pairwise_inputs`). Directory layout (format version 2):

  index.json               format, version, generation (the folder holding the files below), rows M, dim D,
                           form, dtype, tower, logit scale and bias (or null), the posteriors' hyper-parameters,
                           the shard list [{file, start, stop}], ids kind
  gen-<time>-<random>/     one generation: every file below; a rewrite makes a new one beside it
  shared.safetensors       what all items share: "shared" [D, D], "shared_eigvals" [D], "basis" [D, D]
                           (kron form), "basis" (eigen form); "cross_shared" [D, D], the query side's
                           B^-1 that cross_quad was computed against (kron-form queries only)
  shard-00000.safetensors  rows [start, stop) of the gallery, m = stop - start: "mean" [m, D],
  shard-00001.safetensors  "alpha" [m] (kron) | "k" [m, D] (eigen) | "variances" [m, D] (diag),
  ...                      "sq_norm" [m], "cross_quad" [m] (when there is cross_shared), "row" [m] int64
  ids.safetensors          "ids" [M] int64, when the ids are integers (else ids.json, a list of strings;
                           neither when the ids are the row numbers)

Shards are standard safetensors files (tensors at 64-byte boundaries). `open_index` maps them with
mmap (torch.from_file, MAP_PRIVATE; treat them as read-only): a shard's tensors are views of the page
cache, read from disk on first touch and never copied, so a gallery larger than memory can be searched;
a shard's mapping lives as long as the RetrievalIndex. Shard s holds rows [s * shard_rows, (s + 1) *
shard_rows); its rows are embedded `batch_size` at a time from its first row, so its bytes do not
depend on which process wrote it (torchrun: each rank `IndexWriter.embed_shard`s its block into the
same generation, rank 0 calls `finish` once all are written).

Rewrites are atomic. A writer fills a new generation folder and never touches the files of the one in
use; `finish` writes index.json, naming the new generation, to a temporary file and renames it over the
old one (one atomic rename), then removes the generations older than the one it replaced (that one is
kept a round, for readers that read the old index.json but have not opened its files yet). A failed or
interrupted write leaves the old index.json and its generation as they were (`abort` removes the new
folder). `open_index` reads index.json once and maps every file of its generation at once (re-reading
index.json if a rewrite removed the files in between), so a RetrievalIndex is one snapshot: on Linux a
mapped file stays readable after it is unlinked, and its searches give the old results while and after
a rewrite runs. Version 1 indexes (the files beside index.json, no generation) are still read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._files import output_directory, sync_folder, write_json
from ._validation import accumulation_dtype, check_tensor
from .distribution import CovarianceForm, EmbeddingDistribution
from .posterior import KronPosterior
from .probvlm import ProbVLMAdapter
from .retrieval import Score, merge_topk, topk
from .storage import MappedSafetensors, save_aligned

__all__ = ["IndexWriter", "RetrievalIndex", "ShardInfo", "build_index", "save_index", "open_index", "search",
           "shard_ranges", "new_generation", "DEFAULT_SHARD_ROWS"]

FORMAT = "bayesvlm_ext.RetrievalIndex"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the files beside index.json, no generation folders
MANIFEST_FILE = "index.json"
LOCK_FILE = ".index.lock"  # serialises the switches of concurrent writers (flock), not their shard writing
GENERATION_PATTERN = re.compile(r"gen-[0-9A-Za-z_-]{1,100}")  # a plain folder name: no separators, no ".."
_OPEN_ATTEMPTS = 5  # re-reads of index.json when a rewrite removed the files of the one just read
SHARED_FILE = "shared.safetensors"
IDS_TENSOR_FILE = "ids.safetensors"
IDS_JSON_FILE = "ids.json"
DEFAULT_SHARD_ROWS = 65536  # 128 MiB of float32 means at D = 512: large next to one GEMM tile, small next to memory

_PER_ITEM = {CovarianceForm.KRON: "alpha", CovarianceForm.EIGEN: "k", CovarianceForm.DIAG: "variances"}
_SHARED = {CovarianceForm.KRON: ("shared", "shared_eigvals", "basis"), CovarianceForm.EIGEN: ("basis",),
           CovarianceForm.DIAG: ()}
_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def shard_file_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def new_generation() -> str:
    """A fresh generation folder name, "gen-<nanoseconds since the epoch, 20 digits>-<random hex>".

    The fixed-width time makes the names sort by age (the writer removes the generations older than the one
    it replaces); the random part keeps two writers started in the same nanosecond apart.
    """
    return f"gen-{time.time_ns():020d}-{secrets.token_hex(4)}"


def shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """[(start, stop)] of each shard: consecutive blocks of `shard_rows` rows, the last one shorter."""
    for name, value, least in (("rows", rows, 1), ("shard_rows", shard_rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"argument '{name}' must be an int >= {least}, got {value!r}")
    return [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]


# ---- writing ---------------------------------------------------------------------------------------------

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
                 generation: str | None = None):
        if generation is None:
            generation = new_generation()
        if not isinstance(generation, str) or not GENERATION_PATTERN.fullmatch(generation):
            raise ValueError(f"argument 'generation' must be a folder name like 'gen-123-abc' (new_generation()), got "
                             f"{generation!r}")
        if not isinstance(template, EmbeddingDistribution):
            raise ValueError(f"argument 'template' must be an EmbeddingDistribution, got {type(template).__name__}")
        if template.mean.dtype not in _DTYPE_NAMES:
            raise ValueError(f"argument 'template' must have float32 or float64 means, got {template.mean.dtype}")
        if tower is not None and tower not in ("image", "text"):
            raise ValueError(f"argument 'tower' must be 'image', 'text' or None, got {tower!r}")
        self.ranges = shard_ranges(rows, shard_rows)
        self.directory, self.rows, self.shard_rows = os.fspath(directory), rows, shard_rows
        self.form, self.dim, self.dtype = template.form, template.dim, template.mean.dtype
        self.shared = {name: _cpu(getattr(template, name), self.dtype) for name in _SHARED[self.form]}
        if any(t is None for t in self.shared.values()):
            template.eigen_form()  # fills a kron template's eigenbasis
            self.shared = {name: _cpu(getattr(template, name), self.dtype) for name in _SHARED[self.form]}
        self.cross_shared = _cpu(template.cross_shared, self.dtype)
        if self.cross_shared is not None:
            self.shared["cross_shared"] = self.cross_shared
        self.ids_kind, self.ids = _check_ids(ids, rows)
        self.tower = tower
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.posteriors = posteriors or {}
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
        if dtype not in _DTYPE_NAMES:
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
        self.write(number, _concatenate(parts))

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
            given = part.cross_shared if name == "cross_shared" else getattr(part, name)
            if name in ("shared_eigvals", "basis") and given is None:
                continue  # a kron part without its eigenbasis: the index keeps the template's
            if given is None or not torch.equal(_cpu(given, self.dtype), stored):
                raise ValueError(f"argument 'part' must share the index's '{name}' matrix; it belongs to another "
                                 "posterior or was cached against another query side")
        if part.sq_norm is None or (self.cross_shared is not None and part.cross_quad is None):
            part = part.precompute(against=self.cross_shared)
        tensors = {"mean": part.mean, _PER_ITEM[self.form]: getattr(part, _PER_ITEM[self.form]),
                   "sq_norm": part.sq_norm}
        if self.cross_shared is not None:
            tensors["cross_quad"] = part.cross_quad
        tensors = {name: _cpu(t, self.dtype) for name, t in tensors.items()}
        tensors["row"] = torch.arange(start, stop, dtype=torch.int64)
        os.makedirs(self.folder, exist_ok=True)
        save_aligned(tensors, os.path.join(self.folder, shard_file_name(number)))

    def finish(self) -> None:
        """Writes shared.safetensors and the ids into the generation, then switches the index over to it.

        Once every shard exists: the generation's files are flushed to disk, index.json naming the generation
        replaces the old one in one atomic rename, and the generations older than the replaced one are
        removed (it is kept a round for readers that have read the old index.json but not yet opened its
        files). Concurrent writers' switches are serialised by a lock file; a generation that a concurrent
        writer's clean-up removed is an error here, never an index.json naming missing files.
        """
        files = [shard_file_name(n) for n in range(self.num_shards)]
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
                    "dim": self.dim, "form": self.form.value, "dtype": _DTYPE_NAMES[self.dtype], "tower": self.tower,
                    "shard_rows": self.shard_rows, "logit_scale": self.logit_scale, "logit_bias": self.logit_bias,
                    "ids": self.ids_kind, "cross_quad": self.cross_shared is not None, "posteriors": self.posteriors,
                    "shards": [{"file": shard_file_name(n), "start": start, "stop": stop}
                               for n, (start, stop) in enumerate(self.ranges)]}
        with _switch_lock(self.directory):
            previous = _published_generation(self.directory)
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
        if _published_generation(self.directory) != self.generation:  # never the generation being served
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
) -> "RetrievalIndex":
    """Embeds a gallery shard by shard into an index at `directory` and opens it (SPEC.md sections 3 and 7).

    Each shard is `gallery_posterior.embed(features[rows], residual[rows], against=query_posterior)`
    (for a ProbVLM adapter `gallery_posterior.embed(features[rows], **embed_options)`, recorded in the
    index with the adapter's fingerprint), `batch_size` rows at a time from the shard's first row: memory
    beyond `features` is one shard.
    Statistics are stored in the accumulation dtype of `features` (float64 for float64, else float32).
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
                                        ids=ids, tower=tower, logit_scale=logit_scale, logit_bias=logit_bias)
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
) -> "RetrievalIndex":
    """Writes an embedded gallery (any form: kron, eigen or diag) as an index and opens it.

    Statistics cached on `gallery` are stored as they are; missing ones are computed shard by shard
    (cross_quad against `gallery.cross_shared`, when set). An index already at `directory` is replaced
    atomically; a failure leaves it as it was.
    """
    if not isinstance(gallery, EmbeddingDistribution):
        raise ValueError(f"argument 'gallery' must be an EmbeddingDistribution, got {type(gallery).__name__}")
    if len(gallery) == 0:
        raise ValueError("argument 'gallery' must have at least one item (an index of nothing cannot be searched)")
    writer = IndexWriter(directory, gallery, len(gallery), shard_rows=shard_rows, ids=ids, tower=tower,
                         logit_scale=logit_scale, logit_bias=logit_bias)
    with _aborting_on_failure(writer):
        for number, (start, stop) in enumerate(writer.ranges):
            writer.write(number, gallery[start:stop])
        writer.finish()
    return open_index(directory)


# ---- reading ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardInfo:
    file: str  # path of the shard's safetensors file
    start: int  # first gallery row
    stop: int  # one past the last

    def __len__(self) -> int:
        return self.stop - self.start


class RetrievalIndex:
    """An index opened by `open_index`. Small parts (the shared matrices, the manifest) are read into
    memory; every shard file is memory-mapped when the index is opened (one mapping per shard, kept as
    long as the index: rewrites of the directory do not change what an opened index reads).

    Attributes: directory, generation (the folder of the files; None for a version 1 index), rows (M, also
    len), dim (D), form, dtype, tower ("image", "text" or None),
    logit_scale, logit_bias (None when not stored), shards (ShardInfo per shard), shared (name ->
    tensor: "shared", "shared_eigvals", "basis", "cross_shared" as the form has them), posteriors (the
    hyper-parameters of the posteriors it was built from, {} when built from embeddings).
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise FileNotFoundError(f"index {self.directory}: no such directory")
        for attempt in range(_OPEN_ATTEMPTS):
            manifest = _read_manifest(self.directory)
            try:
                self._open(manifest)
                return
            except FileNotFoundError:
                # A rewrite may have switched index.json and removed the generation it named since it was read:
                # then the new index.json names a complete generation. The same index.json: really missing.
                if attempt + 1 == _OPEN_ATTEMPTS or _read_manifest(self.directory) == manifest:
                    raise

    def _open(self, manifest: dict) -> None:
        """Reads the generation `manifest` names: checks every file's header and maps every shard now, so that
        the index is one snapshot however the directory changes later."""
        self._manifest = manifest
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} has format {found!r}, expected {FORMAT!r}")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise ValueError(f"index {self.directory}: format version {manifest.get('version')!r} is not supported "
                             f"(this bayesvlm_ext reads versions {', '.join(map(str, READABLE_VERSIONS))}); rebuild it "
                             "with `bayesvlm-ext index`")
        self.generation = manifest.get("generation") if manifest["version"] >= 2 else None
        if manifest["version"] >= 2 and not (isinstance(self.generation, str)
                                             and GENERATION_PATTERN.fullmatch(self.generation)):
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} is corrupt (generation "
                             f"{self.generation!r} is not a generation folder name)")
        folder = self.directory if self.generation is None else os.path.join(self.directory, self.generation)
        try:
            self.rows, self.dim = _int(manifest, "rows", 1), _int(manifest, "dim", 1)
            self.form = CovarianceForm(manifest["form"])
            self.dtype = {name: dtype for dtype, name in _DTYPE_NAMES.items()}[manifest["dtype"]]
            self.tower = manifest["tower"]
            self.logit_scale, self.logit_bias = manifest["logit_scale"], manifest["logit_bias"]
            self.posteriors = manifest["posteriors"]
            ids_kind, has_cross_quad, shards = manifest["ids"], manifest["cross_quad"], manifest["shards"]
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} is corrupt ({type(error).__name__}: {error})") \
                from None
        if self.tower not in (None, "image", "text") or ids_kind not in ("row", "int", "str") \
                or not isinstance(shards, list) or not shards:
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} is corrupt (tower, ids or shards)")

        per_item = _PER_ITEM[self.form]
        expected = {"mean": (self.dtype, "D"), per_item: (self.dtype, "D" if per_item != "alpha" else None),
                    "sq_norm": (self.dtype, None), "row": (torch.int64, None)}
        if has_cross_quad:
            expected["cross_quad"] = (self.dtype, None)
        self.shards, self._headers, position = [], [], 0
        for number, entry in enumerate(shards):
            try:
                name = entry["file"]
                if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
                    raise ValueError  # a shard is a file of its generation, never a path out of it
                info = ShardInfo(os.path.join(folder, name), int(entry["start"]), int(entry["stop"]))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"index {self.directory}: shard entry {number} is corrupt: {entry!r}") from None
            if info.start != position or info.stop <= info.start:
                raise ValueError(f"index {self.directory}: shard {number} covers rows [{info.start}, {info.stop}); "
                                 f"expected rows from {position} on")
            header = MappedSafetensors(info.file)
            for name, (dtype, width) in expected.items():
                header.expect(name, dtype, (len(info), self.dim) if width else (len(info),))
            header.map()
            self.shards.append(info)
            self._headers.append(header)
            position = info.stop
        if position != self.rows:
            raise ValueError(f"index {self.directory}: the shards cover {position} rows, the manifest says {self.rows}")

        names = _SHARED[self.form] + (("cross_shared",) if has_cross_quad else ())
        self.shared = {}
        if names:
            shared_file = MappedSafetensors(os.path.join(folder, SHARED_FILE))
            for name in names:
                shape = (self.dim,) if name == "shared_eigvals" else (self.dim, self.dim)
                shared_file.expect(name, self.dtype, shape)
                self.shared[name] = shared_file.tensor(name).clone()  # O(D^2) in memory; clone keeps the strides
        self._ids_kind, self._ids = ids_kind, None
        if ids_kind == "int":
            ids_file = MappedSafetensors(os.path.join(folder, IDS_TENSOR_FILE))
            ids_file.expect("ids", torch.int64, (self.rows,))
            self._ids = ids_file.tensor("ids")
        elif ids_kind == "str":
            path = os.path.join(folder, IDS_JSON_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"index {self.directory}: missing {IDS_JSON_FILE}")
            with open(path) as f:
                self._ids = json.load(f)
            if not isinstance(self._ids, list) or len(self._ids) != self.rows:
                raise ValueError(f"index {self.directory}: {IDS_JSON_FILE} must list {self.rows} ids")

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return (f"RetrievalIndex({self.directory!r}, rows={self.rows}, dim={self.dim}, form={self.form.value!r}, "
                f"dtype={self.dtype}, shards={len(self.shards)}, tower={self.tower!r})")

    def shard(self, number: int) -> EmbeddingDistribution:  # m items, memory-mapped, statistics cached
        """Shard `number` as an EmbeddingDistribution ready for `retrieval.topk` (cached sq_norm, cross_quad)."""
        header = self._headers[self._check_number(number)]
        get = header.tensor
        cross = self.shared.get("cross_shared")
        return EmbeddingDistribution(
            get("mean"), self.form, alpha=get("alpha") if self.form is CovarianceForm.KRON else None,
            shared=self.shared.get("shared"), shared_eigvals=self.shared.get("shared_eigvals"),
            basis=self.shared.get("basis"), k=get("k") if self.form is CovarianceForm.EIGEN else None,
            variances=get("variances") if self.form is CovarianceForm.DIAG else None, sq_norm=get("sq_norm"),
            cross_quad=get("cross_quad") if cross is not None else None, cross_shared=cross)

    def shard_rows(self, number: int) -> Tensor:  # [m] int64 gallery rows, memory-mapped
        return self._headers[self._check_number(number)].tensor("row")

    def ids_of(self, rows: Tensor) -> list:  # rows: [...] int64 gallery rows; nested lists of the same shape
        """The ids of gallery rows: row numbers, the stored integers or the stored strings."""
        if self._ids_kind == "row":
            return rows.tolist()
        if self._ids_kind == "int":
            return self._ids[rows.cpu()].tolist()
        return _nested(rows.tolist(), self._ids)

    def _check_number(self, number: int) -> int:
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < len(self.shards):
            raise ValueError(f"argument 'number' must be a shard number in [0, {len(self.shards)}), got {number!r}")
        return number


def open_index(directory: str | os.PathLike) -> RetrievalIndex:
    """Opens an index written by `build_index`, `save_index` or `bayesvlm-ext index`; checks its format,
    version and every shard's header (not the data). Raises FileNotFoundError or ValueError."""
    return RetrievalIndex(directory)


# ---- searching -------------------------------------------------------------------------------------------

def search(
    index: RetrievalIndex,
    queries: EmbeddingDistribution,  # N query embeddings of the other tower
    k: int,
    score: str | Score = "mean",
    kappa: float = 1.0,
    *,
    logit_scale: float | Tensor | None = None,  # log s; default: the index's
    logit_bias: float | Tensor | None = None,  # default: the index's, else 0
    shards: Iterable[int] | None = None,  # which shards to search (default all): one rank's share
    variant: str | None = None,  # moment variant, as in cosine_moments
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, gallery rows (int64), mean, var: [N, min(k, rows searched)]
    """The k best gallery rows per query by `score`, streamed shard by shard (SPEC.md section 7).

    Each shard goes through `retrieval.topk` (the fused kernel) and its candidates are merged into a
    running top-k with `retrieval.merge_topk`: the result is sorted by score, ties to the lower row,
    and equals `topk` over the whole gallery whenever both score each pair to the same bits. Memory:
    one shard's mapping plus O(N k); no [N, M] matrix. With `shards`, only those are searched and the
    result has min(k, their rows) columns; merging such results with `merge_topk` gives the full answer.
    """
    if not isinstance(index, RetrievalIndex):
        raise ValueError(f"argument 'index' must be a RetrievalIndex (open_index), got {type(index).__name__}")
    if not isinstance(queries, EmbeddingDistribution):
        raise ValueError(f"argument 'queries' must be an EmbeddingDistribution, got {type(queries).__name__}")
    if queries.dim != index.dim:
        raise ValueError(f"argument 'queries' must have D = {index.dim} like the index, got {queries.dim}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(index):
        raise ValueError(f"argument 'k' must be an int in [1, {len(index)}] (the gallery size), got {k!r}")
    if logit_scale is None:
        if index.logit_scale is None:
            raise ValueError("argument 'logit_scale' must be given: the index stores none")
        logit_scale = index.logit_scale
    if logit_bias is None:
        logit_bias = 0.0 if index.logit_bias is None else index.logit_bias
    numbers = list(range(len(index.shards))) if shards is None else [index._check_number(n) for n in shards]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"argument 'shards' must not repeat a shard, got {numbers}")
    best = None
    for number in numbers:
        gallery = index.shard(number)
        if gallery.device != queries.device:
            gallery = gallery.to(queries.device)
        values, local, mean, var = topk(queries, gallery, min(k, len(gallery)), score, kappa,
                                        logit_scale=logit_scale, logit_bias=logit_bias, variant=variant)
        part = (values, index.shard_rows(number).to(queries.device)[local], mean, var)
        best = part if best is None else merge_topk([best, part], min(k, best[0].shape[1] + values.shape[1]),
                                                    score, kappa)
    if best is None:
        dtype = accumulation_dtype(torch.promote_types(queries.mean.dtype, index.dtype))
        empty = torch.empty(len(queries), 0, dtype=dtype, device=queries.device)
        return empty, torch.empty(len(queries), 0, dtype=torch.int64, device=queries.device), empty, empty.clone()
    return best


# ---- helpers ---------------------------------------------------------------------------------------------







def _read_manifest(directory: str):
    """The parsed index.json of `directory` (any JSON value: the caller checks it); FileNotFoundError or ValueError."""
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"index {directory}: missing {MANIFEST_FILE} (not an index, or one still being "
                                "written)") from None
    except IsADirectoryError:
        raise ValueError(f"index {directory}: {MANIFEST_FILE} is a directory, not a file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"index {directory}: {MANIFEST_FILE} is not valid JSON ({error})") from None


def _published_generation(directory: str) -> str | None:
    """The generation the index.json of `directory` names: "" for a version 1 index (files beside index.json),
    None when there is no readable index.json."""
    try:
        manifest = _read_manifest(directory)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if manifest.get("version") == 1:
        return ""
    generation = manifest.get("generation")
    return generation if isinstance(generation, str) and GENERATION_PATTERN.fullmatch(generation) else None


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


def first_non_finite_row(values: Tensor | None) -> int | None:  # values: [n, ...] or None
    """The first row of `values` holding Inf or NaN, None when every entry is finite (or `values` is None)."""
    if values is None or values.numel() == 0:
        return None
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None


def _cpu(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(device="cpu", dtype=dtype)


def _int(manifest: dict, key: str, least: int) -> int:
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"'{key}' must be an int >= {least}, got {value!r}")
    return value


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


def _nested(rows, ids: list):
    return [_nested(r, ids) for r in rows] if isinstance(rows, list) else ids[rows]


def _concatenate(parts: list[EmbeddingDistribution]) -> EmbeddingDistribution:
    """One distribution from consecutive batches of one posterior (shared parts from the first)."""
    first = parts[0]
    if len(parts) == 1:
        return first

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)
    return EmbeddingDistribution(cat("mean"), first.form, alpha=cat("alpha"), shared=first.shared,
                                 shared_eigvals=first.shared_eigvals, k=cat("k"), basis=first.basis,
                                 variances=cat("variances"), sq_norm=cat("sq_norm"), cross_quad=cat("cross_quad"),
                                 cross_shared=first.cross_shared)
