"""The fused op topk_moments against the stable dense sort of float64 scores and its PyTorch twin.

Top-k must equal a stable descending sort of the dense scores of SPEC.md section 7 (ties to the lower
index), with the scores within the error budget of the accumulation precision.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import (BIAS, SCALE, TRACE_CROSS, acc_dtype, budget, devices, dtypes, needs_extension, oracle_moments,
                     pair_data)

from bayesvlm_ext import _torch_impl, ops


def assert_scores_close(values, expected, exact: bool = False):
    """values [N, k] against dense_topk's (values, indices, mean, var) in float64. Float32 rounds each
    score's terms (mean, kappa sd) to 1 ulp: the tolerance scales with them, not with their difference."""
    exp_values, _, exp_mean, exp_var = expected[:4]
    magnitude = (exp_mean.abs() + exp_var.sqrt()).max().item() if exp_mean.numel() else 0.0
    tol = 1e-12 if exact else 1e-6
    torch.testing.assert_close(values.cpu().double(), exp_values, rtol=tol, atol=tol * max(magnitude, 1.0))


def dense_topk(data, k, score, kappa, scale, bias, trace_cross):
    """Stable descending sort of the float64 dense scores: the definition top-k must reproduce."""
    mean, var, _ = oracle_moments(*data, scale=scale, bias=bias, trace_cross=trace_cross)
    key = _torch_impl.topk_scores(mean, var, score, kappa)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    values = key.gather(1, order)
    return (torch.sigmoid(values) if score == 3 else values), order, mean.gather(1, order), var.gather(1, order), key


def assert_same_topk(indices, expected):
    """indices equal the stable dense sort's, except that two items whose float64 keys differ by less
    than float32 rounding (1e-6 relative) may swap: integer data make every other tie exact, but the
    probit key mean / sqrt(1 + pi/8 var) has a few such near-ties, and float32 may order them either way."""
    indices = indices.cpu()
    exp_indices, key = expected[1], expected[4]
    if torch.equal(indices, exp_indices):
        return
    got_key, exp_key = key.gather(1, indices), key.gather(1, exp_indices)
    differs = indices != exp_indices
    near = (got_key - exp_key).abs() <= 1e-6 * exp_key.abs().clamp_min(1.0)
    assert bool((near | ~differs).all()), "top-k indices differ from the stable dense sort beyond near-ties"
    assert all(len(set(row.tolist())) == len(row) for row in indices), "an index was returned twice"


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
@pytest.mark.parametrize("score", [0, 1, 2, 3], ids=["mean", "pessimistic", "optimistic", "probit"])
@pytest.mark.parametrize("with_var", [False, True], ids=["kron", "var-features"])
@pytest.mark.parametrize("n,m,d,k", [(3, 5000, 24, 7), (300, 1100, 8, 1), (1, 1, 3, 1), (5, 9, 4, 9)])
def test_topk_matches_dense_sort(device, dtype, score, with_var, n, m, d, k, generator):
    # Integer-valued means and stats: every dot product and moment is exact in float32 and bf16,
    # so the compiled kernels and the float64 oracle agree bit for bit and ties are real ties.
    acc = acc_dtype(dtype)
    x = torch.randint(-3, 4, (n, d), generator=generator).to(device=device, dtype=dtype)
    y = torch.randint(-3, 4, (m, d), generator=generator).to(device=device, dtype=dtype)
    x_stats = torch.ones(n, 3, dtype=acc, device=device)
    y_stats = torch.ones(m, 3, dtype=acc, device=device)
    x_stats[:, 2] = torch.randint(0, 3, (n,), generator=generator).to(acc)
    y_stats[:, 2] = torch.randint(0, 3, (m,), generator=generator).to(acc)
    x_var = y_var = None
    if with_var:
        x_var = torch.randint(0, 3, (n, 2 * d), generator=generator).to(device=device, dtype=acc)
        y_var = torch.randint(0, 3, (m, 2 * d), generator=generator).to(device=device, dtype=acc)
    data = (x, y, x_stats, y_stats, x_var, y_var)
    values, indices, mean, var = ops.topk_moments(*data, 1.0, 0.5, 0.25, k, score, 0.5)
    expected = dense_topk(data, k, score, 0.5, 1.0, 0.5, 0.25)
    exp_values, exp_indices, exp_mean, exp_var, _ = expected
    assert indices.dtype == torch.int64 and values.dtype == acc and values.shape == (n, k)
    assert_same_topk(indices, expected)
    # sqrt / exp in the score are the only roundings
    assert_scores_close(values, (exp_values, exp_indices, exp_mean, exp_var), exact=dtype == torch.float64)
    # Exact integers: the moments at the returned indices are the oracle's, bit for bit.
    oracle_mean, oracle_var, _ = oracle_moments(*data, scale=1.0, bias=0.5, trace_cross=0.25)
    torch.testing.assert_close(mean.cpu().double(), oracle_mean.gather(1, indices.cpu()), rtol=0, atol=0)
    torch.testing.assert_close(var.cpu().double(), oracle_var.gather(1, indices.cpu()), rtol=0, atol=0)


