"""Reading a retrieval index: one memory-mapped snapshot of a generation, and the streamed `search`."""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._validation import accumulation_dtype, parse_enum
from ..covariance import COVARIANCE_TYPES, CovarianceForm
from ..distribution import EmbeddingDistribution
from ..retrieval import Score, merge_topk, topk
from ..storage import MappedSafetensors
from .ann import AnnSpec, faiss_module, propose, query_vectors, rescore, search_params
from .layout import (DTYPE_NAMES, FORMAT, GENERATION_PATTERN, IDS_JSON_FILE, IDS_TENSOR_FILE, MANIFEST_FILE,
                     PROJECTION_TENSORS, READABLE_VERSIONS, SHARED_FILE, ann_file_name, read_manifest)

OPEN_ATTEMPTS = 5  # re-reads of index.json when a rewrite removed the files of the one just read


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
        for attempt in range(OPEN_ATTEMPTS):
            manifest = read_manifest(self.directory)
            try:
                self._open(manifest)
                return
            except FileNotFoundError:
                # A rewrite may have switched index.json and removed the generation it named since it was read:
                # then the new index.json names a complete generation. The same index.json: really missing.
                if attempt + 1 == OPEN_ATTEMPTS or read_manifest(self.directory) == manifest:
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
            self.dtype = {name: dtype for dtype, name in DTYPE_NAMES.items()}[manifest["dtype"]]
            self.tower = manifest["tower"]
            self.logit_scale, self.logit_bias = manifest["logit_scale"], manifest["logit_bias"]
            self.posteriors = manifest["posteriors"]
            ids_kind, has_cross_quad, shards = manifest["ids"], manifest["cross_quad"], manifest["shards"]
            self.projected = manifest.get("projection", False)  # absent in indexes written before it existed
            self.ann = AnnSpec.parse(manifest.get("ann"))  # None: exact search only
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} is corrupt ({type(error).__name__}: {error})") \
                from None
        if not isinstance(self.projected, bool):
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} is corrupt (projection "
                             f"{self.projected!r} is not true or false)")
        if self.tower not in (None, "image", "text") or ids_kind not in ("row", "int", "str") \
                or not isinstance(shards, list) or not shards:
            raise ValueError(f"index {self.directory}: {MANIFEST_FILE} is corrupt (tower, ids or shards)")

        self._covariance_type = COVARIANCE_TYPES[self.form]
        item_shapes = self._covariance_type.shapes(1, self.dim)  # the shapes of one item, stored and shared
        expected = {"mean": (self.dtype, True), "sq_norm": (self.dtype, False), "row": (torch.int64, False)}
        expected |= {name: (self.dtype, len(item_shapes[name]) == 2) for name in self._covariance_type.PER_ITEM}
        if has_cross_quad:
            expected["cross_quad"] = (self.dtype, False)
        if self.projected:
            expected |= {name: (self.dtype, name == "proj_applied") for name in PROJECTION_TENSORS}
        self.shards, self._headers, self._ann_files, self._ann_cache, position = [], [], [], {}, 0
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
            if self.ann is not None:  # mapped now, read into FAISS on first use: the snapshot holds it too
                self._ann_files.append(_map_file(os.path.join(folder, ann_file_name(number))))
            self.shards.append(info)
            self._headers.append(header)
            position = info.stop
        if position != self.rows:
            raise ValueError(f"index {self.directory}: the shards cover {position} rows, the manifest says {self.rows}")

        names = self._covariance_type.SHARED + (("cross_shared",) if has_cross_quad else ())
        shapes = item_shapes | {"cross_shared": (self.dim, self.dim)}
        self.shared = {}
        if names:
            shared_file = MappedSafetensors(os.path.join(folder, SHARED_FILE))
            for name in names:
                shared_file.expect(name, self.dtype, shapes[name])
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
        covariance = self._covariance_type.from_tensors(
            self.shared | {name: get(name) for name in self._covariance_type.PER_ITEM})
        projection = tuple(get(name) for name in PROJECTION_TENSORS) if self.projected else None
        return EmbeddingDistribution(get("mean"), covariance, sq_norm=get("sq_norm"), cross_shared=cross,
                                     cross_quad=get("cross_quad") if cross is not None else None,
                                     projection=projection)

    def ann_index(self, number: int):
        """Shard `number`'s FAISS structure (indexes built with `ann`), read from its mapping on first use."""
        number = self._check_number(number)
        if self.ann is None:
            raise ValueError(f"index {self.directory} has no ANN structure: build it with ann= (CLI: index --ann)")
        if number not in self._ann_cache:
            self._ann_cache[number] = faiss_module().deserialize_index(self._ann_files[number])
        return self._ann_cache[number]

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
    candidates: int | None = None,  # C >= k: ask each shard's ANN structure for C items per query, score them exactly
    nprobe: int | None = None,  # IVF lists scanned per query (default: the index's ann.nprobe)
    ef_search: int | None = None,  # HNSW breadth (default: max(C, the index's ann.ef_search))
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, gallery rows (int64), mean, var: [N, min(k, rows searched)]
    """The k best gallery rows per query by `score`, streamed shard by shard (SPEC.md section 7).

    Each shard goes through `retrieval.topk` (the fused kernel) and its candidates are merged into a
    running top-k with `retrieval.merge_topk`: the result is sorted by score, ties to the lower row,
    and equals `topk` over the whole gallery whenever both score each pair to the same bits. Memory:
    one shard's mapping plus O(N k); no [N, M] matrix. With `shards`, only those are searched and the
    result has min(k, their rows) columns; merging such results with `merge_topk` gives the full answer.

    With `candidates=C` (an index built with `ann`), each shard's FAISS structure proposes C items per query
    by the mean logit's inner product and the moment kernel scores them exactly (`bayesvlm_ext.index.ann`):
    values, mean and variance are exact, the order among the candidates too; recall against the exact search
    depends on C, `nprobe` / `ef_search` and, for the uncertainty scores, on how far their order departs
    from the mean's (README, "Approximate search"). Memory: O(N C) per shard.
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
    approximate = _check_ann_options(index, k, candidates, nprobe, ef_search)
    if approximate:
        score, vectors = parse_enum("score", score, Score), query_vectors(queries)
    best = None
    for number in numbers:
        gallery = index.shard(number)
        if gallery.device != queries.device:
            gallery = gallery.to(queries.device)
        if approximate:
            structure, count = index.ann_index(number), min(candidates, len(gallery))
            local = propose(structure, vectors, count, search_params(structure, index.ann, count, nprobe, ef_search))
            values, local, mean, var = rescore(queries, gallery, local, k, score, kappa, logit_scale, logit_bias,
                                               variant)
        else:
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


def _check_ann_options(index: RetrievalIndex, k: int, candidates, nprobe, ef_search) -> bool:
    """Whether the search is approximate; ValueError for options that do not fit the index or each other."""
    for name, value in (("candidates", candidates), ("nprobe", nprobe), ("ef_search", ef_search)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"argument '{name}' must be an int >= 1 or None, got {value!r}")
    if candidates is None:
        if nprobe is not None or ef_search is not None:
            raise ValueError("arguments 'nprobe' and 'ef_search' tune the approximate search: give 'candidates' too")
        return False
    if index.ann is None:
        raise ValueError(f"argument 'candidates' needs an index built with an ANN structure (build_index(..., ann=), "
                         f"CLI: index --ann); {index.directory} has none: search it exactly (candidates=None)")
    if candidates < k:
        raise ValueError(f"argument 'candidates' must be >= k = {k} (the items scored exactly per shard), got "
                         f"{candidates}")
    if nprobe is not None and index.ann.kind == "hnsw":
        raise ValueError("argument 'nprobe' applies to IVF structures; this index's is 'hnsw' (use ef_search)")
    if ef_search is not None and index.ann.kind != "hnsw":
        raise ValueError(f"argument 'ef_search' applies to HNSW; this index's is '{index.ann.kind}' (use nprobe)")
    return True


def _map_file(path: str) -> np.ndarray:  # [bytes] uint8, read-only, valid after the file is unlinked
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def _int(manifest: dict, key: str, least: int) -> int:
    value = manifest[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"'{key}' must be an int >= {least}, got {value!r}")
    return value


def _nested(rows, ids: list):
    return [_nested(r, ids) for r in rows] if isinstance(rows, list) else ids[rows]
