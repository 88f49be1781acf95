"""The fused ops item_stats, pairwise_moments and topk_moments against float64 oracles and the reference.

Oracles are written here from SPEC.md (sections 3, 4, 7) in float64 on the same rounded inputs;
the compiled ops must stay within the error budget of their accumulation precision, and top-k must
equal a stable descending sort of the dense scores (ties to the lower index).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import devices, dtypes, error_budget, spd

import bayesvlm_ext
from bayesvlm_ext import ops, reference

needs_extension = pytest.mark.skipif(not bayesvlm_ext.has_extension(), reason="compiled extension not built")
SCALE, BIAS, TRACE_CROSS = 100.0, -2.5, 0.3


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def budget(dtype):
    """Inputs are read exactly and accumulated in float32 (float64): the budget of that precision."""
    return error_budget(acc_dtype(dtype))


def strided(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    return t.T.contiguous().T if transpose else t  # same values, column-major storage


def pair_data(n, m, d, dtype, device, generator, with_var=False, var_width=None, transpose=False):
    """Means in `dtype`, positive per-item stats and (optionally) positive variance features."""
    acc = acc_dtype(dtype)
    x = strided(torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype), transpose).to(device)
    y = torch.randn(m, d, generator=generator, dtype=torch.float64).to(dtype).to(device)
    x_stats = (torch.rand(n, 3, generator=generator, dtype=torch.float64) + 0.1).to(device=device, dtype=acc)
    y_stats = (torch.rand(m, 3, generator=generator, dtype=torch.float64) + 0.1).to(device=device, dtype=acc)
    x_var = y_var = None
    if with_var:
        width = var_width if var_width is not None else 2 * d
        x_var = torch.rand(n, width, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
        y_var = torch.rand(m, width, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
    return x, y, x_stats, y_stats, x_var, y_var


def oracle_moments(x, y, x_stats, y_stats, x_var, y_var, scale=SCALE, bias=BIAS, trace_cross=TRACE_CROSS):
    """SPEC.md section 4 in float64: (mean, var, magnitude of the mean's rounding) [N, M] each."""
    x, y, xs, ys = x.double().cpu(), y.double().cpu(), x_stats.double().cpu(), y_stats.double().cpu()
    c = xs[:, 0:1] * ys[:, 0][None, :]
    if x_var is not None:
        dot_var = x_var.double().cpu() @ y_var.double().cpu().T
    else:
        ax, qx, ay, qy = xs[:, 1:2], xs[:, 2:3], ys[:, 1][None, :], ys[:, 2][None, :]
        dot_var = ay * qx + ax * qy + trace_cross * ax * ay
    mean = scale * (x @ y.T) * c + bias
    magnitude = scale * (x.abs() @ y.abs().T) * c + abs(bias)
    return mean, scale**2 * dot_var * c * c, magnitude


def assert_moments_close(mean, var, x, y, x_stats, y_stats, x_var, y_var, dtype):
    exp_mean, exp_var, magnitude = oracle_moments(x, y, x_stats, y_stats, x_var, y_var)
    assert mean.dtype == acc_dtype(dtype) and var.dtype == acc_dtype(dtype)
    assert mean.shape == exp_mean.shape and var.shape == exp_var.shape
    if mean.numel() == 0:
        return
    err_mean = ((mean.double().cpu() - exp_mean).abs() / magnitude).max().item()
    err_var = ((var.double().cpu() - exp_var).abs() / exp_var.abs().clamp_min(1e-300)).max().item()  # terms >= 0
    assert err_mean <= budget(dtype), f"mean error {err_mean:.3g}"
    assert err_var <= budget(dtype), f"var error {err_var:.3g}"


# ---- pairwise_moments -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
@pytest.mark.parametrize("with_var", [False, True], ids=["kron", "var-features"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (7, 5, 3), (257, 515, 64), (33, 600, 1280), (300, 1, 17), (1, 700, 8)])
def test_pairwise_moments_matches_float64_oracle(device, dtype, with_var, n, m, d, generator):
    data = pair_data(n, m, d, dtype, device, generator, with_var, transpose=n % 2 == 1)
    mean, var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 0)
    assert mean.device == data[0].device
    assert_moments_close(mean, var, *data, dtype)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("with_var", [False, True], ids=["kron", "var-features"])
