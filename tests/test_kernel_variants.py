"""One small call of every compiled kernel variant against a float64 reference on the CPU.

Every template instantiation the CUDA launchers dispatch to: each input dtype; TF32 off and on (the GEMM
policies of fp32 data: CUDA-core FMA or tf32 tensor cores); the Kronecker closed form, variance features,
the projection features and both; each first output of pairwise_moments; top-k with short fused lists,
with more gallery segments than one, and past the fused k (the streaming fallback); item_stats and
item_stats_exact with and without bias, residual and B_cross; kron_quadform. Shapes cut partial tiles in
every dimension (N, M, D past a multiple of 64, the depth past a multiple of the 32-deep slab) and one side
is read through strides, so both operand loaders run.

This is the set `make gpu-check` (tools/gpu_check.sh) runs under compute-sanitizer memcheck and racecheck:
small enough that both tools finish in a minute or two, broad enough that every kernel runs under both.
The numbers are the op tests' concern (test_op_*.py); the bounds here are norm-wise and loose enough for
TF32. The references run on the CPU, so that under the sanitizers the GPU runs little but these kernels.
"""

import pytest
import torch
from testing import devices, dtypes, needs_extension, spd, strided, tf32_matmul

from bayesvlm_ext import KronPosterior, _torch_impl, ops
from bayesvlm_ext.moments import pairwise_inputs

pytestmark = needs_extension

# N, M past a multiple of the 64-row tile; D (the GEMM depth) past a multiple of the 32-deep slab.
N, M, D, P = 37, 600, 72, 24
SCALE, BIAS, KAPPA = 12.0, -0.7, 0.8
VARIANTS = {  # name: (damping, variant of pairwise_inputs); "exact" damping gives variance features
    "kron": ("kron", None),
    "var": ("exact", None),
    "proj": ("kron", "projected"),
    "var-proj": ("exact", "projected"),
}


def _math_cases():
    """(device, dtype, tf32): TF32 only where a CUDA GEMM policy depends on it (not fp64, not the CPU)."""
    return [pytest.param(device, dtype, tf32, id=f"{device}-{str(dtype).replace('torch.', '')}-"
                         f"{'tf32' if tf32 else 'ieee'}")
            for device in devices for dtype in dtypes
            for tf32 in ((False, True) if device.type == "cuda" and dtype != torch.float64 else (False,))]


def _cases():
    return [pytest.param(device, dtype, id=f"{device}-{str(dtype).replace('torch.', '')}")
            for device in devices for dtype in dtypes]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, on the CPU in float64; every element of `got` must be finite."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert bool(got.isfinite().all()), "non-finite output"
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def tolerance(dtype: torch.dtype, tf32: bool) -> float:
    # Inputs are read exactly and accumulated in float32 (float64), except the TF32 GEMMs' 10-bit rounding.
    return 1e-10 if dtype == torch.float64 else (1e-2 if tf32 else 1e-4)


def pair_inputs(dtype, device, variant, generator):
    """The pairwise ops' arguments of two small embedded towers (CPU float64 posteriors), moved to `device`;
    x column-major for "kron" and "proj", y for the others."""
    damping, which = VARIANTS[variant]

    def posterior():
        return KronPosterior(spd(P, generator), spd(D, generator),
                             torch.randn(D, P, generator=generator, dtype=torch.float64), damping=damping,
                             prior_precision=20.0)

    px, py = posterior(), posterior()
    x = px.embed(torch.randn(N, P, generator=generator, dtype=torch.float64).to(dtype), against=py)
    y = py.embed(torch.randn(M, P, generator=generator, dtype=torch.float64).to(dtype), against=px)
    inputs = pairwise_inputs(x, y, which)
    assert (inputs.x_var is not None) == variant.startswith("var")
    assert (inputs.x_proj is not None) == variant.endswith("proj")
    transpose_x = variant in ("kron", "proj")
    moved = [None if t is None else t.to(device) for t in inputs[:6]]
    moved[0], moved[1] = strided(moved[0], transpose_x), strided(moved[1], not transpose_x)
    proj = [None if t is None else t.to(device) for t in (inputs.x_proj, inputs.y_proj)]
    return moved, inputs.trace_cross, proj


def on_cpu64(tensors):
    return [None if t is None else t.double().cpu() for t in tensors]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("device,dtype,tf32", _math_cases())
