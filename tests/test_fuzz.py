"""Fuzzing the ops with degenerate input (SPEC.md section 12): zeros, NaN, +-Inf, 1e-30 and 1e30 magnitudes,
odd strides and every k from 0 to M. No input may crash an op; every backend (the compiled CPU kernel, the
CUDA kernel where present, the PyTorch reference) must give the documented result:

- elementwise ops agree with the reference: NaN where it has NaN, the same infinities, finite values within
  the accumulation precision's budget of the terms' magnitude;
- top-k returns k distinct valid rows per query, ranked by the NaN-last order, with the reference's best k
  keys (near-ties of rounding size may swap) and the reference's mean and variance at each returned row;
- shards merged with merge_topk give the same.

The data are small integers (and the specials) in rows scaled by 1e-30, 1 or 1e30, with statistics from a
small set of exact values. Where the terms of a result overflow the accumulation dtype (a quadratic form of
1e30 features in float32) the result is unspecified: +-Inf or NaN, which one depending on the summation
order and on fused multiply-adds (fma(a, b, inf) keeps inf where a rounded product would give inf - inf),
so the comparisons skip those entries; they still must not crash. The pairwise cases never overflow (only
one side of a pair has 1e30 rows), so there every backend must agree on every NaN and infinity. Fixed seed
(derandomize) and a bounded number of examples, so that CI runs the same cases every time.
"""

import math
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing import devices, dtypes, error_budget

