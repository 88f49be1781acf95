"""Degenerate but legal input to the top-k path (SPEC.md section 12): zero, NaN and infinite rows.

A NaN score ranks after every other score (-inf included), ties by the lower index, so a top-k over a
gallery of at least k rows returns exactly k distinct valid rows per query, the same on the compiled
CPU kernel, the CUDA kernel, the PyTorch reference and merge_topk. Each test here failed (or crashed
the process) before that rule was implemented.
"""

import math

import pytest
import torch
from testing import devices, error_budget, spd

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, _torch_impl, ops, topk
from bayesvlm_ext.retrieval import merge_topk

SCORES = ["mean", "pessimistic", "optimistic", "probit"]
SCORE_CODE = {name: code for code, name in enumerate(SCORES)}


def brute_force_order(key: torch.Tensor) -> torch.Tensor:  # [N, C] -> [N, C]
    """SPEC.md section 12 by hand: non-NaN keys descending, then NaN keys, each tie by the lower column."""
    rows = []
    for row in key.tolist():
        rows.append(sorted(range(len(row)), key=lambda j: (math.isnan(row[j]), -row[j] if not math.isnan(row[j])
                                                           else 0.0, j)))
    return torch.tensor(rows, dtype=torch.int64).reshape(key.shape)


def unit_stats(v: torch.Tensor) -> torch.Tensor:  # [R, D] -> [R, 3]: 1/||v|| (inf for a zero row), alpha, quad 1
    stats = torch.ones(v.shape[0], 3, dtype=torch.float32 if v.dtype != torch.float64 else torch.float64,
                       device=v.device)
    stats[:, 0] = v.double().norm(dim=1).reciprocal().to(stats.dtype)
    return stats


def test_topk_order_puts_nan_after_minus_infinity():
    nan, inf = math.nan, math.inf
    key = torch.tensor([[nan, 1.0, -inf, 0.0, nan, -0.0, inf, -inf, 1.0],
                        [nan, nan, nan, nan, nan, nan, nan, nan, nan],
                        [-inf, nan, -inf, 2.0, -0.0, 0.0, nan, 3.0, -1.0]])
    assert torch.equal(_torch_impl.topk_order(key), brute_force_order(key))
    generator = torch.Generator().manual_seed(0)
    specials = torch.tensor([nan, inf, -inf, 0.0, -0.0, 1.0, -1.0, 2.0])
    key = specials[torch.randint(0, len(specials), (50, 40), generator=generator)]
    assert torch.equal(_torch_impl.topk_order(key), brute_force_order(key))


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_zero_gallery_row_with_k_equal_to_the_gallery(device, score):
    # A blank image can give an all-zero feature row: its cosine is NaN. With k = M the kernel used to
    # read past its candidate buffer (a segfault) because a NaN never passed its threshold.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 8, generator=generator).to(device)
    y = torch.randn(200, 8, generator=generator)
    y[5] = 0.0
    y = y.to(device)
    m = y.shape[0]
    values, indices, mean, var = ops.topk_moments(x, y, unit_stats(x), unit_stats(y), None, None, 10.0, 0.0, 0.1,
                                                  m, SCORE_CODE[score], 1.0)
    for row in indices.cpu():
        assert sorted(row.tolist()) == list(range(m))
    assert bool((indices[:, -1] == 5).all()), "the NaN row must rank last"
    assert bool(values[:, -1].isnan().all()) and not bool(values[:, :-1].isnan().any())
    expected = _torch_impl.topk_moments(x, y, unit_stats(x), unit_stats(y), None, None, 10.0, 0.0, 0.1, m,
                                      SCORE_CODE[score], 1.0, chunk=64)
    assert torch.equal(indices, expected[1])


@pytest.mark.parametrize("device", devices, ids=str)
def test_zero_query_row_gets_its_own_answer(device):
    # A zero query with k = 1 used to return the previous query's id and score: its list stayed empty
    # and the merge read stale memory. All its scores are NaN, so its answer is gallery rows 0, 1, ...
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, 8, generator=generator)
    x[1] = 0.0
    x = x.to(device)
    y = torch.randn(50, 8, generator=generator).to(device)
    for k in (1, 3, 50):
        values, indices, _, _ = ops.topk_moments(x, y, unit_stats(x), unit_stats(y), None, None, 10.0, 0.0, 0.1,
                                                 k, 0, 1.0)
        assert indices[1].tolist() == list(range(k))
        assert bool(values[1].isnan().all())
        assert not bool(values[[0, 2]].isnan().any())


@pytest.mark.parametrize("device", devices, ids=str)
def test_non_finite_scalars_are_refused(device):
    x = torch.randn(2, 4, device=device)
    stats = unit_stats(x)
    for name, args in (("scale", (math.nan, 0.0, 0.1)), ("bias", (1.0, math.inf, 0.1)),
                       ("trace_cross", (1.0, 0.0, -math.inf))):
        with pytest.raises(ValueError, match=f"'{name}' must be"):
            ops.topk_moments(x, x, stats, stats, None, None, *args, 1, 0, 1.0)
        with pytest.raises(ValueError, match=f"'{name}' must be"):
            ops.pairwise_moments(x, x, stats, stats, None, None, *args, 0)
        if bayesvlm_ext.has_extension():  # the compiled op checks too: it must never run with them
            with pytest.raises(ValueError, match=f"'{name}' must be finite"):
                torch.ops.bayesvlm_ext.topk_moments(x, x, stats, stats, None, None, *args, 1, 0, 1.0)
            with pytest.raises(ValueError, match=f"'{name}' must be finite"):
                torch.ops.bayesvlm_ext.pairwise_moments(x, x, stats, stats, None, None, *args, 0)


