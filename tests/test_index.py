"""The retrieval index on disk (bayesvlm_ext.index), merge_topk, and `bayesvlm-ext index` / `retrieve`,
one process and under torchrun (SPEC.md section 7)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from testing import command_fails, devices, run_command, spd

from bayesvlm_ext import EmbeddingDistribution, KronPosterior, build_index, open_index, ops, search, topk
from bayesvlm_ext.index import save_index
from bayesvlm_ext.retrieval import merge_topk
from bayesvlm_ext.cli import main
from bayesvlm_ext.index import IndexWriter
from bayesvlm_ext.storage import open_safetensors

D = 4
P_IMAGE, P_TEXT = 6, 5
LOGIT_SCALE, LOGIT_BIAS = math.log(30.0), -1.5
SCORES = ["mean", "pessimistic", "optimistic", "probit"]


def tower(generator, P, damping="kron", bias=False, prior_precision=0.5):
    return KronPosterior(spd(P + bias, generator), spd(D, generator),
                         torch.randn(D, P, generator=generator, dtype=torch.float64),
                         torch.randn(D, generator=generator, dtype=torch.float64) if bias else None,
                         prior_precision=prior_precision, pseudo_count=2.0, damping=damping)


def embed_in_batches(posterior, phi, against, batch_size):
    """What the index promises for one shard: embed() `batch_size` rows at a time from the shard's first row."""
    parts = [posterior.embed(phi[b0:b0 + batch_size], against=against) for b0 in range(0, phi.shape[0], batch_size)]
    def cat(name):
        return None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
    return {name: cat(name) for name in ("mean", "alpha", "k", "sq_norm", "cross_quad")}


# ---- writing and reading --------------------------------------------------------------------------------

@pytest.mark.parametrize("damping", ["kron", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_index_round_trip_equals_embed(damping, dtype, generator, tmp_path):
    query, gallery = tower(generator, P_TEXT, damping), tower(generator, P_IMAGE, damping, bias=True)
    phi = torch.randn(23, P_IMAGE, generator=generator, dtype=torch.float64).to(dtype)
    ids = [f"item-{i}" for i in range(23)]
    index = build_index(tmp_path, gallery, phi, query, shard_rows=7, batch_size=3, ids=ids, tower="image",
                        logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
    assert len(index) == 23 and index.dim == D and index.dtype == dtype and index.tower == "image"
    assert [(s.start, s.stop) for s in index.shards] == [(0, 7), (7, 14), (14, 21), (21, 23)]
    assert (index.logit_scale, index.logit_bias) == (LOGIT_SCALE, LOGIT_BIAS)
    template = gallery.embed(phi[:0], against=query)
    for number, info in enumerate(index.shards):
        shard = index.shard(number)
        expected = embed_in_batches(gallery, phi[info.start:info.stop], query, 3)
        for name, value in expected.items():
            got = getattr(shard, name)
            assert (got is None) == (value is None), name
            if value is not None:
                assert got.dtype == dtype and torch.equal(got, value), name
        assert torch.equal(index.shard_rows(number), torch.arange(info.start, info.stop))
        for name in ("shared", "shared_eigvals", "basis", "cross_shared"):
            expected_shared = getattr(template, name)
            if expected_shared is not None:
                assert torch.equal(getattr(shard, name), expected_shared), name
        # the same layout as embed's (eigh returns column-major bases): BLAS then rounds alike
        assert shard.basis.stride() == template.basis.stride()
    assert (index.shard(0).cross_quad is None) == (damping == "exact")  # an "exact" query side has no B^-1
    assert index.ids_of(torch.tensor([[22, 0], [7, 7]])) == [["item-22", "item-0"], ["item-7", "item-7"]]


def mapped_ranges(path):
    """(start, end) address ranges at which this process maps `path`, from /proc/self/maps."""
    ranges, real = [], os.path.realpath(path)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5] == real:
                start, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def test_shards_are_memory_mapped_not_copied(generator, tmp_path):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    phi = torch.randn(40, P_IMAGE, generator=generator)
    index = build_index(tmp_path, gallery, phi, query, shard_rows=32)
    shard = index.shard(0)
    path = index.shards[0].file
    ranges = mapped_ranges(path)
    for name in ("mean", "alpha", "sq_norm", "cross_quad"):
        pointer = getattr(shard, name).data_ptr()
        assert any(start <= pointer < end for start, end in ranges), f"{name} is not inside a mapping of {path}"
        assert pointer % 64 == 0, name  # aligned like PyTorch's own allocations
    # A write to the file shows through the mapping: the tensor is the page cache, not a private copy.
    reader = open_safetensors(path)
    begin = reader.data_start + reader.entries["mean"][2]
    before = shard.mean[0, 0].item()
    with open(path, "r+b") as f:
        f.seek(begin)
        f.write(torch.tensor([before + 1.0], dtype=torch.float32).numpy().tobytes())
    assert shard.mean[0, 0].item() == before + 1.0
    # ... and a standard safetensors reader still reads the (padded, aligned) files.
    with safe_open(path, framework="pt") as f:
        assert torch.equal(f.get_tensor("alpha"), shard.alpha)


def test_save_index_and_writer_checks(generator, tmp_path):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    embedded = gallery.embed(torch.randn(9, P_IMAGE, generator=generator), against=query)
    index = save_index(tmp_path / "a", embedded, shard_rows=4, ids=torch.arange(100, 109))
    assert torch.equal(torch.cat([index.shard(n).mean for n in range(3)]), embedded.mean)
    assert torch.equal(torch.cat([index.shard(n).cross_quad for n in range(3)]), embedded.cross_quad)
    assert index.ids_of(torch.tensor([8, 0])) == [108, 100]
    with pytest.raises(ValueError, match="'ids' must hold 9 ids"):
        save_index(tmp_path / "b", embedded, ids=["a"])
    with pytest.raises(ValueError, match="'shard_rows' must be an int >= 1"):
        save_index(tmp_path / "b", embedded, shard_rows=0)
    writer = IndexWriter.for_posteriors(tmp_path / "c", gallery, query, rows=9, shard_rows=4)
    other = tower(generator, P_IMAGE).embed(torch.randn(4, P_IMAGE, generator=generator), against=query)
    with pytest.raises(ValueError, match="'part' must share the index's 'shared' matrix"):
        writer.write(0, other)
    with pytest.raises(ValueError, match="'phi' must have 4 rows"):
        writer.embed_shard(0, torch.randn(5, P_IMAGE))
    with pytest.raises(ValueError, match="'phi' must be embedded in torch.float32"):
        writer.embed_shard(0, torch.randn(4, P_IMAGE, dtype=torch.float64))
    writer.embed_shard(0, torch.randn(4, P_IMAGE))
    with pytest.raises(ValueError, match="2 shard\\(s\\) not written yet"):
        writer.finish()


def test_open_index_rejects_corrupt_and_unknown_indexes(generator, tmp_path):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    index = build_index(tmp_path, gallery, torch.randn(9, P_IMAGE, generator=generator), query, shard_rows=4)
    manifest_file = tmp_path / "index.json"
    manifest = json.loads(manifest_file.read_text())
    for change, message in (({"version": 99}, "format version 99 is not supported"),
                            ({"generation": "../elsewhere"}, "is not a generation folder name"),
                            ({"shards": [{**manifest["shards"][0], "file": "../index.json"}, *manifest["shards"][1:]]},
                             "shard entry 0 is corrupt"),
                            ({"format": "something else"}, "has format 'something else'"),
                            ({"rows": 10}, "the shards cover 9 rows, the manifest says 10"),
                            ({"form": "dense"}, "index.json is corrupt")):
        manifest_file.write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=message):
            open_index(tmp_path)
    manifest_file.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        open_index(tmp_path)
    manifest_file.write_text(json.dumps(manifest))
    shard = tmp_path / index.generation / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated
    with pytest.raises(ValueError, match="does not fit the file"):
        open_index(tmp_path)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        open_index(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="missing index.json"):
        open_index(tmp_path / "empty")


# ---- atomic rewrites: generations -----------------------------------------------------------------------

def snapshot(folder):
    """{path relative to `folder`: bytes} of every file under it, generations and temporary files included."""
    return {os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
            for root, _, names in os.walk(folder) for name in names}


def answers(index, queries, k=5):
    """What a search of `index` returns, with the ids: (values, rows, mean, var, ids)."""
    values, rows, mean, var = search(index, queries, k, "probit", logit_scale=LOGIT_SCALE)
    return values, rows, mean, var, index.ids_of(rows)


def assert_same_answers(a, b):
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x, y)
    assert a[4] == b[4]


