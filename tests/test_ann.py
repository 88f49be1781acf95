"""Approximate candidates, exact scores (SPEC.md section 7, bayesvlm_ext.index.ann): FAISS proposes, the kernel
scores. Exactness of the re-scored candidates, recall on planted neighbours, degenerate rows, snapshots,
errors, a missing FAISS, and `index --ann` / `retrieve --candidates` under torchrun."""

import math
import os
import sys

import pytest
import torch
from safetensors.torch import save_file
from testing import TORCHRUN_TWO, run_command, spd

from bayesvlm_ext import EmbeddingDistribution, KronPosterior, cosine_moments, open_index, search, topk
from bayesvlm_ext.cli import main
from bayesvlm_ext.index import build_index, save_index
from bayesvlm_ext.index.ann import (FLAT_BELOW, AnnSpec, ann_vectors, propose, query_vectors, score_values,
                                   search_params)
from bayesvlm_ext.retrieval import Score

faiss = pytest.importorskip("faiss")

D, P = 16, 12
LOGIT_SCALE, LOGIT_BIAS = math.log(20.0), -1.0
SCORES = ["mean", "pessimistic", "optimistic", "probit"]
KINDS = ["ivf-flat", "ivf-pq", "hnsw"]


def posteriors(generator, d=D, p=P):
    def one():
        return KronPosterior(spd(p, generator), spd(d, generator), torch.randn(d, p, generator=generator,
                             dtype=torch.float64), prior_precision=5.0, pseudo_count=2.0)
    return one(), one()


def clustered(generator, rows, width, clusters=40, spread=0.3):
    """Features around `clusters` centres: the structure real embeddings have and IVF relies on."""
    centres = torch.randn(clusters, width, generator=generator)
    return centres[torch.randint(clusters, (rows,), generator=generator)] + spread * torch.randn(rows, width,
                                                                                                generator=generator)


@pytest.fixture(scope="module")
def gallery_and_queries():
    """A kron-form gallery of 2600 items in shards of 1300 (every shard past FLAT_BELOW) and 30 queries."""
    generator = torch.Generator().manual_seed(11)
    image, text = posteriors(generator)
    features = clustered(generator, 2600, P)
    gallery = image.embed(features, against=text)
    queries = text.embed(features[torch.randperm(2600, generator=generator)[:30]] + 0.05 * torch.randn(30, P,
                         generator=generator))
    return gallery, queries