def special_gallery(generator, m=300, d=6, dtype=torch.float32):
    """(x [4, d], y [m, d], x_stats, y_stats): gallery rows of zeros, NaN and +-Inf among ordinary ones, and a
    query row of zeros; every special row gives NaN or infinite scores."""
    x = torch.randn(4, d, generator=generator, dtype=torch.float64)
    x[2] = 0.0
    y = torch.randn(m, d, generator=generator, dtype=torch.float64)
    y[[3, 40, 41]] = 0.0
    y[7, 2] = math.nan
    y[100] = math.inf
    y[101] = -math.inf
    y_stats = torch.ones(m, 3, dtype=torch.float64)
    y_stats[:, 0] = 1 / y.norm(dim=1).clamp_min(1e-300)
    y_stats[[100, 101], 0] = 0.5  # a finite scale on an infinite row: scores +-inf, or NaN where 0 * inf
    y_stats[250, 1] = math.nan  # NaN alpha: NaN variance, NaN for every score but the mean
    y_stats[251, 2] = math.inf  # infinite quad: infinite variance
    x_stats = torch.ones(4, 3, dtype=torch.float64)
    x_stats[:, 0] = 1 / x.norm(dim=1).clamp_min(1e-300)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype), y.to(dtype), x_stats.to(acc), y_stats.to(acc)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("score", SCORES)
def test_non_finite_rows_rank_alike_on_every_backend(device, dtype, score):
    generator = torch.Generator().manual_seed(3)
    data = [t.to(device) for t in special_gallery(generator, dtype=dtype)]
    x, y, xs, ys = data
    m = y.shape[0]
    code = SCORE_CODE[score]
    # The dense keys of the reference, ranked by the brute-force rule, define the answer.
    mean, var = _torch_impl.pairwise_moments(x, y, xs, ys, None, None, 10.0, 0.0, 0.1, 0)
    key = _torch_impl.topk_scores(mean, var, code, 1.0)
    expected_order = brute_force_order(key.cpu())
    for k in (1, 5, 97, m):
        compiled = ops.topk_moments(*data, None, None, 10.0, 0.0, 0.1, k, code, 1.0)
        ref = _torch_impl.topk_moments(*data, None, None, 10.0, 0.0, 0.1, k, code, 1.0, chunk=37)
        assert torch.equal(compiled[1].cpu(), expected_order[:, :k]), (score, k)
        assert torch.equal(ref[1].cpu(), expected_order[:, :k]), (score, k)
        tol = error_budget(dtype)  # scores are differences of terms of size up to the scale, 10
        for got, want in zip(compiled, ref):
            torch.testing.assert_close(got, want, rtol=tol, atol=10 * tol, equal_nan=True)
        # Shards merged: the same rows, also where a shard holds only NaN or infinite scores.
        shards = [(0, 41), (41, 102), (102, m)]
        parts = []
        for start, stop in shards:
            part = ops.topk_moments(x, y[start:stop], xs, ys[start:stop], None, None, 10.0, 0.0, 0.1,
                                    min(k, stop - start), code, 1.0)
            parts.append((part[0], part[1] + start, part[2], part[3]))
        merged = merge_topk(parts, k, score=score)
        assert torch.equal(merged[1], compiled[1]), (score, k)


@pytest.mark.parametrize("score", SCORES)
def test_merge_topk_ranks_nan_last(score):
    # torch.sort puts NaN first; merge_topk used it for three scores, and for probit it ranked through a
    # product with unit vectors in which one NaN or Inf candidate turned every key of its query into NaN.
    nan, inf = math.nan, math.inf
    values = torch.tensor([[nan, 0.5, -inf], [0.1, nan, 0.2]])
    mean = torch.tensor([[nan, 0.5, -inf], [0.1, inf, 0.2]])
    var = torch.tensor([[1.0, 0.0, 1.0], [0.0, inf, 0.0]])
    part_a = (values[:, :2], torch.tensor([[0, 1], [0, 1]]), mean[:, :2], var[:, :2])
    part_b = (values[:, 2:], torch.tensor([[2], [2]]), mean[:, 2:], var[:, 2:])
    merged = merge_topk([part_a, part_b], 3, score=score)
    # probit keys t = mean / sqrt(1 + pi/8 var): NaN, 0.5, -inf | 0.1, inf / inf = NaN, 0.2: the same order
    assert merged[1].tolist() == [[1, 2, 0], [2, 0, 1]]
    assert merged[0][0, 2].isnan() and merged[0][1, 2].isnan()


def test_zero_feature_row_through_the_public_api():
    # Issue 15's first example end to end: a posterior's gallery with one all-zero feature row (alpha = 0,
    # mean = 0: no direction) and k equal to the gallery; every query gets all M rows, the zero row last.
    generator = torch.Generator().manual_seed(4)
    d = 6
    post_q = KronPosterior(spd(5, generator), spd(d, generator), torch.randn(d, 5, generator=generator,
                                                                              dtype=torch.float64))
    post_g = KronPosterior(spd(4, generator), spd(d, generator), torch.randn(d, 4, generator=generator,
                                                                              dtype=torch.float64))
    phi_g = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    phi_g[11] = 0.0
    queries = post_q.embed(torch.randn(3, 5, generator=generator, dtype=torch.float64))
    gallery = post_g.embed(phi_g, against=post_q)
    for score in SCORES:
        values, indices, _, _ = topk(queries, gallery, 30, score=score, logit_scale=math.log(20.0))
        for row in indices:
            assert sorted(row.tolist()) == list(range(30))
        assert bool((indices[:, -1] == 11).all())
        assert bool(values[:, -1].isnan().all()) and bool(values[:, :-1].isfinite().all())