def test_pairwise_moments_probit_outputs(device, with_var, generator):
    data = pair_data(40, 70, 16, torch.float64, device, generator, with_var)
    exp_mean, exp_var, _ = oracle_moments(*data)
    probit = exp_mean / torch.sqrt(1 + math.pi / 8 * exp_var)
    for output, expected in ((1, probit), (2, torch.sigmoid(probit))):
        first, var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, output)
        torch.testing.assert_close(first.cpu(), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(var.cpu(), exp_var, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("n,m", [(0, 5), (5, 0), (0, 0)])
def test_pairwise_moments_empty(device, n, m, generator):
    data = pair_data(n, m, 4, torch.float32, device, generator, with_var=True)
    mean, var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 0)
    assert mean.shape == (n, m) and var.shape == (n, m) and mean.dtype == torch.float32


@pytest.mark.parametrize("device", devices, ids=str)
def test_pairwise_moments_zero_width_embeddings(device, generator):
    data = pair_data(3, 4, 0, torch.float32, device, generator)  # D = 0: every dot is 0
    mean, var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 0)
    assert torch.equal(mean.cpu(), torch.full((3, 4), BIAS))
    assert_moments_close(mean, var, *data, torch.float32)


@needs_extension
def test_pairwise_moments_agrees_with_reference_and_opcheck(generator):
    data = pair_data(20, 30, 8, torch.float32, "cpu", generator, with_var=True)
    compiled = torch.ops.bayesvlm_ext.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 1)
    ref = reference.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 1)
    for got, expected in zip(compiled, ref):
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=1e-6)
    for with_var in (False, True):
        data = pair_data(9, 13, 5, torch.float32, "cpu", generator, with_var)
        torch.library.opcheck(torch.ops.bayesvlm_ext.pairwise_moments.default,
                              (*data, SCALE, BIAS, TRACE_CROSS, 0))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 40), m=st.integers(0, 40), d=st.integers(0, 24), with_var=st.booleans(),
       dtype=st.sampled_from(dtypes), step=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_pairwise_moments_property_shapes_and_strides(n, m, d, with_var, dtype, step, seed):
    g = torch.Generator().manual_seed(seed)
    x, y, x_stats, y_stats, x_var, y_var = pair_data(n, m, d, dtype, "cpu", g, with_var)
    x = torch.randn(n * step, max(d, 1) * step, generator=g, dtype=torch.float64).to(dtype)[::step, ::step][:, :d]
    mean, var = ops.pairwise_moments(x, y, x_stats, y_stats, x_var, y_var, SCALE, BIAS, TRACE_CROSS, 0)
    assert_moments_close(mean, var, x, y, x_stats, y_stats, x_var, y_var, dtype)


def test_pairwise_moments_errors_name_the_argument(generator):
    x, y, xs, ys, xv, yv = pair_data(4, 5, 3, torch.float32, "cpu", generator, with_var=True)
    with pytest.raises(ValueError, match="'x' and 'y' must have one dtype"):
        ops.pairwise_moments(x, y.double(), xs, ys, None, None, SCALE, BIAS, TRACE_CROSS)
    with pytest.raises(ValueError, match="'y_stats' must have shape"):
        ops.pairwise_moments(x, y, xs, ys[:3], None, None, SCALE, BIAS, TRACE_CROSS)
    with pytest.raises(ValueError, match="'x_stats' must be torch.float32"):
        ops.pairwise_moments(x, y, xs.double(), ys, None, None, SCALE, BIAS, TRACE_CROSS)
    with pytest.raises(ValueError, match="given together"):
        ops.pairwise_moments(x, y, xs, ys, xv, None, SCALE, BIAS, TRACE_CROSS)
    with pytest.raises(ValueError, match="'y_var' must have shape"):
        ops.pairwise_moments(x, y, xs, ys, xv, yv[:, :2], SCALE, BIAS, TRACE_CROSS)
    with pytest.raises(ValueError, match="'output'"):
        ops.pairwise_moments(x, y, xs, ys, None, None, SCALE, BIAS, TRACE_CROSS, 3)


# ---- topk_moments -----------------------------------------------------------------------------------------
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
    key = reference.topk_scores(mean, var, score, kappa)
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
    key = reference.topk_scores(exp_mean, exp_var, 1, 1.0)
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
    ref = reference.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, 4, 1, 0.7, chunk=7)  # several merges
    assert torch.equal(compiled[1], ref[1])
    for got, expected in zip(compiled, ref):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.bayesvlm_ext.topk_moments.default, (*data, SCALE, BIAS, TRACE_CROSS, 4, 1, 0.7))


