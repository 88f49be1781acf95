"""The fused ops item_stats and item_stats_exact against float64 oracles written from SPEC.md section 3.

The oracles work item by item in float64 on the same rounded inputs; the compiled ops must stay within
the error budget of their accumulation precision.
"""

import pytest
import torch
from testing import acc_dtype, budget, devices, dtypes, needs_extension, spd, strided

from bayesvlm_ext import ops


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