def test_pairwise_and_topk_kernels(device, dtype, tf32, variant, generator):
    tensors, trace_cross, proj = pair_inputs(dtype, device, variant, generator)
    ref_tensors, ref_proj = on_cpu64(tensors), on_cpu64(proj)
    tol = tolerance(dtype, tf32)
    with tf32_matmul(tf32):
        for output in (0, 1, 2):
            got = ops.pairwise_moments(*tensors, SCALE, BIAS, trace_cross, output, *proj)
            want = _torch_impl.pairwise_moments(*ref_tensors, SCALE, BIAS, trace_cross, output, *ref_proj)
            for name, a, b in zip(("first", "var"), got, want):
                assert rel_error(a, b) <= tol, (output, name, rel_error(a, b))
            if tf32 and dtype == torch.float32 and output == 0:
                # the main GEMM on tf32 tensor cores: tf32's error (about 1e-4 here), not fp32's (2e-7)
                assert rel_error(got[0], want[0]) > 1e-5, "TF32 allowed, yet the fp32 GEMM ran in full fp32"
        dense_mean, dense_var = _torch_impl.pairwise_moments(*ref_tensors, SCALE, BIAS, trace_cross, 0, *ref_proj)
        # k = 1 and 10: the fused lists (10 over several gallery segments and their merge); k = 129: past the
        # largest fused k, the streaming fallback
        for k, score in [(1, 0), (10, 0), (10, 1), (10, 2), (10, 3), (129, 3)]:
            values, index, mean, var = ops.topk_moments(*tensors, SCALE, BIAS, trace_cross, k, score, KAPPA, *proj)
            want = _torch_impl.topk_moments(*ref_tensors, SCALE, BIAS, trace_cross, k, score, KAPPA, *ref_proj)
            index = index.cpu()
            assert index.shape == (N, k) and bool(((index >= 0) & (index < M)).all())
            assert all(len(set(row.tolist())) == k for row in index), "an item twice in one list"
            assert rel_error(values, want[0]) <= tol, (k, score, rel_error(values, want[0]))
            # near-ties may swap between backends: each chosen item's moments are its own
            assert rel_error(mean, dense_mean.gather(1, index)) <= tol, (k, score)
            assert rel_error(var, dense_var.gather(1, index)) <= tol, (k, score)


def item_inputs(dtype, device, with_bias, with_residual, with_cross, generator, n=70, p=45, d=150):
    """phi [n, p] (strided: column-major) and the accumulation-dtype weights; n past the 32-row block,
    p past the 32-deep chunk, d past the 128-column tile."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    phi = strided(torch.randn(n, p, generator=generator, dtype=torch.float64).to(dtype), True).to(device)
    weight = torch.randn(d, p, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
    bias = torch.randn(d, generator=generator, dtype=torch.float64).to(device=device, dtype=acc) if with_bias else None
    residual = (torch.randn(n, d, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
                if with_residual else None)
    B_cross = spd(d, generator).to(device=device, dtype=acc) if with_cross else None
    return phi, weight, bias, residual, B_cross, acc


FLAGS = [pytest.param(False, False, False, id="plain"), pytest.param(True, False, True, id="bias-cross"),
         pytest.param(False, True, True, id="residual-cross"), pytest.param(True, True, False, id="bias-residual")]


@pytest.mark.parametrize("with_bias,with_residual,with_cross", FLAGS)
@pytest.mark.parametrize("device,dtype", _cases())
def test_item_stats_kernels(device, dtype, with_bias, with_residual, with_cross, generator):
    phi, weight, bias, residual, B_cross, acc = item_inputs(dtype, device, with_bias, with_residual, with_cross,
                                                            generator)
    pa = phi.shape[1] + with_bias
    A_inv = spd(pa, generator).to(device=device, dtype=acc)
    got = ops.item_stats(phi, weight, bias, residual, A_inv, B_cross)
    want = _torch_impl.item_stats(*on_cpu64([phi, weight, bias, residual, A_inv, B_cross]))
    for name, a, b in zip(("mean", "alpha", "sq_norm", "cross_quad"), got, want):
        assert rel_error(a, b) <= tolerance(dtype, False), (name, rel_error(a, b))

    Qa = torch.linalg.qr(torch.randn(pa, pa, generator=generator, dtype=torch.float64))[0].to(device=device,
                                                                                              dtype=acc)
    K = (torch.rand(pa, weight.shape[0], generator=generator, dtype=torch.float64) + 0.1).to(device=device,
                                                                                              dtype=acc)
    got = ops.item_stats_exact(phi, weight, bias, residual, Qa, K, B_cross)
    want = _torch_impl.item_stats_exact(*on_cpu64([phi, weight, bias, residual, Qa, K, B_cross]))
    for name, a, b in zip(("mean", "k", "sq_norm", "cross_quad"), got, want):
        assert rel_error(a, b) <= tolerance(dtype, False), (name, rel_error(a, b))


@pytest.mark.parametrize("device,dtype", _cases())
def test_kron_quadform_kernel(device, dtype, generator):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    phi = strided(torch.randn(37, 70, generator=generator, dtype=torch.float64).to(dtype), True).to(device)
    C = spd(70, generator).to(device=device, dtype=acc)
    got = ops.kron_quadform(phi, C)
    assert rel_error(got, _torch_impl.kron_quadform(phi.double().cpu(), C.double().cpu())) <= tolerance(dtype, False)
    got = ops.kron_quadform(phi.contiguous(), C)
    assert rel_error(got, _torch_impl.kron_quadform(phi.double().cpu(), C.double().cpu())) <= tolerance(dtype, False)
