"""Core op benchmarks, float32: the compiled/fused paths against the pure-PyTorch reference and torch.mm.

Every benchmark first checks its result (float64 oracle, float32 error budget), then times with
`benchmark.pedantic` (one warm-up round, a fixed number of rounds, synchronised on CUDA).
`extra_info["role"]` tells benchmarks/report.py which entry of a group is the baseline ("baseline")
and which the naive reference ("reference"); ratios are taken to those.

Run: `pytest benchmarks --benchmark-only`; `python -m benchmarks.report` runs this and writes
`benchmarks/results/<device>.json`.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import bayesvlm_ext
from bayesvlm_ext import EmbeddingDistribution, cosine_moments, ops, reference

from .conftest import LOGIT_SCALE, MOMENTS_SHAPE, QUADFORM_SHAPE, synchronize

ROUNDS = 10

QUADFORM_GROUP = "kron_quadform N={N} P={P} float32".format(**QUADFORM_SHAPE)
MOMENTS_GROUP = "cosine_moments N={N} M={M} D={D} float32".format(**MOMENTS_SHAPE)

# float32 error budget against a float64 oracle, relative to the largest magnitude of the result:
# sums of P = 768 (or 2 D = 1024) products lose a few hundred ulps at worst (2^-23 ~ 1.2e-7).
RTOL = 1e-5


def assert_close_to_oracle(name: str, actual: Tensor, oracle: Tensor) -> None:
    """max |actual - oracle| <= RTOL * max |oracle| (actual float32, oracle float64)."""
    assert actual.dtype == torch.float32, f"{name}: expected a float32 result, got {actual.dtype}"
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    error = (actual.double() - oracle).abs().max().item()
    bound = RTOL * oracle.abs().max().item()
    assert error <= bound, f"{name}: max abs error {error:.3g} exceeds {bound:.3g} (rtol {RTOL:g} of max |oracle|)"


def run_timed(benchmark, fn, device: torch.device, role: str, **info):
    """Time fn() with pedantic rounds, synchronising on CUDA, and record the role and shapes."""
    def call():
        result = fn()
        synchronize(device)
        return result

    benchmark.extra_info.update(role=role, device=str(device), backend=bayesvlm_ext.backend(device),
                                threads=torch.get_num_threads(), **info)
    return benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)


# ---- (a) alpha = phi^T C phi per row ---------------------------------------------------------------
def quadform_oracle(
    phi: Tensor,  # [N, P]
    C: Tensor,  # [P, P]
) -> Tensor:  # [N] float64
    return reference.kron_quadform(phi.double(), C.double())


@pytest.mark.benchmark(group=QUADFORM_GROUP)
def test_kron_quadform_ops(benchmark, quadform_inputs, device):
    phi, C = quadform_inputs
    assert_close_to_oracle("ops.kron_quadform", ops.kron_quadform(phi, C), quadform_oracle(phi, C))
    run_timed(benchmark, lambda: ops.kron_quadform(phi, C), device, "candidate", shape=QUADFORM_SHAPE)


@pytest.mark.benchmark(group=QUADFORM_GROUP)
def test_kron_quadform_reference(benchmark, quadform_inputs, device):
    phi, C = quadform_inputs
    assert_close_to_oracle("reference.kron_quadform", reference.kron_quadform(phi, C), quadform_oracle(phi, C))
    run_timed(benchmark, lambda: reference.kron_quadform(phi, C), device, "baseline", shape=QUADFORM_SHAPE)


# ---- (b) logit mean and variance for an N x M block --------------------------------------------
def moments_oracle(
    img: EmbeddingDistribution,  # N items, kron form
    txt: EmbeddingDistribution,  # M items, kron form
    variances: bool = True,  # False: per-dimension variances only (the "diag" approximation)
) -> tuple[Tensor, Tensor]:  # mean [N, M], var [N, M], float64
    """SPEC.md section 4 written out in float64 from each item's covariance, never through the GEMM tricks.

    Kron form: S = alpha * shared, so mu_x^T S_y mu_x = alpha_y (mu_x^T By mu_x) and
    tr(S_x S_y) = alpha_x alpha_y tr(Bx By); "diag" replaces each shared matrix by its diagonal.
    """
    mx, my = img.mean.double(), txt.mean.double()
    ax, ay = img.alpha.double(), txt.alpha.double()
    bx, by = img.shared.double(), txt.shared.double()
    if not variances:
        bx, by = torch.diag(torch.diagonal(bx)), torch.diag(torch.diagonal(by))
    quad_x = torch.einsum("nd,de,ne->n", mx, by, mx)  # [N] mu_x^T By mu_x
    quad_y = torch.einsum("md,de,me->m", my, bx, my)  # [M]
    dot_var = ay[None] * quad_x[:, None] + ax[:, None] * quad_y[None] + torch.outer(ax, ay) * torch.trace(bx @ by)
    sq_norm_x = (mx * mx).sum(1) + ax * torch.trace(bx)  # E||x||^2
    sq_norm_y = (my * my).sum(1) + ay * torch.trace(by)
    norms = torch.outer(sq_norm_x, sq_norm_y)
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64).exp()
    return scale * (mx @ my.T) / norms.sqrt(), scale**2 * dot_var / norms


@pytest.mark.benchmark(group=MOMENTS_GROUP)
@pytest.mark.parametrize("variant", ["kron", "diag"])
def test_cosine_moments(benchmark, moments_inputs, device, variant):
    img, txt = moments_inputs
    mean, var = cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant=variant)
    oracle_mean, oracle_var = moments_oracle(img, txt, variances=variant == "kron")
    assert_close_to_oracle(f"cosine_moments {variant}: mean", mean, oracle_mean)
    assert_close_to_oracle(f"cosine_moments {variant}: var", var, oracle_var)
    run_timed(benchmark, lambda: cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant=variant), device,
              "candidate", shape=MOMENTS_SHAPE)


@pytest.mark.benchmark(group=MOMENTS_GROUP)
def test_cosine_moments_reference_diag(benchmark, moments_inputs, device):
    img, txt = moments_inputs
    var_img, var_txt = img.diagonal_variance(), txt.diagonal_variance()  # [N, D], [M, D], outside the timing
    mean, var = reference.cosine_moments_diag(img.mean, var_img, txt.mean, var_txt, logit_scale=LOGIT_SCALE)
    oracle_mean, oracle_var = moments_oracle(img, txt, variances=False)
    assert_close_to_oracle("reference.cosine_moments_diag: mean", mean, oracle_mean)
    assert_close_to_oracle("reference.cosine_moments_diag: var", var, oracle_var)
    run_timed(benchmark, lambda: reference.cosine_moments_diag(img.mean, var_img, txt.mean, var_txt,
                                                               logit_scale=LOGIT_SCALE),
              device, "reference", shape=MOMENTS_SHAPE)


@pytest.mark.benchmark(group=MOMENTS_GROUP)
def test_cosine_similarity_mm(benchmark, moments_inputs, device):
    """The deterministic model's cost: one GEMM of the means, the floor for any moment computation."""
    img, txt = moments_inputs
    assert_close_to_oracle("torch.mm", torch.mm(img.mean, txt.mean.T), img.mean.double() @ txt.mean.double().T)
    run_timed(benchmark, lambda: torch.mm(img.mean, txt.mean.T), device, "baseline", shape=MOMENTS_SHAPE)
