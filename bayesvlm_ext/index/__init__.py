"""A retrieval index on disk: a gallery's means and per-item statistics in memory-mapped shards (SPEC.md section 7).

Scoring a gallery item against queries needs its mean and a few per-item numbers (SPEC.md section 4):
the Kronecker scalar alpha (or the eigen-form variances k), ||mean||^2 and mean^T B_query^-1 mean. An
index stores exactly those, computed once, so that `search` streams the gallery through the fused top-k
kernel at O(M D) per query batch with no O(M D^2) work for the kron form (the eigen form's "exact" moments
still rotate each shard's means into the query basis, O(m D^2) per shard and pass, in
`moments.pairwise_inputs`). Directory layout (format version 2):

  index.json               format, version, generation (the folder holding the files below), rows M, dim D,
                           form, dtype, tower, logit scale and bias (or null), the posteriors' hyper-parameters,
                           the shard list [{file, start, stop}], ids kind, projection (absent: false), ann
                           (null or absent: exact search only; else AnnSpec's fields: kind and parameters)
  gen-<time>-<random>/     one generation: every file below; a rewrite makes a new one beside it
  shared.safetensors       what all items share: "shared" [D, D], "shared_eigvals" [D], "basis" [D, D]
                           (kron form), "basis" (eigen form); "cross_shared" [D, D], the query side's
                           B^-1 that cross_quad was computed against (kron-form queries only)
  shard-00000.safetensors  rows [start, stop) of the gallery, m = stop - start: "mean" [m, D],
  shard-00001.safetensors  "alpha" [m] (kron) | "k" [m, D] (eigen) | "variances" [m, D] (diag),
  ...                      "sq_norm" [m], "cross_quad" [m] (when there is cross_shared), "row" [m] int64,
                           and with "projection": true in index.json "proj_applied" [m, D] (S u),
                           "proj_inv_mu_norm" [m], "proj_r" [m] (the "projected" variance, SPEC.md section 4)
  ann-00000.faiss          with "ann": shard 0's FAISS structure over its items (bayesvlm_ext.index.ann), ...
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

Modules: `layout` (file names, the manifest, generation names), `writer` (IndexWriter, build_index,
save_index, the atomic switch), `reader` (RetrievalIndex, open_index, search), `ann` (FAISS candidates, exact
re-scoring: `search(..., candidates=C)` on an index built with `ann=`).
"""

from .ann import ANN_KINDS, AnnSpec
from .layout import DEFAULT_SHARD_ROWS, first_non_finite_row, new_generation, shard_ranges
from .reader import RetrievalIndex, ShardInfo, open_index, search
from .writer import IndexWriter, build_index, save_index

__all__ = ["AnnSpec", "ANN_KINDS", "IndexWriter", "RetrievalIndex", "ShardInfo", "build_index", "save_index",
           "open_index", "search", "shard_ranges", "new_generation", "first_non_finite_row", "DEFAULT_SHARD_ROWS"]
