"""Approximate candidates, exact scores (SPEC.md section 7): a FAISS structure per shard proposes, the kernel decides.

Each shard of an index built with `ann=` carries a FAISS index over its items' mean vectors scaled as the mean
logit scales them, v_j = mu_j / sqrt(E||g_j||^2) (inner product). For a query x and a logit scale s > 0 the
order of x . v_j over j is the order of the mean logit s cos_ij + beta: an exact search of these vectors
proposes the mean top-k itself. `search(..., candidates=C)` asks every searched shard for the C best items per
query by x . v_j, re-scores each candidate exactly with the moment kernel from the stored per-item statistics
(any score, any variant) and keeps the k best in `merge_topk`'s order. The engine only proposes: a returned
item's value, mean and variance are its exact scores (those of exact streaming search up to the last bits of a
GEMM of another shape), and the order among the candidates is exact; what approximation costs is the items the
engine did not propose, measured as recall@k against exact search (benchmarks/ann.py), never assumed.

Structures (`AnnSpec.kind`), built per shard from a training sample of at most `train_rows` of its rows:
  "ivf-flat"  IVF with `nlist` lists of the full vectors; a query scans `nprobe` lists.
  "ivf-pq"    IVF whose lists hold product-quantised codes, `pq_m` sub-quantisers of `pq_bits` bits each
              (pq_m bytes per item at 8 bits, against 4 D for ivf-flat).
  "hnsw"      a graph of `hnsw_m` links per item, no training; a query explores `ef_search` (at least C) nodes.
A shard smaller than `FLAT_BELOW` rows gets an exact flat index instead (no sample could train the others).
A non-finite vector (a zero mean, a NaN row) is indexed as zeros: its exact score is NaN, ranked last anyway.
When an engine returns fewer than C items for a query (IVF lists too short), the shard's lowest rows not
proposed fill the list, so that every query always gets k rows (SPEC.md section 12).

FAISS (`faiss-cpu`) is optional: only building or searching an ANN index imports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import Tensor

from ..distribution import EmbeddingDistribution
from ..moments import cosine_moments
from ..retrieval import Score, merge_topk

ANN_KINDS = ("ivf-flat", "ivf-pq", "hnsw")
FLAT_BELOW = 1024  # rows: smaller shards get an exact flat index
MIN_POINTS_PER_CENTROID = 39  # FAISS's own bound for a well-trained k-means (it warns below it)
PAIR_BUDGET = 1 << 18  # (query, item) pairs of one re-scoring GEMM block


def faiss_module():
    """The faiss module, or an ImportError saying how to get it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError("approximate search (ann=..., candidates=...) needs FAISS: pip install faiss-cpu "
                          f"(bayesvlm_ext's 'ann' extra); the exact search needs nothing more ({error})") from None
    return faiss