import bayesvlm_ext
from bayesvlm_ext import EmbeddingDistribution, _torch_impl, cosine_moments, ops, topk
from bayesvlm_ext.retrieval import merge_topk
from bayesvlm_ext.index import save_index, search

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL = (math.nan, math.inf, -math.inf)
SCORES = ("mean", "pessimistic", "optimistic", "probit")
SCORE_CODE = {name: code for code, name in enumerate(SCORES)}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@st.composite
def matrices(draw, rows, cols, values=(-2.0, -1.0, 0.0, 1.0, 2.0), special_rate=0.05,
             scales=(1e-30, 1.0, 1e30)):
    """A [rows, cols] float64 matrix of `values` with some NaN / +-Inf, some zero rows, each row scaled by one
    of `scales` (powers of two times small integers stay exact in every product and sum)."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    choices = torch.tensor(values, dtype=torch.float64)
    out = choices[torch.randint(0, len(values), (rows, cols), generator=g)]
    special = torch.rand(rows, cols, generator=g) < special_rate
    out[special] = torch.tensor(SPECIAL, dtype=torch.float64)[torch.randint(0, 3, (int(special.sum()),),
                                                                            generator=g)]
    out[torch.rand(rows, generator=g) < 0.1] = 0.0
    scale = torch.tensor(scales, dtype=torch.float64)[torch.randint(0, len(scales), (rows,), generator=g)]
    return out * scale[:, None]


def layout(t: torch.Tensor, step: int, transpose: bool) -> torch.Tensor:
    """The same values in an odd memory layout: every `step`-th element of a larger buffer, or column-major."""
    if step > 1:
        buffer = torch.full((t.shape[0] * step, t.shape[1] * step), 7.0, dtype=t.dtype)
        buffer[::step, ::step] = t
        t = buffer[::step, ::step]
    return t.T.contiguous().T if transpose else t


def magnitude_close(got: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor, tol: float, what: str):
    """NaN exactly where expected has NaN, the same infinities, finite values within tol * magnitude; entries
    whose terms overflow the dtype of `expected` (magnitude, in float64, beyond its range) are unspecified."""
    assert got.shape == expected.shape, what
    limit = torch.finfo(expected.dtype).max
    got, expected, magnitude = got.double().cpu(), expected.double().cpu(), magnitude.double().cpu()
    specified = ~(magnitude > limit)  # NaN magnitudes stay: NaN input gives NaN on every backend
    got, expected, magnitude = got[specified], expected[specified], magnitude[specified]
    assert torch.equal(got.isnan(), expected.isnan()), f"{what}: NaN pattern differs"
    infinite = expected.isinf()
    assert torch.equal(got[infinite], expected[infinite]), f"{what}: infinities differ"
    finite = expected.isfinite()
    assert bool(got[finite].isfinite().all()), f"{what}: a finite value came back infinite"
    error = (got[finite] - expected[finite]).abs()
    bound = tol * magnitude[finite].clamp_min(torch.finfo(torch.float64).tiny)
    assert bool((error <= bound).all()), f"{what}: error {(error / bound).max().item():.3g} x the budget"


def dense(data, scale, bias, trace_cross):
    """The reference's dense (mean, var) [N, M] and, in float64 on absolute values, their terms' magnitudes."""
    x, y, xs, ys, xv, yv = data
    mean, var = _torch_impl.pairwise_moments(x, y, xs, ys, xv, yv, scale, bias, trace_cross, 0)
    absolute = [None if t is None else t.double().abs() for t in data]
    mean_mag, var_mag = _torch_impl.pairwise_moments(*absolute, abs(scale), abs(bias), abs(trace_cross), 0)
    return mean, var, mean_mag, var_mag


def key_magnitude(score, kappa, mean_mag, var_mag, var):
    """The size of the terms behind each ranking key (score 0-3), for its rounding budget."""
    if score in (1, 2) and kappa:  # mean -/+ kappa sd; kappa = 0 must not meet an infinite var as 0 * inf
        return mean_mag + abs(kappa) * var_mag.sqrt()
    if score == 3:  # t = mean / sqrt(1 + pi/8 var): the mean's error, divided by the root
        return 2 * mean_mag / (1 + _torch_impl.PI_OVER_8 * var.double()).abs().sqrt()
    return mean_mag


@st.composite
def pairwise_case(draw, max_n=9, max_m=300):
    n, m, d = draw(st.integers(0, max_n)), draw(st.integers(1, max_m)), draw(st.integers(1, 7))
    dtype = draw(st.sampled_from(dtypes))
    with_var = draw(st.booleans())
    big, small = (1e-30, 1.0, 1e30), (1e-30, 1.0)  # 1e30 rows on one side only: no dot product overflows
    x_big = draw(st.booleans())
    x, y = draw(matrices(n, d, scales=big if x_big else small)), draw(matrices(m, d, scales=small if x_big else big))
    stat_values = (0.0, 0.5, 1.0, 2.0, 3.0)
    xs = draw(matrices(n, 3, stat_values, special_rate=0.03, scales=(1.0,)))
    ys = draw(matrices(m, 3, stat_values, special_rate=0.03, scales=(1.0,)))
    xv = yv = None
    if with_var:
        width = draw(st.integers(1, 6))
        xv = draw(matrices(n, width, (0.0, 1.0, 2.0), special_rate=0.03, scales=(1.0,)))
        yv = draw(matrices(m, width, (0.0, 1.0, 2.0), special_rate=0.03, scales=(1.0,)))
    step, transpose = draw(st.integers(1, 3)), draw(st.booleans())
    acc = acc_dtype(dtype)
    data = (layout(x.to(dtype), step, transpose), layout(y.to(dtype), 1, not transpose), xs.to(acc), ys.to(acc),
            None if xv is None else xv.to(acc), None if yv is None else yv.to(acc))
    scalars = (draw(st.sampled_from((1.0, 10.0))), draw(st.sampled_from((0.0, -1.5))),
               draw(st.sampled_from((0.0, 0.25))))
    return dtype, data, scalars


def on(device, data):
    return tuple(None if t is None else t.to(device) for t in data)


@pytest.mark.parametrize("device", devices, ids=str)
@FUZZ
@given(case=pairwise_case(), output=st.integers(0, 2))
def test_fuzz_pairwise_moments(device, case, output):
    dtype, data, (scale, bias, trace_cross) = case
    first, var = ops.pairwise_moments(*on(device, data), scale, bias, trace_cross, output)
    exp_first, exp_var = _torch_impl.pairwise_moments(*data, scale, bias, trace_cross, output)
    _, _, mean_mag, var_mag = dense(data, scale, bias, trace_cross)
    tol = error_budget(acc_dtype(dtype))
    magnitude_close(var, exp_var, var_mag, tol, "var")
    # sigmoid' <= 1/4: the sigmoid probit output is no more sensitive than the probit logit.
    magnitude = key_magnitude(3, 0.0, mean_mag, var_mag, exp_var) if output else mean_mag
    magnitude_close(first, exp_first, magnitude, tol, "first")


@st.composite
def topk_case(draw):
    dtype, data, scalars = draw(pairwise_case())
    m = data[1].shape[0]
    k = draw(st.integers(0, m))
    return dtype, data, scalars, k, draw(st.integers(0, 3)), draw(st.sampled_from((0.0, 0.5, 2.0)))


def check_topk(result, data, scalars, k, score, kappa, dtype, what):
    """The documented top-k result: see the module docstring."""
    values, indices, mean, var = (t.cpu() for t in result)
    n, m = data[0].shape[0], data[1].shape[0]
    assert indices.dtype == torch.int64 and values.dtype == acc_dtype(dtype), what
    assert all(t.shape == (n, k) for t in (values, indices, mean, var)), what
    assert bool(((indices >= 0) & (indices < m)).all()), f"{what}: an index outside the gallery"
    assert all(len(set(row)) == len(row) for row in indices.tolist()), f"{what}: a row returned twice"
    # NaN last, the rest non-increasing: the backend's own values in its own order
    keys = values.double()
    nan = keys.isnan()
    assert bool((nan[:, :-1] <= nan[:, 1:]).all()), f"{what}: a NaN score ranked before a number"
    earlier, later = keys[:, :-1], keys[:, 1:]
    both = ~earlier.isnan() & ~later.isnan()
    assert bool((earlier[both] >= later[both]).all()), f"{what}: scores not sorted"
    # the reference's best k keys, and its moments at the returned rows
    exp_mean, exp_var, mean_mag, var_mag = dense(data, *scalars)
    key = _torch_impl.topk_scores(exp_mean, exp_var, score, kappa)
    key_mag = key_magnitude(score, kappa, mean_mag, var_mag, exp_var)
    tol = error_budget(acc_dtype(dtype))
    assert_best_k(key.double(), key_mag, indices, tol, what)
    exp_values = key.gather(1, indices)
    magnitude_close(values, torch.sigmoid(exp_values) if score == 3 else exp_values, key_mag.gather(1, indices), tol,
                    f"{what}: values")
    magnitude_close(mean, exp_mean.gather(1, indices), mean_mag.gather(1, indices), tol, f"{what}: mean")
    magnitude_close(var, exp_var.gather(1, indices), var_mag.gather(1, indices), tol, f"{what}: var")


def assert_best_k(key: torch.Tensor, magnitude: torch.Tensor, indices: torch.Tensor, tol: float, what: str):
    """`indices` [N, k] are a best k of the reference's keys [N, M] in the NaN-last order, where each finite key
    may be off by its rounding budget tol * magnitude (infinite and NaN keys are exact): no other item is
    surely better than a chosen one, and no chosen item is surely worse than one after it."""
    bound = torch.where(key.isfinite(), tol * magnitude, torch.zeros_like(magnitude)).nan_to_num(nan=0.0)
    for row, chosen in enumerate(indices.tolist()):
        rest = sorted(set(range(key.shape[1])) - set(chosen))
        k_c, b_c = key[row, chosen], bound[row, chosen]
        k_r, b_r = key[row, rest], bound[row, rest]
        if bool(k_c.isnan().any()):
            assert bool(k_r.isnan().all()), f"{what}: row {row} chose a NaN score over a number"
        numbers_c, numbers_r = ~k_c.isnan(), ~k_r.isnan()
        if bool(numbers_r.any()) and bool(numbers_c.any()):
            best_left = (k_r[numbers_r] - b_r[numbers_r]).max()
            worst_chosen = (k_c[numbers_c] + b_c[numbers_c]).min()
            assert best_left <= worst_chosen, f"{what}: row {row} left out an item surely better than one it chose"
        lo, hi = (k_c - b_c)[numbers_c], (k_c + b_c)[numbers_c]
        later_surely_better = lo[None, :] > hi[:, None]  # [p, q]: item q surely better than item p
        assert not bool(torch.triu(later_surely_better, diagonal=1).any()), f"{what}: row {row} is out of order"


@pytest.mark.parametrize("device", devices, ids=str)
@FUZZ
@given(case=topk_case())
def test_fuzz_topk_moments(device, case):
    dtype, data, scalars, k, score, kappa = case
    compiled = ops.topk_moments(*on(device, data), *scalars, k, score, kappa)
    check_topk(compiled, data, scalars, k, score, kappa, dtype, f"{device}")
    ref = _torch_impl.topk_moments(*data, *scalars, k, score, kappa, chunk=53)
    check_topk(ref, data, scalars, k, score, kappa, dtype, "reference")


@FUZZ
@given(case=topk_case(), cuts=st.lists(st.floats(0, 1), min_size=1, max_size=3))
def test_fuzz_sharded_topk_merged(case, cuts):
    dtype, data, scalars, k, score, kappa = case
    x, y, xs, ys, xv, yv = data
    m = y.shape[0]
    bounds = sorted({0, m, *(round(c * m) for c in cuts)})
    parts = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = ops.topk_moments(x, y[start:stop], xs, ys[start:stop], xv, None if yv is None else yv[start:stop],
                                *scalars, min(k, stop - start), score, kappa)
        parts.append((part[0], part[1] + start, part[2], part[3]))
    merged = merge_topk(parts, k, score=SCORES[score], kappa=kappa)
    check_topk(merged, data, scalars, k, score, kappa, dtype, "merged")


@pytest.mark.parametrize("device", devices, ids=str)
@FUZZ
@given(n=st.integers(0, 40), p=st.integers(1, 9), dtype=st.sampled_from(dtypes), step=st.integers(1, 3),
       transpose=st.booleans(), data=st.data())
def test_fuzz_kron_quadform(device, n, p, dtype, step, transpose, data):
    phi = data.draw(matrices(n, p))
    C = data.draw(matrices(p, p, (-1.0, 0.0, 0.5, 1.0, 2.0), special_rate=0.02, scales=(1.0,)))
    acc = acc_dtype(dtype)
    phi_in, C_in = layout(phi.to(dtype), step, transpose), C.to(acc)
    alpha = ops.kron_quadform(phi_in.to(device), C_in.to(device))
    expected = _torch_impl.kron_quadform(phi_in, C_in)
    magnitude = _torch_impl.kron_quadform(phi_in.double().abs(), C_in.double().abs())
    magnitude_close(alpha, expected, magnitude, error_budget(acc_dtype(dtype)), "alpha")


@pytest.mark.parametrize("device", devices, ids=str)
@FUZZ
@given(n=st.integers(0, 20), p=st.integers(1, 7), d=st.integers(1, 6), dtype=st.sampled_from(dtypes),
       with_bias=st.booleans(), with_residual=st.booleans(), with_cross=st.booleans(), exact=st.booleans(),
       step=st.integers(1, 3), data=st.data())
def test_fuzz_item_stats(device, n, p, d, dtype, with_bias, with_residual, with_cross, exact, step, data):
    acc = acc_dtype(dtype)
    small = (-1.0, 0.0, 0.5, 1.0, 2.0)
    phi = layout(data.draw(matrices(n, p)).to(dtype), step, False)
    weight = data.draw(matrices(d, p, small, special_rate=0.02, scales=(1.0,))).to(acc)
    bias = data.draw(matrices(1, d, small, special_rate=0.02, scales=(1.0,)))[0].to(acc) if with_bias else None
    residual = data.draw(matrices(n, d, small, special_rate=0.02)).to(acc) if with_residual else None
    pa = p + with_bias
    cross = data.draw(matrices(d, d, small, special_rate=0.02, scales=(1.0,))).to(acc) if with_cross else None
    if exact:
        factors = (data.draw(matrices(pa, pa, small, special_rate=0.02, scales=(1.0,))).to(acc),
                   data.draw(matrices(pa, d, (0.0, 0.5, 1.0, 2.0), special_rate=0.02, scales=(1.0,))).to(acc))
        op, ref = ops.item_stats_exact, _torch_impl.item_stats_exact
    else:
        factors = (data.draw(matrices(pa, pa, small, special_rate=0.02, scales=(1.0,))).to(acc),)
        op, ref = ops.item_stats, _torch_impl.item_stats
    args = (phi, weight, bias, residual, *factors, cross)
    got = op(*on(device, args))
    expected = ref(*args)
    magnitudes = ref(*(None if t is None else t.double().abs() for t in args))
    tol = error_budget(acc_dtype(dtype))
    for name, g, e, mag in zip(("mean", "alpha/k", "sq_norm", "cross_quad"), got, expected, magnitudes):
        magnitude_close(g, e, mag, tol, name)


@pytest.mark.skipif(not bayesvlm_ext.has_extension(), reason="compiled extension not built")
def test_fuzz_runs_the_compiled_kernels():
    # The properties above hold trivially if every call fell back to the reference.
    assert torch.ops.bayesvlm_ext.topk_moments.default.has_kernel_for_dispatch_key("CPU")
    assert torch.ops.bayesvlm_ext.item_stats.default.has_kernel_for_dispatch_key("CPU")


@st.composite
def distributions(draw, rows, d, form, dtype):
    """An EmbeddingDistribution of `form` with fuzzed means (zero, NaN, +-Inf rows; rows scaled by 1e-30, 1 and,
    within the dtype's range for ||mean||^2, 1e15 (float32) or 1e30 (float64)) and valid covariance parts."""
    big = 1e15 if dtype == torch.float32 else 1e30
    mean = draw(matrices(rows, d, scales=(1e-30, 1.0, big))).to(dtype)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].to(dtype)
    if form == "kron":
        eigvals = torch.rand(d, generator=g, dtype=torch.float64).to(dtype)
        shared = (basis * eigvals) @ basis.T
        alpha = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=dtype)[torch.randint(0, 4, (rows,), generator=g)]
        return EmbeddingDistribution.kron(mean, alpha, (shared + shared.T) / 2)
    spread = torch.tensor([0.0, 0.5, 1.0], dtype=dtype)[torch.randint(0, 3, (rows, d), generator=g)]
    if form == "eigen":
        return EmbeddingDistribution.eigen(mean, spread, basis)
    return EmbeddingDistribution.diagonal(mean, spread)