def test_a_failed_or_interrupted_rewrite_leaves_the_old_index_byte_for_byte(generator, tmp_path, monkeypatch):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    queries = query.embed(torch.randn(3, P_TEXT, generator=generator))
    build_index(tmp_path, gallery, torch.randn(11, P_IMAGE, generator=generator), query, shard_rows=4,
                ids=[f"old-{i}" for i in range(11)])
    before, served = snapshot(tmp_path), answers(open_index(tmp_path), queries)
    features = torch.randn(13, P_IMAGE, generator=generator)
    features[9, 2] = float("inf")  # shard 2: shards 0 and 1 are written before it fails
    with pytest.raises(ValueError, match=r"'phi' must be finite: gallery row 9 \(shard 2\) holds Inf or NaN"):
        build_index(tmp_path, gallery, features, query, shard_rows=4)
    assert snapshot(tmp_path) == before  # no new generation, no temporary file left
    assert_same_answers(answers(open_index(tmp_path), queries), served)

    real_embed_shard = IndexWriter.embed_shard

    def interrupted(self, number, *args, **kwargs):
        if number == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a rewrite
        real_embed_shard(self, number, *args, **kwargs)

    monkeypatch.setattr(IndexWriter, "embed_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(tmp_path, gallery, torch.randn(13, P_IMAGE, generator=generator), query, shard_rows=4)
    assert snapshot(tmp_path) == before
    assert_same_answers(answers(open_index(tmp_path), queries), served)


def test_an_opened_index_is_one_snapshot_while_and_after_the_directory_is_rewritten(generator, tmp_path):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    queries = query.embed(torch.randn(3, P_TEXT, generator=generator))
    build_index(tmp_path, gallery, torch.randn(11, P_IMAGE, generator=generator), query, shard_rows=4,
                ids=torch.arange(100, 111), logit_scale=LOGIT_SCALE)
    served = answers(open_index(tmp_path), queries)
    reader = open_index(tmp_path)  # opened, not yet searched: what it reads later must still be this index

    # A rewrite in progress (13 rows, other ids): neither the opened index nor a new reader sees any of it.
    new_features = torch.randn(13, P_IMAGE, generator=generator)
    writer = IndexWriter.for_posteriors(tmp_path, gallery, query, rows=13, shard_rows=4, ids=torch.arange(13) - 50,
                                        logit_scale=LOGIT_SCALE)
    writer.embed_shard(0, new_features[:4])
    assert_same_answers(answers(reader, queries), served)
    assert_same_answers(answers(open_index(tmp_path), queries), served)
    old_generation = reader.generation
    assert writer.generation != old_generation
    for number in (1, 2, 3):
        start, stop = writer.shard_range(number)
        writer.embed_shard(number, new_features[start:stop])
    writer.finish()

    # Switched: new readers get the new index; the one opened before keeps the old answers.
    rewritten = open_index(tmp_path)
    assert rewritten.generation == writer.generation and len(rewritten) == 13
    expected = build_index(tmp_path / "fresh", gallery, new_features, query, shard_rows=4,
                           ids=torch.arange(13) - 50, logit_scale=LOGIT_SCALE)
    assert_same_answers(answers(rewritten, queries), answers(expected, queries))
    assert_same_answers(answers(reader, queries), served)
    assert os.path.isdir(tmp_path / old_generation)  # kept a round for readers that read the old index.json

    # One more rewrite removes the old generation from disk; the opened index still reads its mapped files.
    build_index(tmp_path, gallery, torch.randn(5, P_IMAGE, generator=generator), query, shard_rows=4)
    assert not os.path.exists(tmp_path / old_generation)
    assert sorted(os.listdir(tmp_path)) == sorted([".index.lock", "fresh", "index.json", writer.generation,
                                                   open_index(tmp_path).generation])
    assert_same_answers(answers(reader, queries), served)


def test_open_index_reads_again_when_a_rewrite_removed_the_generation_it_read(generator, tmp_path, monkeypatch):
    import bayesvlm_ext.index.reader as reader_module

    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    build_index(tmp_path, gallery, torch.randn(6, P_IMAGE, generator=generator), query, shard_rows=4)
    stale = json.loads((tmp_path / "index.json").read_text())
    for rows in (7, 8):  # two rewrites: the generation `stale` names is gone
        build_index(tmp_path, gallery, torch.randn(rows, P_IMAGE, generator=generator), query, shard_rows=4)
    assert not os.path.exists(tmp_path / stale["generation"])
    real_read = reader_module.read_manifest
    reads = []

    def read_stale_first(directory):  # a reader that read index.json just before the two rewrites
        reads.append(directory)
        return stale if len(reads) == 1 else real_read(directory)

    monkeypatch.setattr(reader_module, "read_manifest", read_stale_first)
    index = open_index(tmp_path)
    assert len(index) == 8 and len(reads) >= 2


def test_version_1_indexes_still_open_and_are_replaced_by_generations(generator, tmp_path):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    queries = query.embed(torch.randn(3, P_TEXT, generator=generator))
    index = build_index(tmp_path, gallery, torch.randn(9, P_IMAGE, generator=generator), query, shard_rows=4,
                        ids=[f"v1-{i}" for i in range(9)], logit_scale=LOGIT_SCALE)
    served = answers(index, queries)
    # The version 1 layout: the files beside index.json, no generation.
    for name in os.listdir(tmp_path / index.generation):
        os.rename(tmp_path / index.generation / name, tmp_path / name)
    os.rmdir(tmp_path / index.generation)
    manifest = json.loads((tmp_path / "index.json").read_text())
    del manifest["generation"]
    (tmp_path / "index.json").write_text(json.dumps({**manifest, "version": 1}))
    old = open_index(tmp_path)
    assert old.generation is None
    assert_same_answers(answers(old, queries), served)
    build_index(tmp_path, gallery, torch.randn(5, P_IMAGE, generator=generator), query, shard_rows=4)
    assert os.path.isfile(tmp_path / "shard-00000.safetensors")  # kept a round, like any replaced generation
    assert_same_answers(answers(old, queries), served)
    build_index(tmp_path, gallery, torch.randn(6, P_IMAGE, generator=generator), query, shard_rows=4)
    assert not any(name.startswith(("shard-", "shared", "ids")) for name in os.listdir(tmp_path))
    assert len(open_index(tmp_path)) == 6


def test_concurrent_writers_both_finish_and_the_last_switch_wins(generator, tmp_path):
    query, gallery = tower(generator, P_TEXT), tower(generator, P_IMAGE)
    build_index(tmp_path, gallery, torch.randn(5, P_IMAGE, generator=generator), query, shard_rows=4)
    first, second = (IndexWriter.for_posteriors(tmp_path, gallery, query, rows=rows, shard_rows=8)
                     for rows in (6, 7))
    first.embed_shard(0, torch.randn(6, P_IMAGE, generator=generator))
    second.embed_shard(0, torch.randn(7, P_IMAGE, generator=generator))
    first.finish()  # its clean-up leaves the other writer's newer, unfinished generation alone
    second.finish()
    assert len(open_index(tmp_path)) == 7 and open_index(tmp_path).generation == second.generation
    assert os.path.isdir(tmp_path / first.generation)
    with pytest.raises(ValueError, match="'generation' must be a folder name"):
        IndexWriter.for_posteriors(tmp_path, gallery, query, rows=7, generation="../outside")


# ---- search and merge_topk ------------------------------------------------------------------------------

def dyadic(generator, shape, low, high, denominator):
    """Random multiples of 1 / denominator in [low, high): small dyadic numbers, so that every dot product
    and sum of the scoring below is exact in any summation order and on any GEMM path."""
    return torch.randint(low * denominator, high * denominator, shape, generator=generator).double() / denominator


def hadamard_basis():  # [4, 4] orthonormal with entries +-1/2: dyadic, so rotations stay exact
    h = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(h, h) / 2


def dyadic_gallery_and_queries(generator, form, m, n):
    mean = dyadic(generator, (m, D), -3, 3, 2)
    mean[:, 0] = dyadic(generator, (m,), 1, 3, 2)  # no zero vectors
    mean[5], mean[11] = mean[2], mean[2]  # identical items: ties broken by the lower row
    q_mean = dyadic(generator, (n, D), -3, 3, 2)
    q_mean[:, 0] = dyadic(generator, (n,), 1, 3, 2)
    basis, eigvals = hadamard_basis(), torch.tensor([1.0, 0.5, 0.25, 0.125], dtype=torch.float64)
    if form == "kron":
        alpha = dyadic(generator, (m,), 0, 1, 8)
        alpha[5], alpha[11] = alpha[2], alpha[2]
        gallery = EmbeddingDistribution.kron(mean, alpha, (basis * eigvals) @ basis.T, eigvals, basis)
        q_eig = torch.tensor([0.5, 0.25, 0.125, 1.0], dtype=torch.float64)
        queries = EmbeddingDistribution.kron(q_mean, dyadic(generator, (n,), 0, 1, 8), torch.diag(q_eig), q_eig,
                                             torch.eye(D, dtype=torch.float64))
    elif form == "eigen":
        k = dyadic(generator, (m, D), 0, 1, 8)
        k[5], k[11] = k[2], k[2]
        gallery = EmbeddingDistribution.eigen(mean, k, basis)
        queries = EmbeddingDistribution.eigen(q_mean, dyadic(generator, (n, D), 0, 1, 8),
                                              torch.eye(D, dtype=torch.float64))
    else:
        variances = dyadic(generator, (m, D), 0, 1, 8)
        variances[5], variances[11] = variances[2], variances[2]
        gallery = EmbeddingDistribution.diagonal(mean, variances)
        queries = EmbeddingDistribution.diagonal(q_mean, dyadic(generator, (n, D), 0, 1, 8))
    return gallery.precompute(against=queries), queries


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("form", ["kron", "eigen", "diag"])
@pytest.mark.parametrize("score", SCORES)
def test_search_over_shards_equals_topk_over_the_gallery(device, form, score, generator, tmp_path):
    # 19 rows in shards of 4 (the last has 3); k = 9 spans three shards; items 2, 5 and 11 are identical.
    gallery, queries = dyadic_gallery_and_queries(generator, form, m=19, n=6)
    index = save_index(tmp_path, gallery, shard_rows=4, logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
    gallery, queries = gallery.to(device), queries.to(device)  # the index stays on disk; search moves shards
    assert len(index.shards) == 5
    for k in (1, 9, 19):
        expected = topk(queries, gallery, k, score, 0.7, logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
        got = search(index, queries, k, score, 0.7)
        for name, a, b in zip(("values", "rows", "mean", "var"), got, expected):
            assert a.dtype == b.dtype and torch.equal(a, b), (k, name)
    values, rows, _, _ = search(index, queries, 19, score, 0.7)
    for i in range(len(queries)):  # the identical items keep their row order, wherever they rank
        positions = [rows[i].tolist().index(r) for r in (2, 5, 11)]
        assert positions == sorted(positions) and values[i, positions[0]] == values[i, positions[2]]
    # any subset of shards, then merge_topk: the same answer (what the ranks of `retrieve` do)
    parts = [search(index, queries, 9, score, 0.7, shards=block) for block in ([0, 1], [2], [3, 4])]
    assert [p[0].shape[1] for p in parts] == [8, 4, 7]  # k is cut to the rows a block holds
    merged = merge_topk(parts, 9, score, 0.7)
    for a, b in zip(merged, search(index, queries, 9, score, 0.7)):
        assert torch.equal(a, b)


def test_search_errors(generator, tmp_path):
    gallery, queries = dyadic_gallery_and_queries(generator, "kron", m=19, n=3)
    index = save_index(tmp_path, gallery, shard_rows=4)
    with pytest.raises(ValueError, match="'k' must be an int in \\[1, 19\\]"):
        search(index, queries, 20, logit_scale=LOGIT_SCALE)
    with pytest.raises(ValueError, match="'k' must be an int in \\[1, 19\\]"):
        search(index, queries, 0, logit_scale=LOGIT_SCALE)
    with pytest.raises(ValueError, match="'logit_scale' must be given"):
        search(index, queries, 3)
    with pytest.raises(ValueError, match="'queries' must have D = 4"):
        search(index, EmbeddingDistribution.diagonal(torch.ones(2, 3), torch.ones(2, 3)), 3, logit_scale=1.0)
    with pytest.raises(ValueError, match="'number' must be a shard number in \\[0, 5\\)"):
        search(index, queries, 3, logit_scale=1.0, shards=[5])
    with pytest.raises(ValueError, match="'shards' must not repeat"):
        search(index, queries, 3, logit_scale=1.0, shards=[1, 1])


def dense_merge(parts, k, score):
    """Oracle: every candidate sorted by (key descending, index ascending) in Python."""
    rows = []
    for i in range(parts[0][0].shape[0]):
        items = []
        for values, indices, mean, var in parts:
            for j in range(values.shape[1]):
                m, v = mean[i, j].item(), var[i, j].item()
                key = m / math.sqrt(1 + math.pi / 8 * v) if score == "probit" else values[i, j].item()
                items.append((-key, indices[i, j].item(), values[i, j].item(), m, v))
        rows.append(sorted(items)[:k])
    return [torch.tensor([[item[c] for item in row] for row in rows], dtype=torch.int64 if c == 1 else torch.float64)
            for c in (2, 1, 3, 4)]


@pytest.mark.parametrize("score", SCORES)
def test_merge_topk_matches_a_dense_sort(score, generator):
    n, sizes = 5, (4, 7, 1)
    order = torch.randperm(sum(sizes), generator=generator)  # disjoint gallery indices, in no order
    parts, used = [], 0
    for size in sizes:
        mean = torch.randn(n, size, generator=generator, dtype=torch.float64) * 20
        var = torch.rand(n, size, generator=generator, dtype=torch.float64) * 3
        if size > 1:
            mean[:, 0], var[:, 0] = 45.0, 1.0  # one tie per part, across parts; sigmoid(t) rounds to 1 here
        mean[0, -1], var[0, -1] = 50.0, 0.5  # saturated too, but a larger t: must rank first, not tie
        values = {"mean": mean, "pessimistic": mean - 0.6 * var.sqrt(), "optimistic": mean + 0.6 * var.sqrt(),
                  "probit": torch.sigmoid(mean / torch.sqrt(1 + math.pi / 8 * var))}[score]
        parts.append((values, order[used:used + size].expand(n, size).clone(), mean, var))
        used += size
    if score == "probit":
        assert (parts[0][0][0] == 1.0).sum() >= 2  # the saturated probabilities do tie
    for k in (1, 5, 12):
        got = merge_topk(parts, k, score, 0.6)
        expected = dense_merge(parts, k, score)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
        # associative and order-free: merging in steps gives the same answer
        assert all(torch.equal(a, b) for a, b in zip(merge_topk([merge_topk(parts[1:], min(k, 8), score, 0.6),
                                                                 parts[0]], k, score, 0.6), got))


@pytest.mark.parametrize("device", devices, ids=str)
def test_merge_topk_ranks_probit_by_the_kernels_own_logit(device, generator):
    # Crowded probit logits: many candidates within a few float32 ulps, where the logit recomputed in
    # PyTorch orders differently from the kernel's (its 1 + pi/8 var is a fused multiply-add). The whole
    # gallery ranked by the kernel in one call must equal the per-shard calls merged. Unit-vector items
    # and unit statistics make every pair's moments exact on any GEMM shape, so only the merge can differ.
    n, m = 32, 96
    mean = (5 + 1e-6 * torch.randn(n, m, generator=generator, dtype=torch.float64)).float().to(device)
    var = (3 + 1e-6 * torch.randn(n, m, generator=generator, dtype=torch.float64)).float().to(device)
    items, unit = torch.eye(m, device=device), torch.tensor([1.0, 0.0, 0.0], device=device)
    x_stats, y_stats = unit.expand(n, 3).contiguous(), unit.expand(m, 3).contiguous()
    whole = ops.topk_moments(mean, items, x_stats, y_stats, var, items, 1.0, 0.0, 0.0, 10, 3, 1.0)
    parts = []
    for start in range(0, m, 25):
        rows = slice(start, start + 25)
        values, local, part_mean, part_var = ops.topk_moments(mean, items[rows], x_stats, y_stats[rows], var,
                                                              items[rows], 1.0, 0.0, 0.0, 10, 3, 1.0)
        parts.append((values, local + start, part_mean, part_var))
    for a, b in zip(merge_topk(parts, 10, "probit"), whole):
        assert torch.equal(a, b)
    recomputed = mean / torch.sqrt(1 + math.pi / 8 * var)  # what a merge by recomputed logits would rank by
    naive = torch.sort(recomputed, dim=1, descending=True, stable=True).indices[:, :10]
    assert not torch.equal(naive, whole[1])  # the data do tell the two apart


def test_merge_topk_errors():
    part = (torch.zeros(2, 3), torch.arange(3).expand(2, 3), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one gallery index twice"):
        merge_topk([part, part], 2)
    with pytest.raises(ValueError, match="'k' must be in \\[0, 3\\]"):
        merge_topk([part], 4)
    with pytest.raises(ValueError, match="'indices' must be int64"):
        merge_topk([(part[0], part[1].int(), part[2], part[3])], 2)
    with pytest.raises(ValueError, match="'mean' must be \\[N, k_i\\]"):
        merge_topk([(part[0], part[1], part[2][:1], part[3])], 2)
    with pytest.raises(ValueError, match="non-empty sequence"):
        merge_topk([], 2)
    with pytest.raises(ValueError, match="'score'"):
        merge_topk([part], 2, score="median")


# ---- the command line -----------------------------------------------------------------------------------

def write_fit_output(folder, generator, damping="kron", d=D, image_prior=0.5):
    """posterior_image/ and posterior_text/ as `bayesvlm-ext fit` writes them."""
    posteriors = {}
    for name, P, lam in (("image", P_IMAGE, image_prior), ("text", P_TEXT, 0.5)):
        posterior = KronPosterior(spd(P, generator), spd(d, generator),
                                  torch.randn(d, P, generator=generator, dtype=torch.float64), prior_precision=lam,
                                  pseudo_count=2.0, damping=damping)
        posterior.save(os.path.join(folder, f"posterior_{name}"))
        posteriors[name] = KronPosterior.load(os.path.join(folder, f"posterior_{name}"))
    return posteriors


def write_features(path, generator, rows, width, ids=None):
    tensors = {"features": torch.randn(rows, width, generator=generator)}
    if ids is not None:
        tensors["ids"] = ids
    save_file(tensors, path)
    return tensors


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("projected", [False, True], ids=["published", "projected"])
@pytest.mark.parametrize("damping", ["kron", "exact"])
@pytest.mark.parametrize("score", ["mean", "pessimistic", "probit"])
def test_index_and_retrieve_commands_equal_topk(damping, score, projected, generator, tmp_path, capsys):
    posteriors = write_fit_output(tmp_path / "fit", generator, damping)
    gallery = write_features(tmp_path / "gallery.safetensors", generator, 30, P_IMAGE, ids=torch.arange(500, 530))
    queries = write_features(tmp_path / "queries.safetensors", generator, 7, P_TEXT, ids=torch.arange(7) * 10)
    # One shard and one batch: the command embeds and scores exactly what the Python calls below do.
    assert main(["index", "--posterior", str(tmp_path / "fit"), "--tower", "image", "--features",
                 str(tmp_path / "gallery.safetensors"), "--out", str(tmp_path / "index"), "--shard-rows", "64",
                 "--logit-scale", str(LOGIT_SCALE), "--logit-bias", str(LOGIT_BIAS), "--quiet"]
                + ["--projected"] * projected) == 0
    assert "indexed 30 image items" in capsys.readouterr().out
    assert open_index(tmp_path / "index").projected == projected
    assert main(["retrieve", "--index", str(tmp_path / "index"), "--posterior", str(tmp_path / "fit"), "--queries",
                 str(tmp_path / "queries.safetensors"), "--k", "6", "--score", score, "--kappa", "0.5", "--out",
                 str(tmp_path / "results.jsonl"), "--quiet"] + ["--projected"] * projected) == 0
    assert "retrieved the top 6 of 30 image items" in capsys.readouterr().out
    lines = read_jsonl(tmp_path / "results.jsonl")
    q = posteriors["text"].embed(queries["features"])
    g = posteriors["image"].embed(gallery["features"], against=posteriors["text"])
    values, indices, mean, var = topk(q, g, 6, score, 0.5, logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS,
                                      variant="projected" if projected else None)
    assert [line["query"] for line in lines] == [0, 10, 20, 30, 40, 50, 60]
    for i, line in enumerate(lines):
        assert list(line) == ["query", "ids", "scores", "mean", "variance"]
        assert line["ids"] == (indices[i] + 500).tolist()
        assert line["scores"] == values[i].tolist()
        assert line["mean"] == mean[i].tolist() and line["variance"] == var[i].tolist()


def test_command_errors(generator, tmp_path, capsys):
    fit = str(tmp_path / "fit")
    write_fit_output(fit, generator)
    write_features(tmp_path / "gallery.safetensors", generator, 12, P_IMAGE)
    write_features(tmp_path / "narrow.safetensors", generator, 12, P_IMAGE - 1)
    write_features(tmp_path / "queries.safetensors", generator, 3, P_TEXT)
    index = str(tmp_path / "index")
    base = ["index", "--posterior", fit, "--tower", "image", "--out", index, "--quiet"]

    def fails(argv, message, status=1):
        command_fails(main, capsys, argv, message, status)

    fails([*base, "--features", str(tmp_path / "absent.safetensors")], "--features", status=2)
    fails([*base, "--features", str(tmp_path / "gallery.safetensors"), "--shard-rows", "0"], "--shard-rows", status=2)
    fails([*base, "--features", str(tmp_path / "narrow.safetensors")], "the features are [N, 5] but the image "
          "posterior")
    fails(["index", "--posterior", str(tmp_path), "--tower", "image", "--out", index, "--features",
           str(tmp_path / "gallery.safetensors")], "missing posterior_image/")
    (tmp_path / "notes.safetensors").write_bytes(b"not a safetensors file")
    fails([*base, "--features", str(tmp_path / "notes.safetensors")], "not a safetensors file")
    fails([*base, "--tower", "text", "--images", str(tmp_path)], "--images needs --model", status=2)
    assert main([*base, "--features", str(tmp_path / "gallery.safetensors"), "--shard-rows", "5"]) == 0
    capsys.readouterr()

    retrieve = ["retrieve", "--index", index, "--posterior", fit, "--queries", str(tmp_path / "queries.safetensors"),
                "--out", str(tmp_path / "out.jsonl"), "--quiet"]
    fails([*retrieve, "--k", "3"], "--logit-scale is needed")
    fails([*retrieve, "--k", "0", "--logit-scale", "1"], "--k must be at least 1", status=2)
    fails([*retrieve, "--k", "13", "--logit-scale", "1"], "--k 13 is larger than the gallery (12 items")
    fails([*retrieve[:5], "--queries", str(tmp_path / "gallery.safetensors"), "--out", str(tmp_path / "x.jsonl"),
           "--k", "2", "--logit-scale", "1"], "--queries: the features are [N, 6] but the text posterior")
    other = str(tmp_path / "other")
    write_fit_output(other, generator, image_prior=0.25)  # another fit: different prior precision and factors
    fails([*retrieve[:3], "--posterior", other, *retrieve[5:], "--k", "2", "--logit-scale", "1"],
          "built with another gallery posterior")
    same_hyper = str(tmp_path / "same_hyper")
    write_fit_output(same_hyper, generator)  # the same hyper-parameters, other factors
    fails([*retrieve[:3], "--posterior", same_hyper, *retrieve[5:], "--k", "2", "--logit-scale", "1"],
          "covariance matrix 'shared' does not match")
    narrow = str(tmp_path / "narrow_fit")
    write_fit_output(narrow, generator, d=D - 1)
    fails([*retrieve[:3], "--posterior", narrow, *retrieve[5:], "--k", "2", "--logit-scale", "1"], "has D = 4")
    manifest = tmp_path / "index" / "index.json"
    manifest.write_text(manifest.read_text().replace('"version": 2', '"version": 7'))
    fails([*retrieve, "--k", "2", "--logit-scale", "1"], "format version 7 is not supported")
    assert not (tmp_path / "out.jsonl").exists()  # nothing written by a failed run


def index_and_query_files(tmp_path, generator):
    """(fit directory, `index` arguments without --features, `retrieve` arguments without --out)."""
    fit = str(tmp_path / "fit")
    write_fit_output(fit, generator)
    write_features(tmp_path / "gallery.safetensors", generator, 12, P_IMAGE, ids=torch.arange(12) + 70)
    write_features(tmp_path / "queries.safetensors", generator, 5, P_TEXT)
    index = ["index", "--posterior", fit, "--tower", "image", "--out", str(tmp_path / "index"), "--shard-rows", "5",
             "--logit-scale", str(LOGIT_SCALE), "--quiet"]
    retrieve = ["retrieve", "--index", str(tmp_path / "index"), "--posterior", fit, "--queries",
                str(tmp_path / "queries.safetensors"), "--k", "4", "--batch-size", "2", "--quiet"]
    return fit, index, retrieve


def test_index_command_failing_rebuild_keeps_the_old_index(generator, tmp_path, capsys):
    _, index, retrieve = index_and_query_files(tmp_path, generator)
    assert main([*index, "--features", str(tmp_path / "gallery.safetensors")]) == 0
    assert main([*retrieve, "--out", str(tmp_path / "before.jsonl")]) == 0
    before = snapshot(tmp_path / "index")
    bad = write_features(tmp_path / "bad.safetensors", generator, 14, P_IMAGE)
    bad["features"][11, 0] = float("-inf")  # shard 2 of 3: shards 0 and 1 are written first
    save_file(bad, tmp_path / "bad.safetensors")
    capsys.readouterr()
    command_fails(main, capsys, [*index, "--features", str(tmp_path / "bad.safetensors")],
                  "the feature row of gallery item 11 holds Inf or NaN")
    assert snapshot(tmp_path / "index") == before  # byte for byte: no new generation, no temporary file
    assert main([*retrieve, "--out", str(tmp_path / "after.jsonl")]) == 0
    assert (tmp_path / "after.jsonl").read_bytes() == (tmp_path / "before.jsonl").read_bytes()
    # a good rebuild switches over and removes nothing the old index needed until the next round
    assert main([*index, "--features", str(tmp_path / "gallery.safetensors"), "--shard-rows", "4"]) == 0
    assert len(open_index(tmp_path / "index").shards) == 3


def test_retrieve_out_is_written_through_symlinks_and_never_replaces_other_files(generator, tmp_path, capsys):
    import stat

    _, index, retrieve = index_and_query_files(tmp_path, generator)
    assert main([*index, "--features", str(tmp_path / "gallery.safetensors")]) == 0
    assert main([*retrieve, "--out", str(tmp_path / "plain.jsonl")]) == 0
    expected = (tmp_path / "plain.jsonl").read_bytes()
    results = tmp_path / "results"
    results.mkdir()
    (results / "target.jsonl").write_text("old\n")
    os.symlink(results / "target.jsonl", tmp_path / "link.jsonl")
    assert main([*retrieve, "--out", str(tmp_path / "link.jsonl")]) == 0
    assert os.path.islink(tmp_path / "link.jsonl")  # the link stays a link; its target got the results
    assert (results / "target.jsonl").read_bytes() == expected
    capsys.readouterr()

    def listing():
        return sorted(os.listdir(tmp_path)), sorted(os.listdir(results))

    os.mkfifo(results / "pipe")  # not a regular file, like a device node: refused before any work
    unchanged = listing()
    command_fails(main, capsys, [*retrieve, "--out", str(results / "pipe")], "is not a regular file", status=2)
    assert stat.S_ISFIFO(os.lstat(results / "pipe").st_mode)
    command_fails(main, capsys, [*retrieve, "--out", str(results)], "is a directory; give a file name", status=2)
    assert listing() == unchanged  # no temporary file anywhere

    # NaN in the second batch of queries: a clear error; the old results stay, no temporary file is left.
    queries = write_features(tmp_path / "nan.safetensors", generator, 5, P_TEXT)
    queries["features"][3, 1] = float("nan")
    save_file(queries, tmp_path / "nan.safetensors")
    unchanged = listing()
    command_fails(main, capsys, [*retrieve[:5], "--queries", str(tmp_path / "nan.safetensors"), *retrieve[7:],
                                 "--out", str(results / "target.jsonl")],
                  "the feature row of query 3 holds Inf or NaN")
    assert listing() == unchanged and (results / "target.jsonl").read_bytes() == expected


def tiny_open_clip_name(folder):
    """Registers a tiny open_clip config (32-pixel images in 8-pixel patches, width 32, embeddings of 12)
    under a name, so that the command builds it like any named model, in milliseconds."""
    open_clip = pytest.importorskip("open_clip")
    config = {"embed_dim": 12, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "Tiny-Index-Test.json"), "w") as f:
        json.dump(config, f)
    open_clip.add_model_config(folder)
    return "Tiny-Index-Test"


def test_index_command_from_images_with_an_open_clip_model(generator, tmp_path, capsys):
    import open_clip
    from PIL import Image

    from bayesvlm_ext.capture import capture, find_projection
    from bayesvlm_ext.fit import unnormalised_encoder

    name = tiny_open_clip_name(str(tmp_path / "configs"))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (200, 200, 20), (10, 10, 10)]):
        Image.new("RGB", (40 + 8 * i, 32), rgb).save(folder / f"{i}.png")
    lines = [json.dumps({"image": f"images/{i}.png"}) for i in range(5)]
    (tmp_path / "images.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(3)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.eval()
    site = find_projection(model, "image")
    weight = site.layer()[0].double()  # [D, P]
    fit = tmp_path / "fit"
    KronPosterior(spd(weight.shape[1], generator), spd(weight.shape[0], generator), weight,
                  prior_precision=0.5).save(fit / "posterior_image")
    KronPosterior(spd(8, generator), spd(weight.shape[0], generator),
                  torch.randn(weight.shape[0], 8, generator=generator, dtype=torch.float64),
                  prior_precision=0.5).save(fit / "posterior_text")
    command = ["index", "--posterior", str(fit), "--tower", "image", "--model", name, "--quiet"]
    assert main([*command, "--images", str(tmp_path / "images.jsonl"), "--seed", "3", "--out", str(tmp_path / "index"),
                 "--shard-rows", "3", "--batch-size", "2"]) == 0
    captured = capsys.readouterr()
    assert "random-initialised" in captured.err and "indexed 5 image items" in captured.out
    index = open_index(tmp_path / "index")
    assert index.logit_scale == float(model.logit_scale.detach()) and index.logit_bias == 0.0
    assert index.ids_of(torch.tensor([0, 4])) == ["images/0.png", "images/4.png"]
    image_posterior, text_posterior = (KronPosterior.load(fit / f"posterior_{t}") for t in ("image", "text"))
    encode = unnormalised_encoder(model, "image")
    for number, info in enumerate(index.shards):  # the same features, embedded in the same batches of 2
        parts = []
        for b0 in range(info.start, info.stop, 2):
            pixels = torch.stack([preprocess(Image.open(folder / f"{i}.png").convert("RGB"))
                                  for i in range(b0, min(b0 + 2, info.stop))])
            with torch.no_grad():
                features = capture(encode, pixels, site).features
            parts.append(image_posterior.embed(features, against=text_posterior))
        for field in ("mean", "alpha", "sq_norm", "cross_quad"):
            expected = torch.cat([getattr(part, field) for part in parts])
            assert torch.equal(getattr(index.shard(number), field), expected), field
    # a folder lists its images by name; an unreadable one is reported and left out (tests/test_index_images.py)
    (folder / "2.png").write_bytes(b"not an image")
    assert main([*command, "--images", str(folder), "--out", str(tmp_path / "broken")]) == 0
    assert f"image {folder / '2.png'}: cannot be read" in capsys.readouterr().err
    assert open_index(tmp_path / "broken").ids_of(torch.arange(4)) == ["0.png", "1.png", "3.png", "4.png"]
    assert main([*command, "--tower", "text", "--images", str(folder), "--out", str(tmp_path / "text")]) == 1
    assert "use it with --tower image" in capsys.readouterr().err


def test_index_and_retrieve_under_torchrun_match_one_process(generator, tmp_path, capsys):
    # 23 gallery rows in 5 shards (rank 0: shards 0-1, 10 rows; rank 1: shards 2-4, 13 rows); k = 12 is
    # more than rank 0 holds, so its result is padded for the gather; queries in batches of 4 (the last 1).
    fit = str(tmp_path / "fit")
    write_fit_output(fit, generator)
    write_features(tmp_path / "gallery.safetensors", generator, 23, P_IMAGE, ids=torch.arange(23) * 3 + 1)
    write_features(tmp_path / "queries.safetensors", generator, 9, P_TEXT)
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    for name, launcher in (("one", None), ("two", torchrun)):
        printed = run_command(["index", "--posterior", fit, "--tower", "image", "--features",
                               str(tmp_path / "gallery.safetensors"), "--out", str(tmp_path / name), "--shard-rows",
                               "5", "--batch-size", "3", "--logit-scale", str(LOGIT_SCALE), "--quiet"],
                              launcher, capsys)
        assert "in 5 shards" in printed and ("2 processes" in printed) == (name == "two")
        printed = run_command(["retrieve", "--index", str(tmp_path / name), "--posterior", fit, "--queries",
                               str(tmp_path / "queries.safetensors"), "--k", "12", "--score", "probit", "--out",
                               str(tmp_path / f"{name}.jsonl"), "--batch-size", "4", "--quiet"], launcher, capsys)
        assert ("2 processes" in printed) == (name == "two")
    # Both ranks wrote into the one generation rank 0 named; its files equal the one-process run's byte for byte.
    generations = {name: open_index(tmp_path / name).generation for name in ("one", "two")}
    assert sorted(os.listdir(tmp_path / "two")) == sorted([".index.lock", "index.json", generations["two"]])
    files = sorted(os.listdir(tmp_path / "one" / generations["one"]))
    assert files == sorted(os.listdir(tmp_path / "two" / generations["two"])) and "shard-00004.safetensors" in files
    for file in files:
        assert (tmp_path / "one" / generations["one"] / file).read_bytes() == \
            (tmp_path / "two" / generations["two"] / file).read_bytes(), file
    manifests = [json.loads((tmp_path / name / "index.json").read_text()) for name in ("one", "two")]
    assert {**manifests[0], "generation": None} == {**manifests[1], "generation": None}
    one, two = (tmp_path / "one.jsonl").read_bytes(), (tmp_path / "two.jsonl").read_bytes()
    assert one == two
    lines = read_jsonl(tmp_path / "one.jsonl")
    assert len(lines) == 9 and all(len(line["ids"]) == 12 for line in lines)
    # and both equal search() on the index in this process, merged over its shards, for the same batches of 4
    # queries: BLAS (MKL on AVX-512) may round a query's row differently in a GEMM with another row count
    index = open_index(tmp_path / "one")
    posterior = KronPosterior.load(os.path.join(fit, "posterior_text"))
    with safe_open(tmp_path / "queries.safetensors", framework="pt") as f:
        features = f.get_tensor("features")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command ran
    try:
        found = [search(index, posterior.embed(features[b0:b0 + 4]), 12, "probit") for b0 in range(0, 9, 4)]
    finally:
        torch.set_num_threads(threads)
    values, rows = torch.cat([batch[0] for batch in found]), torch.cat([batch[1] for batch in found])
    assert [line["ids"] for line in lines] == index.ids_of(rows)
    assert [line["scores"] for line in lines] == values.tolist()

    # A rewrite that fails on rank 1 (an Inf in its block, shards 2-4) leaves the two-process index as it was:
    # rank 0 removes the generation both ranks wrote into.
    before = snapshot(tmp_path / "two")
    bad = write_features(tmp_path / "bad.safetensors", generator, 23, P_IMAGE)
    bad["features"][17, 3] = float("inf")
    save_file(bad, tmp_path / "bad.safetensors")
    result = subprocess.run([sys.executable, *torchrun, "-m", "bayesvlm_ext", "index", "--posterior", fit, "--tower",
                             "image", "--features", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "two"),
                             "--shard-rows", "5", "--quiet"], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    assert "the feature row of gallery item 17 holds Inf or NaN" in result.stderr and "(rank 1)" in result.stderr
    assert snapshot(tmp_path / "two") == before