@dataclass(frozen=True)
class AnnSpec:
    """Which FAISS structure each shard carries, and its build and default search parameters."""

    kind: str  # "ivf-flat", "ivf-pq" or "hnsw"
    nlist: int | None = None  # IVF lists per shard; None: 4 sqrt(m), at most m / 39 (FAISS's training bound)
    nprobe: int = 32  # IVF lists scanned per query (search's default)
    pq_m: int | None = None  # IVF-PQ sub-quantisers, a divisor of D; None: the largest divisor <= D / 8
    pq_bits: int = 8  # IVF-PQ bits per code (fewer on shards too small to train 2^bits centroids)
    hnsw_m: int = 32  # HNSW links per item
    ef_construction: int = 80  # HNSW breadth while building
    ef_search: int = 64  # HNSW breadth while searching (at least the candidate count)
    train_rows: int = 65536  # IVF training sample per shard (rows drawn with `seed` + the shard number)
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ANN_KINDS:
            raise ValueError(f"argument 'ann' must name one of {', '.join(ANN_KINDS)}, got {self.kind!r}")
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name == "kind" or (value is None and field.name in ("nlist", "pq_m")):
                continue
            least = 0 if field.name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"ann option '{field.name}' must be an int >= {least}, got {value!r}")
        if not 1 <= self.pq_bits <= 16:
            raise ValueError(f"ann option 'pq_bits' must be in [1, 16], got {self.pq_bits}")

    @classmethod
    def parse(cls, ann) -> "AnnSpec | None":
        """None, an AnnSpec, a kind ("hnsw") or a dict {"kind": ..., options} (the manifest's form)."""
        if ann is None or isinstance(ann, AnnSpec):
            return ann
        if isinstance(ann, str):
            return cls(ann)
        if isinstance(ann, dict):
            known = {field.name for field in fields(cls)}
            unknown = sorted(set(ann) - known)
            if unknown or "kind" not in ann:
                raise ValueError(f"argument 'ann' must be a dict with 'kind' and options among {sorted(known)}, got "
                                 f"keys {sorted(ann)}")
            return cls(**ann)
        raise ValueError(f"argument 'ann' must be None, a kind ({', '.join(ANN_KINDS)}), a dict or an AnnSpec, got "
                         f"{type(ann).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)

    def list_count(self, rows: int) -> int:
        """IVF lists for a shard of `rows` rows: `nlist`, or 4 sqrt(rows), never more than the sample trains."""
        trainable = max(1, min(rows, self.train_rows) // MIN_POINTS_PER_CENTROID)
        wanted = self.nlist if self.nlist is not None else round(4 * math.sqrt(rows))
        return max(1, min(wanted, trainable))

    def pq_shape(self, rows: int, dim: int) -> tuple[int, int]:
        """(sub-quantisers, bits) for a shard of `rows` rows: bits lowered until 2^bits centroids train."""
        m = self.pq_m if self.pq_m is not None else max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
        if dim % m:
            raise ValueError(f"ann option 'pq_m' must divide D = {dim}, got {m}")
        sample = min(rows, self.train_rows)
        bits = min(self.pq_bits, max(1, int(math.log2(max(2, sample // MIN_POINTS_PER_CENTROID)))))
        return m, bits


def ann_vectors(items: EmbeddingDistribution) -> np.ndarray:  # [m, D] float32, C-contiguous
    """The vectors a shard's FAISS index holds: mu / sqrt(E||g||^2) (the mean logit's scaling), non-finite rows 0."""
    mean = items.mean.detach().to("cpu")
    sq_norm = items.sq_norm if items.sq_norm is not None else (mean.double() ** 2).sum(1)
    expected = sq_norm.detach().to("cpu", torch.float64) + items.trace().detach().to("cpu", torch.float64)
    vectors = mean.to(torch.float32) * expected.rsqrt().to(torch.float32)[:, None]  # [m, D], no float64 copy
    vectors[~torch.isfinite(vectors).all(dim=1)] = 0.0
    return np.ascontiguousarray(vectors.numpy())


def query_vectors(queries: EmbeddingDistribution) -> np.ndarray:  # [N, D] float32
    """The queries' unit mean directions (any positive per-query scale ranks alike), non-finite or zero rows 0."""
    mean = queries.mean.detach().to("cpu", torch.float64)
    vectors = torch.nn.functional.normalize(mean, dim=1)
    vectors[~torch.isfinite(vectors).all(dim=1)] = 0.0
    return np.ascontiguousarray(vectors.to(torch.float32).numpy())


def build(vectors: np.ndarray, spec: AnnSpec, shard: int = 0):
    """A trained, filled FAISS index (inner product) over one shard's `ann_vectors`."""
    faiss = faiss_module()
    rows, dim = vectors.shape
    if rows < FLAT_BELOW:
        index = faiss.IndexFlatIP(dim)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        nlist = spec.list_count(rows)
        quantizer = faiss.IndexFlatIP(dim)
        if spec.kind == "ivf-flat":
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            m, bits = spec.pq_shape(rows, dim)
            index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + shard)
        sample = torch.randperm(rows, generator=generator)[:min(rows, spec.train_rows)].sort().values.numpy()
        index.train(np.ascontiguousarray(vectors[sample]))
    index.add(vectors)
    return index


def search_params(index, spec: AnnSpec, count: int, nprobe: int | None, ef_search: int | None):
    """FAISS per-call search parameters for `index` (thread-safe: the index itself is not changed)."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=min(index.nlist, nprobe if nprobe is not None else spec.nprobe))
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=max(count, ef_search if ef_search is not None else spec.ef_search))
    return None  # flat: exact, nothing to set


def propose(index, vectors: np.ndarray, count: int, params) -> Tensor:  # [N, count] int64 local rows, distinct
    """The `count` best local rows of one shard per query by x . v (FAISS order); short lists are filled with the
    lowest rows not proposed, so each row holds `count` distinct rows of the shard."""
    if len(vectors) == 0:
        return torch.empty(0, count, dtype=torch.int64)
    _, found = index.search(vectors, count, params=params) if params is not None else index.search(vectors, count)
    rows = torch.from_numpy(found).to(torch.int64)
    short = (rows < 0).any(dim=1).nonzero().flatten().tolist()
    for q in short:  # rare: IVF lists shorter than the candidates wanted
        have = rows[q][rows[q] >= 0]
        taken = torch.zeros(index.ntotal, dtype=torch.bool)
        taken[have] = True
        fill = (~taken).nonzero().flatten()[:count - len(have)]
        rows[q] = torch.cat([have, fill])
    return rows


def rescore(
    queries: EmbeddingDistribution,  # N queries
    gallery: EmbeddingDistribution,  # one shard's m items (statistics cached)
    local: Tensor,  # [N, C] int64 distinct rows of `gallery` per query
    k: int,
    score: Score,
    kappa: float,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    variant,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, local rows, mean, var: [N, min(k, C)]
    """The k best of each query's candidates by their exact scores (the moment kernel, then merge_topk's order).

    Queries go in blocks of b with b * (b C) <= PAIR_BUDGET: each block scores its queries against the union of
    their candidates in one kernel call, and each query keeps only its own candidates' scores, so a query's
    result never depends on which other queries share its block."""
    n, count = local.shape
    keep = min(k, count)
    block = max(1, math.isqrt(PAIR_BUDGET // max(count, 1)))
    parts = []
    local = local.to(queries.device)
    for b0 in range(0, n, block):
        ids = local[b0:b0 + block]
        unique, inverse = torch.unique(ids, return_inverse=True)  # inverse [b, C]: each candidate's column
        mean, var = cosine_moments(queries[b0:b0 + block], gallery.take(unique), logit_scale, logit_bias,
                                   variant=variant)
        mean, var = mean.gather(1, inverse), var.gather(1, inverse)
        parts.append(merge_topk([(score_values(mean, var, score, kappa), ids, mean, var)], keep, score, kappa))
    if not parts:
        dtype = torch.float64 if queries.mean.dtype == torch.float64 else torch.float32
        empty = torch.empty(0, keep, dtype=dtype, device=queries.device)
        return empty, torch.empty(0, keep, dtype=torch.int64, device=queries.device), empty, empty.clone()
    return tuple(torch.cat(column) for column in zip(*parts))


def score_values(mean: Tensor, var: Tensor, score: Score, kappa: float) -> Tensor:
    """The value `topk` returns for each (mean, var) under `score` (probit: the probability sigmoid(t))."""
    if score is Score.MEAN:
        return mean
    if score is Score.PESSIMISTIC:
        return mean - kappa * var.sqrt()
    if score is Score.OPTIMISTIC:
        return mean + kappa * var.sqrt()
    return torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * var))