@settings(FUZZ, max_examples=100)
@given(data=st.data(), form=st.sampled_from(("kron", "eigen", "diag")),
       dtype=st.sampled_from((torch.float32, torch.float64)), n=st.integers(0, 6), m=st.integers(1, 60),
       d=st.integers(1, 6), score=st.sampled_from(SCORES), shard_rows=st.integers(1, 25))
def test_fuzz_public_topk_and_index_search(data, form, dtype, n, m, d, score, shard_rows):
    # The public path: structured distributions, cached statistics, the sharded on-disk index and its merge.
    queries = data.draw(distributions(n, d, form, dtype))
    gallery = data.draw(distributions(m, d, form, dtype))
    k = data.draw(st.integers(1, m))
    scale, kappa = 10.0, 0.5
    mean, var = cosine_moments(queries, gallery, math.log(scale))
    key = _torch_impl.topk_scores(mean.double(), var.double(), SCORE_CODE[score], kappa)
    # |cosine| <= 1 and its variance <= 1 (Cauchy-Schwarz), so every key is a difference of terms of size at
    # most scale (1 + kappa): the rounding budget of every key.
    magnitude = torch.full_like(key, scale * (1 + kappa))
    tol = error_budget(dtype)
    found = topk(queries, gallery, k, score, kappa, logit_scale=math.log(scale))
    assert_best_k(key, magnitude, found[1], tol, "topk")
    with tempfile.TemporaryDirectory() as folder:
        index = save_index(folder, gallery.precompute(), shard_rows=shard_rows, logit_scale=math.log(scale))
        searched = search(index, queries, k, score, kappa)
        assert all(len(set(row)) == k for row in searched[1].tolist()), "search returned a row twice"
        assert_best_k(key, magnitude, searched[1], tol, "search")
        del index, searched  # unmap the shards before the folder goes