# ---- item_stats --------------------------------------------------------------------------------------------
def item_stats_oracle(phi, weight, bias, residual, A_inv, B_cross):
    """SPEC.md section 3 item by item in float64."""
    x = phi.double().cpu()
    mean = x @ weight.double().cpu().T
    if bias is not None:
        mean = mean + bias.double().cpu()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    if residual is not None:
        mean = mean + residual.double().cpu()
    A = A_inv.double().cpu()
    alpha = torch.stack([xi @ A @ xi for xi in x]) if len(x) else x.new_zeros(0)
    quad = (torch.stack([mi @ B_cross.double().cpu() @ mi for mi in mean]) if len(mean) else mean.new_zeros(0)) \
        if B_cross is not None else None
    magnitude = torch.stack([xi.abs() @ A.abs() @ xi.abs() for xi in x]) if len(x) else x.new_zeros(0)
    return mean, alpha, (mean * mean).sum(-1), quad, magnitude


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
@pytest.mark.parametrize("with_bias,with_residual,with_cross", [(False, False, False), (True, False, True),
                                                                (False, True, True), (True, True, False)])
@pytest.mark.parametrize("n,p,d", [(1, 3, 2), (300, 40, 24), (129, 7, 33)])
def test_item_stats_matches_float64_oracle(device, dtype, with_bias, with_residual, with_cross, n, p, d, generator):
    acc = acc_dtype(dtype)
    phi = strided(torch.randn(n, p, generator=generator, dtype=torch.float64).to(dtype), n % 2 == 1).to(device)
    weight = torch.randn(d, p, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
    bias = torch.randn(d, generator=generator, dtype=torch.float64).to(device=device, dtype=acc) if with_bias else None
    residual = (torch.randn(n, d, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
                if with_residual else None)
    A_inv = spd(p + with_bias, generator).to(device=device, dtype=acc)
    B_cross = spd(d, generator).to(device=device, dtype=acc) if with_cross else None
    mean, alpha, sq_norm, quad = ops.item_stats(phi, weight, bias, residual, A_inv, B_cross)
    exp_mean, exp_alpha, exp_sq, exp_quad, magnitude = item_stats_oracle(phi, weight, bias, residual, A_inv, B_cross)
    tol = budget(dtype)
    assert mean.dtype == acc and mean.shape == (n, d) and alpha.shape == (n,) and sq_norm.shape == (n,)
    mean_mag = phi.double().cpu().abs() @ weight.double().cpu().abs().T + 1.0
    assert ((mean.double().cpu() - exp_mean).abs() / mean_mag).max() <= tol
    assert ((alpha.double().cpu() - exp_alpha).abs() / magnitude.clamp_min(1.0)).max() <= tol
    assert ((sq_norm.double().cpu() - exp_sq).abs() / exp_sq.clamp_min(1e-300)).max() <= 2 * tol
    if with_cross:
        assert quad.shape == (n,)
        assert ((quad.double().cpu() - exp_quad).abs() / exp_quad.clamp_min(1e-300)).max() <= 4 * tol
    else:
        assert quad.shape == (0,)


@needs_extension
def test_item_stats_opcheck_and_empty(generator):
    phi = torch.randn(6, 5, generator=generator)
    args = (phi, torch.randn(4, 5, generator=generator), torch.randn(4, generator=generator), None,
            spd(6, generator).float(), spd(4, generator).float())
    torch.library.opcheck(torch.ops.bayesvlm_ext.item_stats.default, args)
    mean, alpha, sq_norm, quad = ops.item_stats(phi[:0], *args[1:])
    assert mean.shape == (0, 4) and alpha.shape == (0,) and sq_norm.shape == (0,) and quad.shape == (0,)


def test_item_stats_errors_name_the_argument(generator):
    phi, weight, A = torch.randn(3, 5), torch.randn(4, 5), spd(5, generator).float()
    with pytest.raises(ValueError, match="'A_inv' must have shape \\(6, 6\\)"):
        ops.item_stats(phi, weight, torch.zeros(4), None, A, None)
    with pytest.raises(ValueError, match="'weight' must have shape"):
        ops.item_stats(phi, weight[:, :4], None, None, A, None)
    with pytest.raises(ValueError, match="'B_cross' must be torch.float32"):
        ops.item_stats(phi, weight, None, None, A, torch.eye(4, dtype=torch.float64))


# ---- compile -----------------------------------------------------------------------------------------------
@needs_extension
def test_fused_ops_compile_fullgraph(generator):
    data = pair_data(12, 17, 6, torch.float32, "cpu", generator, with_var=True)

    def score(x, y, xs, ys, xv, yv):
        mean, var = torch.ops.bayesvlm_ext.pairwise_moments(x, y, xs, ys, xv, yv, SCALE, BIAS, TRACE_CROSS, 0)
        values, indices, _, _ = torch.ops.bayesvlm_ext.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS,
                                                                    TRACE_CROSS, 3, 0, 1.0)
        return mean - var.sqrt(), values, indices

    compiled = torch.compile(score, fullgraph=True, backend="inductor")
    for got, expected in zip(compiled(*data), score(*data)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
@pytest.mark.parametrize("with_bias,with_cross", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("n,p,d", [(1, 3, 2), (300, 40, 24), (129, 7, 33)])
def test_item_stats_exact_matches_float64_oracle(device, dtype, with_bias, with_cross, n, p, d, generator):
    acc = acc_dtype(dtype)
    phi = strided(torch.randn(n, p, generator=generator, dtype=torch.float64).to(dtype), n % 2 == 1).to(device)
    weight = torch.randn(d, p, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
    bias = torch.randn(d, generator=generator, dtype=torch.float64).to(device=device, dtype=acc) if with_bias else None
    pa = p + with_bias
    Qa = torch.linalg.qr(torch.randn(pa, pa, generator=generator, dtype=torch.float64))[0].to(device=device, dtype=acc)
    K = (torch.rand(pa, d, generator=generator, dtype=torch.float64) + 0.1).to(device=device, dtype=acc)
    B_cross = spd(d, generator).to(device=device, dtype=acc) if with_cross else None
    mean, k, sq_norm, quad = ops.item_stats_exact(phi, weight, bias, None, Qa, K, B_cross)
    # Oracle in float64: z = [phi, 1] Qa, k_e = sum_c z_c^2 K_ce, item by item.
    x = phi.double().cpu()
    if with_bias:
        x = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    z = x @ Qa.double().cpu()
    exp_k = torch.stack([(zi * zi) @ K.double().cpu() for zi in z])
    magnitude = torch.stack([((xi.abs() @ Qa.double().cpu().abs()) ** 2) @ K.double().cpu() for xi in x])
    assert k.dtype == acc and k.shape == (n, d)
    assert ((k.double().cpu() - exp_k).abs() / magnitude).max() <= 2 * budget(dtype)
    exp_mean, _, exp_sq, exp_quad, _ = item_stats_oracle(phi, weight, bias, None, torch.eye(pa, dtype=acc), B_cross)
    mean_mag = phi.double().cpu().abs() @ weight.double().cpu().abs().T + 1.0
    assert ((mean.double().cpu() - exp_mean).abs() / mean_mag).max() <= budget(dtype)
    assert ((sq_norm.double().cpu() - exp_sq).abs() / exp_sq.clamp_min(1e-300)).max() <= 2 * budget(dtype)
    assert quad.shape == ((n,) if with_cross else (0,))


@needs_extension
def test_item_stats_exact_opcheck_and_errors(generator):
    phi = torch.randn(6, 5, generator=generator)
    Qa = torch.linalg.qr(torch.randn(6, 6, generator=generator))[0]
    args = (phi, torch.randn(4, 5, generator=generator), torch.randn(4, generator=generator), None, Qa,
            torch.rand(6, 4, generator=generator), None)
    torch.library.opcheck(torch.ops.bayesvlm_ext.item_stats_exact.default, args)
    with pytest.raises(ValueError, match="'K' must have shape \\(6, 4\\)"):
        ops.item_stats_exact(*args[:5], torch.rand(5, 4), None)
    with pytest.raises(ValueError, match="'Qa' must have shape"):
        ops.item_stats_exact(phi, args[1], None, None, Qa, torch.rand(5, 4), None)


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA path")
@pytest.mark.parametrize("with_var", [False, True], ids=["kron", "var-features"])
def test_pairwise_moments_tf32_within_tf32_budget(with_var, generator):
    # With TF32 allowed, float32 inputs are rounded to 10-bit mantissas (2^-11 ~ 4.9e-4) before the
    # tensor-core GEMM: the error budget is that rounding, accumulated in float32.
    data = pair_data(300, 700, 512, torch.float32, "cuda", generator, with_var)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        mean, var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    exp_mean, exp_var, magnitude = oracle_moments(*data)
    assert ((mean.double().cpu() - exp_mean).abs() / magnitude).max() <= 2e-3
    assert ((var.double().cpu() - exp_var).abs() / exp_var).max() <= 2e-3


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