@pytest.mark.parametrize("kind", KINDS)
def test_every_item_proposed_gives_the_exact_search(kind, gallery_and_queries, tmp_path):
    # With C = the shard size every item is a candidate (FAISS' short lists filled with the rows it left out):
    # the result must be the exact streaming search, rows and order included.
    gallery, queries = gallery_and_queries
    index = save_index(tmp_path, gallery, shard_rows=1300, ann=kind, logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
    assert index.ann == AnnSpec(kind) and all(len(s) >= FLAT_BELOW for s in index.shards)
    assert isinstance(index.ann_index(0), faiss.IndexHNSW if kind == "hnsw" else faiss.IndexIVF)
    for score in SCORES:
        exact = search(index, queries, 12, score, 0.7)
        every = search(index, queries, 12, score, 0.7, candidates=1300, **({"nprobe": 1} if kind != "hnsw" else {}))
        assert torch.equal(every[1], exact[1]), score
        for a, b in zip(every, exact):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("score", SCORES)
def test_rescored_candidates_carry_their_exact_scores_in_exact_order(kind, score, gallery_and_queries, tmp_path):
    gallery, queries = gallery_and_queries
    index = save_index(tmp_path, gallery, shard_rows=1300, ann=kind, logit_scale=LOGIT_SCALE, logit_bias=LOGIT_BIAS)
    values, rows, mean, var = search(index, queries, 10, score, 0.7, candidates=40)
    assert rows.shape == (30, 10) and all(len(set(r.tolist())) == 10 for r in rows)
    dense_mean, dense_var = cosine_moments(queries, gallery, LOGIT_SCALE, LOGIT_BIAS)  # float64: the oracle
    torch.testing.assert_close(mean, dense_mean.gather(1, rows).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, dense_var.gather(1, rows).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values, score_values(mean, var, Score(score), 0.7))
    key = mean / torch.sqrt(1 + math.pi / 8 * var) if score == "probit" else values
    assert bool((key[:, :-1] >= key[:, 1:]).all())  # sorted by the exact score
    # the returned rows are exactly the 10 best of the proposed ones in the exact ranking of the whole gallery
    _, ranking, _, _ = search(index, queries, len(gallery), score, 0.7)
    vectors = query_vectors(queries)
    proposed = [set() for _ in range(30)]
    for number, shard in enumerate(index.shards):
        structure = index.ann_index(number)
        local = propose(structure, vectors, 40, search_params(structure, index.ann, 40, None, None))
        for i in range(30):
            proposed[i] |= set((local[i] + shard.start).tolist())
    for i in range(30):
        assert rows[i].tolist() == [r for r in ranking[i].tolist() if r in proposed[i]][:10], i


@pytest.mark.parametrize("kind", KINDS)
def test_planted_neighbours_are_found(kind, tmp_path):
    # Each query is a near-copy of one gallery item's features: the mean top-1 is that item.
    generator = torch.Generator().manual_seed(3)
    image, text = posteriors(generator, d=32, p=32)
    features = clustered(generator, 4000, 32, clusters=60)
    planted = torch.randperm(4000, generator=generator)[:50]
    # the text tower embeds the queries; with both towers' weights different, plant in embedding space
    gallery = image.embed(features, against=text)
    noise = 1e-3 * torch.randn(50, 32, generator=generator).to(gallery.mean.dtype)
    queries = EmbeddingDistribution(gallery.mean[planted] + noise, text.embed(features[:50]).covariance)
    index = save_index(tmp_path, gallery, shard_rows=2000, ann=kind, logit_scale=LOGIT_SCALE)
    _, exact_rows, _, _ = search(index, queries, 1, "mean")
    # 100 candidates of 2000 per shard (5 %): PQ's 4 bytes per item (D = 32) rank too coarsely for 20 (88 %)
    _, rows, _, _ = search(index, queries, 1, "mean", candidates=100)
    assert torch.equal(exact_rows[:, 0], planted) and torch.equal(rows[:, 0], planted)


def test_the_ann_vectors_rank_as_the_mean_logit(gallery_and_queries):
    # mean_ij = s (x_i . v_j) / sqrt(E||x_i||^2) + beta: for a query, x . v_j orders j as the mean logit does
    gallery, queries = gallery_and_queries
    vectors = torch.from_numpy(ann_vectors(gallery)).double()  # float32 values, compared in float64
    mean, _ = cosine_moments(queries.to(torch.float64), gallery.to(torch.float64), LOGIT_SCALE, LOGIT_BIAS)
    x = queries.mean.double()
    inv_norm_x = ((x * x).sum(1) + queries.trace().double()).rsqrt()
    torch.testing.assert_close(math.exp(LOGIT_SCALE) * (x @ vectors.T) * inv_norm_x[:, None] + LOGIT_BIAS, mean,
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_rows_never_crash_and_rank_last(kind, tmp_path):
    generator = torch.Generator().manual_seed(5)
    mean = clustered(generator, 1500, D).double()
    variances = 0.01 * torch.rand(1500, D, generator=generator, dtype=torch.float64)
    mean[[3, 700]], variances[[3, 700]] = 0.0, 0.0  # zero embeddings: no direction, NaN scores
    gallery = EmbeddingDistribution.diagonal(mean, variances)
    queries = EmbeddingDistribution.diagonal(mean[[3, 10, 20]].clone(), variances[[3, 10, 20]].clone())
    index = save_index(tmp_path, gallery, ann=kind, logit_scale=LOGIT_SCALE)
    for score in SCORES:
        values, rows, _, _ = search(index, queries, 1500, score, candidates=1500)  # k = the gallery
        assert all(sorted(r.tolist()) == list(range(1500)) for r in rows)
        assert values[1:, -2:].isnan().all() and set(rows[1:, -2:].flatten().tolist()) == {3, 700}
        assert values[0].isnan().all()  # the zero query: every score NaN, rows in index order
        assert rows[0].tolist() == list(range(1500))


def test_an_opened_index_searches_its_snapshot_after_rewrites(gallery_and_queries, tmp_path):
    gallery, queries = gallery_and_queries
    index = save_index(tmp_path, gallery, shard_rows=1300, ann="ivf-flat", logit_scale=LOGIT_SCALE)
    before = search(index, queries, 5, "probit", candidates=30)  # reads shard 0's and 1's structures
    fresh = open_index(tmp_path)
    for _ in range(2):  # the second rewrite removes the generation `index` and `fresh` read
        save_index(tmp_path, gallery[:1500], shard_rows=1500, ann="hnsw", logit_scale=LOGIT_SCALE)
    assert not os.path.isdir(tmp_path / index.generation)
    for opened in (index, fresh):  # `fresh` reads its FAISS structures only now, from the mapped files
        for a, b in zip(search(opened, queries, 5, "probit", candidates=30), before):
            assert torch.equal(a, b)


def test_search_and_build_errors(gallery_and_queries, tmp_path):
    gallery, queries = gallery_and_queries
    plain = save_index(tmp_path / "plain", gallery[:100], logit_scale=LOGIT_SCALE)
    with pytest.raises(ValueError, match="'candidates' needs an index built with an ANN structure"):
        search(plain, queries, 5, candidates=10)
    with pytest.raises(ValueError, match="'nprobe' and 'ef_search' tune the approximate search"):
        search(plain, queries, 5, nprobe=4)
    with pytest.raises(ValueError, match="has no ANN structure"):
        plain.ann_index(0)
    ivf = save_index(tmp_path / "ivf", gallery[:100], ann={"kind": "ivf-flat", "nprobe": 3}, logit_scale=1.0)
    assert ivf.ann.nprobe == 3
    with pytest.raises(ValueError, match="'candidates' must be >= k = 5"):
        search(ivf, queries, 5, candidates=4)
    with pytest.raises(ValueError, match="'ef_search' applies to HNSW"):
        search(ivf, queries, 5, candidates=5, ef_search=10)
    with pytest.raises(ValueError, match="'candidates' must be an int >= 1"):
        search(ivf, queries, 5, candidates=0)
    hnsw = save_index(tmp_path / "hnsw", gallery[:100], ann="hnsw", logit_scale=1.0)
    with pytest.raises(ValueError, match="'nprobe' applies to IVF"):
        search(hnsw, queries, 5, candidates=5, nprobe=2)
    with pytest.raises(ValueError, match="'ann' must name one of ivf-flat, ivf-pq, hnsw"):
        save_index(tmp_path / "bad", gallery[:10], ann="lsh")
    with pytest.raises(ValueError, match="'nlist' must be an int >= 1"):
        AnnSpec("ivf-flat", nlist=0)
    with pytest.raises(ValueError, match="options among"):
        AnnSpec.parse({"kind": "hnsw", "efsearch": 3})
    with pytest.raises(ValueError, match="'pq_m' must divide D = 16"):
        save_index(tmp_path / "pq", gallery[:1200], ann={"kind": "ivf-pq", "pq_m": 5})
    assert not os.path.exists(tmp_path / "pq" / "index.json")  # the failed build left nothing published


def test_a_missing_faiss_is_a_clear_error_and_exact_search_still_works(gallery_and_queries, tmp_path, monkeypatch):
    gallery, queries = gallery_and_queries
    index = save_index(tmp_path / "ann", gallery[:1200], ann="ivf-flat", logit_scale=LOGIT_SCALE)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ImportError, match="needs FAISS: pip install faiss-cpu"):
        save_index(tmp_path / "new", gallery[:10], ann="hnsw")
    assert not os.path.exists(tmp_path / "new" / "index.json")
    reopened = open_index(tmp_path / "ann")  # opening maps the files; only the approximate search needs FAISS
    with pytest.raises(ImportError, match="needs FAISS"):
        search(reopened, queries, 5, candidates=10)
    exact = search(reopened, queries, 5, "probit")
    expected = topk(queries, gallery[:1200], 5, "probit", logit_scale=LOGIT_SCALE)
    assert torch.equal(exact[1], expected[1])
    assert search(index, queries, 5)[1].shape == (30, 5)


def test_build_index_with_ann_from_features(tmp_path):
    generator = torch.Generator().manual_seed(9)
    image, text = posteriors(generator)
    features = clustered(generator, 1100, P)
    index = build_index(tmp_path, image, features, text, ann="ivf-pq", logit_scale=LOGIT_SCALE)
    queries = text.embed(features[:4])
    exact = search(index, queries, 3, "probit")
    every = search(index, queries, 3, "probit", candidates=1100)
    assert torch.equal(exact[1], every[1])
    assert index.ann_index(0).ntotal == 1100


def write_posteriors(folder, generator):
    for name, posterior in zip(("image", "text"), posteriors(generator)):
        posterior.save(os.path.join(folder, f"posterior_{name}"))


def test_index_ann_and_retrieve_candidates_one_process_equals_two(tmp_path, capsys):
    generator = torch.Generator().manual_seed(13)
    fit = str(tmp_path / "fit")
    write_posteriors(fit, generator)
    save_file({"features": clustered(generator, 3000, P)}, tmp_path / "gallery.safetensors")
    save_file({"features": clustered(generator, 9, P)}, tmp_path / "queries.safetensors")
    run_command(["index", "--posterior", fit, "--tower", "image", "--features", str(tmp_path / "gallery.safetensors"),
                 "--out", str(tmp_path / "index"), "--shard-rows", "1100", "--ann", "ivf-flat", "--ann-nprobe", "4",
                 "--logit-scale", str(LOGIT_SCALE), "--quiet"])
    index = open_index(tmp_path / "index")
    assert index.ann.kind == "ivf-flat" and index.ann.nprobe == 4 and len(index.shards) == 3
    exact = ["retrieve", "--index", str(tmp_path / "index"), "--posterior", fit, "--queries",
             str(tmp_path / "queries.safetensors"), "--k", "8", "--score", "probit", "--batch-size", "4", "--quiet"]
    retrieve = [*exact, "--candidates", "20"]
    for name, launcher in (("one", None), ("two", TORCHRUN_TWO)):
        run_command([*retrieve, "--out", str(tmp_path / f"{name}.jsonl")], launcher)
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()
    # the options are checked before any work
    capsys.readouterr()
    for extra, message in ((["--candidates", "5"], "--candidates 5 must be at least --k 8"),
                           (["--ef-search", "9"], "give --candidates too")):
        with pytest.raises(SystemExit):
            main([*exact, "--out", str(tmp_path / "x.jsonl"), *extra])
        assert message in capsys.readouterr().err
    assert main([*retrieve, "--ef-search", "30", "--out", str(tmp_path / "x.jsonl")]) == 1
    assert "--ef-search applies to HNSW" in capsys.readouterr().err
    plain = ["index", "--posterior", fit, "--tower", "image", "--features", str(tmp_path / "gallery.safetensors"),
             "--out", str(tmp_path / "plain"), "--logit-scale", "1.0", "--quiet"]
    with pytest.raises(SystemExit):
        main([*plain, "--ann-nlist", "8"])
    assert "--ann-nlist apply to --ann only" in capsys.readouterr().err
    assert main(plain) == 0
    capsys.readouterr()
    assert main([*retrieve[:2], str(tmp_path / "plain"), *retrieve[3:], "--out", str(tmp_path / "y.jsonl")]) == 1
    assert "--candidates needs an index built with `index --ann`" in capsys.readouterr().err
