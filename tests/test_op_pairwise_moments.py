"""The fused op pairwise_moments against a float64 oracle and its PyTorch twin.

The oracle (testing.oracle_moments) is written from SPEC.md section 4 in float64 on the same rounded inputs;
the compiled op must stay within the error budget of its accumulation precision.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import (BIAS, SCALE, TRACE_CROSS, acc_dtype, budget, devices, dtypes, needs_extension, oracle_moments,
                     pair_data, tf32_matmul)

from bayesvlm_ext import _torch_impl, ops


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
    ref = _torch_impl.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 1)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 is a CUDA path")
@pytest.mark.parametrize("with_var", [False, True], ids=["kron", "var-features"])
def test_pairwise_moments_tf32_within_tf32_budget(with_var, generator):
    # With TF32 allowed, float32 inputs are rounded to 10-bit mantissas (2^-11 ~ 4.9e-4) before the
    # tensor-core GEMM: the error budget is that rounding, accumulated in float32.
    # The result must also differ from full fp32 by more than fp32's own rounding (~1e-7): else the plain fp32
    # GEMM ran and this test would pass without testing TF32.
    data = pair_data(300, 700, 512, torch.float32, "cuda", generator, with_var)
    with tf32_matmul(True):
        mean, var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 0)
    with tf32_matmul(False):
        full_mean, full_var = ops.pairwise_moments(*data, SCALE, BIAS, TRACE_CROSS, 0)
    exp_mean, exp_var, magnitude = oracle_moments(*data)
    assert ((mean.double().cpu() - exp_mean).abs() / magnitude).max() <= 2e-3
    assert ((var.double().cpu() - exp_var).abs() / exp_var).max() <= 2e-3
    assert ((mean - full_mean).double().cpu().abs() / magnitude).max() > 1e-6, "TF32 allowed, yet full fp32 ran"
    if with_var:  # the var-feature GEMM follows the same setting
        assert ((var - full_var).double().cpu().abs() / exp_var).max() > 1e-6, "TF32 allowed, yet full fp32 ran"
