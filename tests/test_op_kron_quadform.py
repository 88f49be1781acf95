"""The compiled op kron_quadform against the pure-PyTorch twin, autograd, opcheck and compile."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import acc_dtype, devices, dtypes, error_budget, needs_extension, spd

from bayesvlm_ext import _torch_impl, ops


def make_inputs(n, p, dtype, device, generator, transpose=False):
    phi = torch.randn(n, p, generator=generator, dtype=torch.float64)
    C = spd(p, generator)
    if transpose:  # same values, column-major storage
        phi = phi.T.contiguous().T
    return phi.to(device=device, dtype=dtype), C.to(device=device, dtype=acc_dtype(dtype))


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
# 2100: several CPU chunks
@pytest.mark.parametrize("n,p", [(1, 1), (7, 5), (300, 64), (513, 129), (33, 768), (2100, 17)])
@pytest.mark.parametrize("transpose", [False, True])
def test_kron_quadform_matches_float64_reference(device, dtype, n, p, transpose, generator):
    phi, C = make_inputs(n, p, dtype, device, generator, transpose)
    got = ops.kron_quadform(phi, C)
    assert got.dtype == acc_dtype(dtype) and got.shape == (n,) and got.device == phi.device
    # Oracle: float64 brute force on the same (rounded) inputs.
    expected = _torch_impl.kron_quadform(phi.double(), C.double())
    # Rounding error scales with sum |phi_j C_jk phi_k|, not with the value itself.
    magnitude = _torch_impl.kron_quadform(phi.double().abs(), C.double().abs())
    err = ((got.double() - expected).abs() / magnitude).max().item()
    assert err <= error_budget(torch.float32 if dtype != torch.float64 else dtype)


@pytest.mark.parametrize("device", devices, ids=str)
def test_kron_quadform_empty_and_does_not_modify_inputs(device, generator):
    phi, C = make_inputs(0, 4, torch.float32, device, generator)
    out = ops.kron_quadform(phi, C)
    assert out.shape == (0,) and out.dtype == torch.float32
    phi, C = make_inputs(5, 4, torch.float32, device, generator)
    phi_before, C_before = phi.clone(), C.clone()
    ops.kron_quadform(phi, C)
    assert torch.equal(phi, phi_before) and torch.equal(C, C_before)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 70), p=st.integers(1, 40), dtype=st.sampled_from(dtypes), step=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_kron_quadform_property_shapes_and_strides(n, p, dtype, step, seed):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(n * step, p * step, generator=g, dtype=torch.float64).to(dtype)
    phi = big[::step, ::step]  # non-contiguous views with arbitrary strides
    C = spd(p, g).to(acc_dtype(dtype))
    got = ops.kron_quadform(phi, C)
    expected = _torch_impl.kron_quadform(phi.double(), C.double())
    assert got.shape == (n,)
    magnitude = _torch_impl.kron_quadform(phi.double().abs(), C.double().abs())
    if n:
        assert ((got.double() - expected).abs() / magnitude.clamp_min(1e-300)).max() <= error_budget(
            torch.float32 if dtype != torch.float64 else dtype)


def test_kron_quadform_rejects_bad_input():
    phi = torch.randn(3, 4)
    with pytest.raises(ValueError, match="'C'"):
        ops.kron_quadform(phi, torch.randn(5, 5))
    with pytest.raises(ValueError, match="'C'.*float32"):
        ops.kron_quadform(phi, torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="'phi'"):
        ops.kron_quadform(torch.randn(3), torch.randn(4, 4))
    with pytest.raises(ValueError, match="'phi'"):
        ops.kron_quadform(torch.ones(3, 4, dtype=torch.int64), torch.randn(4, 4))


@needs_extension
def test_compiled_op_checks_arguments_too():
    # The C++ host code validates on its own (ValueError), for callers of torch.ops directly.
    with pytest.raises(ValueError, match="'C'"):
        torch.ops.bayesvlm_ext.kron_quadform(torch.randn(3, 4), torch.randn(5, 5))


@needs_extension
@pytest.mark.parametrize("device", devices, ids=str)
def test_kron_quadform_gradcheck(device, generator):
    phi = torch.randn(6, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_()
    C = torch.randn(5, 5, generator=generator, dtype=torch.float64).to(device).requires_grad_()  # not symmetric
    assert torch.autograd.gradcheck(ops.kron_quadform, (phi, C))
    assert torch.autograd.gradgradcheck(ops.kron_quadform, (phi, C))


@needs_extension
@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_kron_quadform_opcheck(device, dtype, generator):
    phi, C = make_inputs(9, 7, dtype, device, generator)
    torch.library.opcheck(torch.ops.bayesvlm_ext.kron_quadform.default, (phi, C))
    torch.library.opcheck(torch.ops.bayesvlm_ext.kron_quadform.default,
                          (phi.requires_grad_(), C.requires_grad_()))


@needs_extension
def test_kron_quadform_torch_compile_fullgraph(generator):
    phi, C = make_inputs(17, 6, torch.float32, "cpu", generator)

    @torch.compile(fullgraph=True)
    def f(x, c):
        return torch.ops.bayesvlm_ext.kron_quadform(x * 2, c).sum()

    assert torch.allclose(f(phi, C), 4 * _torch_impl.kron_quadform(phi, C).sum(), rtol=1e-5)
