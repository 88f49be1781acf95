"""kron.KronDecomposed and KronFactors against dense float64 Kronecker products (SPEC.md sections 2, 6, 8)."""

import math

import pytest
import torch

from bayesvlm_ext.kron import Damping, KronDecomposed, KronFactors

from testing import spd

P, Q = 4, 3


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(5)


def dense_precision(A, B, damping, n, lam):
    """[Q P, Q P] for row-major vec(delta), delta [Q, P]: the quadratic form is vec^T X vec."""
    if damping is Damping.KRON:
        a_d = math.sqrt(n) * A + math.sqrt(lam) * torch.eye(P, dtype=A.dtype)
        b_d = math.sqrt(n) * B + math.sqrt(lam) * torch.eye(Q, dtype=B.dtype)
        return torch.kron(b_d, a_d)
    return n * torch.kron(B, A) + lam * torch.eye(P * Q, dtype=A.dtype)


@pytest.mark.parametrize("damping", list(Damping))
def test_grid_logdet_quadratic_and_samples_match_the_dense_precision(damping, generator):
    A, B = spd(P, generator), spd(Q, generator)
    decomposed = KronDecomposed(A, B)
    n, lam = 2.5, 0.7
    precision = dense_precision(A, B, damping, n, lam)
    eigenvalues = torch.linalg.eigvalsh(precision)
    torch.testing.assert_close(decomposed.grid(damping, n, lam).flatten().sort().values, eigenvalues,
                               rtol=1e-10, atol=1e-12)
    assert decomposed.logdet(damping, n, lam) == pytest.approx(float(torch.logdet(precision)), rel=1e-12)
    delta = torch.randn(Q, P, generator=generator, dtype=torch.float64)
    expected = delta.flatten() @ precision @ delta.flatten()
    torch.testing.assert_close(decomposed.quadratic(delta, damping, n, lam), expected, rtol=1e-10, atol=0)
    # sample() is a linear map L of z: its covariance L L^T must be the precision's inverse
    units = torch.eye(P * Q, dtype=torch.float64).reshape(P * Q, Q, P)
    L = decomposed.sample(units, damping, n, lam).reshape(P * Q, P * Q).T
    torch.testing.assert_close(L @ L.T, torch.linalg.inv(precision), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("damping", list(Damping))
def test_evidence_slope_is_the_log_lam_derivative(damping, generator):
    A, B = spd(P, generator), spd(Q, generator)
    decomposed, n, map_sq_norm = KronDecomposed(A, B), 1.5, 3.0

    def evidence(log_lam):
        lam = math.exp(log_lam)
        return -0.5 * lam * map_sq_norm + 0.5 * P * Q * log_lam - 0.5 * decomposed.logdet(damping, n, lam)

    h = 1e-5
    for log_lam in (-2.0, 0.0, 1.5):
        finite_difference = (evidence(log_lam + h) - evidence(log_lam - h)) / (2 * h)
        slope = decomposed.evidence_slope(damping, n, math.exp(log_lam), map_sq_norm)
        assert slope == pytest.approx(2 * finite_difference, rel=1e-6)


def test_a_far_from_psd_factor_is_refused_and_round_off_is_clamped(generator):
    A = spd(P, generator)
    with pytest.raises(ValueError, match="argument 'A' is not positive semi-definite"):
        KronDecomposed(-A, spd(Q, generator))
    rank_deficient = spd(P, generator, rank=2)
    rank_deficient = rank_deficient - 1e-9 * torch.eye(P, dtype=torch.float64)  # two eigenvalues of -1e-9
    decomposed = KronDecomposed(rank_deficient, spd(Q, generator))
    assert decomposed.reports["A"].num_clamped == 2 and bool((decomposed.eigenvalues["A"] >= 0).all())


def test_factor_addition_equals_one_fit_on_all_data(generator):
    a1, a2 = (torch.randn(k, P, generator=generator, dtype=torch.float64) for k in (5, 3))
    h1, h2 = (torch.randn(k, Q, Q, generator=generator, dtype=torch.float64) for k in (5, 3))
    h1, h2 = h1 @ h1.transpose(1, 2), h2 @ h2.transpose(1, 2)
    first = KronFactors.from_sums(a1.T @ a1, h1.sum(0), 5)
    second = KronFactors.from_sums(a2.T @ a2, h2.sum(0), 3)
    everything = torch.cat([a1, a2])
    whole = KronFactors.from_sums(everything.T @ everything, h1.sum(0) + h2.sum(0), 8)
    total = first + second
    assert total.num_data == 8
    torch.testing.assert_close(total.A, whole.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total.B, whole.B, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(total.A, everything.T @ everything / math.sqrt(8), rtol=1e-12, atol=1e-14)


def test_factor_addition_refuses_other_layers_and_no_data(generator):
    f = KronFactors.from_sums(spd(P, generator), spd(Q, generator), 2)
    with pytest.raises(ValueError, match="different layers"):
        f + KronFactors.from_sums(spd(P + 1, generator), spd(Q, generator), 2)
    empty = KronFactors.from_sums(torch.zeros(P, P, dtype=torch.float64), torch.zeros(Q, Q, dtype=torch.float64), 0)
    with pytest.raises(ValueError, match="no data at all"):
        empty + empty
    with pytest.raises(ValueError, match="argument 'num_data'"):
        KronFactors.from_sums(spd(P, generator), spd(Q, generator), -1)


def test_factors_of_a_fit_round_trip_through_their_sums(generator):
    A, B = spd(P, generator), spd(Q, generator)
    fitted = KronFactors.from_factors(A, B, 7)
    torch.testing.assert_close(fitted.A, A, rtol=1e-15, atol=0)
    torch.testing.assert_close(fitted.A_sum, math.sqrt(7) * A, rtol=0, atol=0)
    nothing = KronFactors.from_factors(A, B, 0)  # factors of no data count for nothing
    assert torch.equal(nothing.A_sum, torch.zeros_like(A)) and nothing.num_data == 0