@pytest.mark.parametrize("device", devices, ids=str)
def test_topk_ties_keep_the_lower_index(device):
    # Every gallery item identical: the answer must be 0, 1, ..., k-1 for every query and score.
    x = torch.ones(4, 6, device=device)
    y = torch.ones(3000, 6, device=device)
    stats_x, stats_y = torch.ones(4, 3, device=device), torch.ones(3000, 3, device=device)
    for score in range(4):
        _, indices, _, _ = ops.topk_moments(x, y, stats_x, stats_y, None, None, 1.0, 0.0, 1.0, 10, score, 1.0)
        assert torch.equal(indices.cpu(), torch.arange(10).expand(4, 10))


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
def test_topk_random_data_matches_pairwise_scores(device, dtype, generator):
    # Continuous data: the values must match the dense oracle within the budget and each returned
    # index must carry the returned score.
    data = pair_data(37, 4100, 40, dtype, device, generator, with_var=False)
    values, indices, mean, var = ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 16, 1, 1.0)
    exp_mean, exp_var, magnitude = oracle_moments(*data)
    key = _torch_impl.topk_scores(exp_mean, exp_var, 1, 1.0)
    tol = budget(dtype) * magnitude.max().item()
    torch.testing.assert_close(values.cpu().double(), key.gather(1, indices.cpu()), rtol=0, atol=tol)
    best = torch.sort(key, dim=1, descending=True).values[:, :16]
    torch.testing.assert_close(values.cpu().double(), best, rtol=0, atol=tol)
    assert (values[:, 1:] <= values[:, :-1]).all()


@pytest.mark.parametrize("device", devices, ids=str)
def test_topk_empty_and_k_zero(device, generator):
    data = pair_data(0, 6, 4, torch.float32, device, generator)
    assert all(t.shape == (0, 3) for t in ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 3, 0, 1.0))
    data = pair_data(5, 6, 4, torch.float32, device, generator)
    assert all(t.shape == (5, 0) for t in ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 0, 0, 1.0))
    data = pair_data(5, 0, 4, torch.float32, device, generator)
    assert all(t.shape == (5, 0) for t in ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 0, 0, 1.0))


def test_topk_errors_name_the_argument(generator):
    data = pair_data(4, 5, 3, torch.float32, "cpu", generator)
    with pytest.raises(ValueError, match="'k' must be an int in"):
        ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 6, 0, 1.0)
    with pytest.raises(ValueError, match="'k' must be an int in"):
        ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, -1, 0, 1.0)
    with pytest.raises(ValueError, match="'score'"):
        ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 2, 4, 1.0)


@needs_extension
def test_topk_opcheck_and_reference_agree(generator):
    data = pair_data(6, 50, 5, torch.float64, "cpu", generator, with_var=True)
    compiled = torch.ops.bayesvlm_ext.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 4, 1, 0.7)
    ref = _torch_impl.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 4, 1, 0.7, chunk=7)  # several merges
    assert torch.equal(compiled[1], ref[1])
    for got, expected in zip(compiled, ref):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.bayesvlm_ext.topk_moments.default, (*data, SCALE, BIAS, TRACE_CROSS, 4, 1, 0.7))


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("with_var", [False, True], ids=["kron", "var-features"])
def test_topk_large_k_matches_dense_sort(device, with_var, generator):
    # k beyond the CUDA kernel's shared-memory lists takes its streaming fallback; same answer.
    n, m, d, k = 5, 3000, 6, 300
    x = torch.randint(-3, 4, (n, d), generator=generator).to(device=device, dtype=torch.float32)
    y = torch.randint(-3, 4, (m, d), generator=generator).to(device=device, dtype=torch.float32)
    stats_x, stats_y = torch.ones(n, 3, device=device), torch.ones(m, 3, device=device)
    x_var = torch.randint(0, 3, (n, 2 * d), generator=generator).float().to(device) if with_var else None
    y_var = torch.randint(0, 3, (m, 2 * d), generator=generator).float().to(device) if with_var else None
    data = (x, y, stats_x, stats_y, x_var, y_var)
    for score in range(4):
        values, indices, mean, var = ops.topk_moments(*data, 1.0, 0.5, 0.25, k, score, 0.5)
        expected = dense_topk(data, k, score, 0.5, 1.0, 0.5, 0.25)
        assert_same_topk(indices, expected)
        assert_scores_close(values, expected)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 12), m=st.integers(1, 2100), d=st.integers(1, 9), score=st.integers(0, 3),
       with_var=st.booleans(), step=st.integers(1, 2), seed=st.integers(0, 2**31 - 1), k_fraction=st.floats(0, 1))
def test_topk_property_shapes_and_strides(n, m, d, score, with_var, step, seed, k_fraction):
    # Small-integer data (exact in float32): top-k equals the stable dense sort for any shape and strides.
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n * step, d * step), generator=g).float()[::step, ::step]
    y = torch.randint(-2, 3, (m, d * step), generator=g).float()[:, ::step]
    stats_x, stats_y = torch.ones(n, 3), torch.ones(m, 3)
    x_var = torch.randint(0, 3, (n, 2 * d), generator=g).float() if with_var else None
    y_var = torch.randint(0, 3, (m, 2 * d), generator=g).float() if with_var else None
    data = (x, y, stats_x, stats_y, x_var, y_var)
    k = round(k_fraction * m)
    values, indices, mean, var = ops.topk_moments(*data, 1.0, 0.5, 0.25, k, score, 0.5)
    expected = dense_topk(data, k, score, 0.5, 1.0, 0.5, 0.25)
    assert_same_topk(indices, expected)
    assert_scores_close(values, expected)
