"""The structured covariance forms (SPEC.md section 3) against dense float64 covariances built by hand."""

import pytest
import torch

from bayesvlm_ext.distribution import (COVARIANCE_TYPES, CovarianceForm, DiagCovariance, EigenCovariance,
                                       EmbeddingDistribution, KronCovariance)

from testing import spd

N, D = 7, 5


def orthonormal(d, generator):
    return torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))[0]


def batches(generator):
    """One distribution per form with its dense covariances [N, D, D], built without the classes' own algebra."""
    mean = torch.randn(N, D, generator=generator, dtype=torch.float64)
    alpha = torch.rand(N, generator=generator, dtype=torch.float64)
    shared = spd(D, generator)
    k = torch.rand(N, D, generator=generator, dtype=torch.float64)
    basis = orthonormal(D, generator)
    variances = torch.rand(N, D, generator=generator, dtype=torch.float64)
    dense = {
        "kron": torch.stack([a * shared for a in alpha]),
        "eigen": torch.stack([basis @ torch.diag(ki) @ basis.T for ki in k]),
        "diag": torch.stack([torch.diag(v) for v in variances]),
    }
    dists = {"kron": EmbeddingDistribution.kron(mean, alpha, shared),
             "eigen": EmbeddingDistribution.eigen(mean, k, basis),
             "diag": EmbeddingDistribution.diagonal(mean, variances)}
    return dists, dense


FORMS = ["kron", "eigen", "diag"]


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(11)


@pytest.mark.parametrize("form", FORMS)
def test_trace_diagonal_dense_match_the_dense_covariance(form, generator):
    dists, dense = batches(generator)
    dist = dists[form]
    assert dist.form is CovarianceForm(form) and type(dist.covariance) is COVARIANCE_TYPES[CovarianceForm(form)]
    torch.testing.assert_close(dist.dense_covariance(), dense[form], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dist.trace(), dense[form].diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(dist.diagonal_variance(), dense[form].diagonal(dim1=1, dim2=2), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("form", ["kron", "eigen"])
def test_eigen_form_rebuilds_the_covariance(form, generator):
    dists, dense = batches(generator)
    k, basis = dists[form].eigen_form()
    torch.testing.assert_close(torch.einsum("ij,nj,kj->nik", basis, k, basis), dense[form], rtol=1e-10, atol=1e-12)


def test_diag_has_no_eigen_form(generator):
    dists, _ = batches(generator)
    with pytest.raises(ValueError, match="'diag'-form covariance has no shared eigenbasis"):
        dists["diag"].eigen_form()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rows", [slice(1, 5), torch.tensor([4, 0, 4, 2]), "mask"], ids=["slice", "index", "mask"])
def test_take_slices_per_item_tensors_and_shares_the_rest(form, rows, generator):
    dists, dense = batches(generator)
    dist = dists[form].precompute()
    if isinstance(rows, str):
        rows = torch.arange(N) % 2 == 0
    shared = dist.covariance.shared_tensors()  # a kron form's eigenbasis is computed here, before the take
    part = dist.take(rows)
    torch.testing.assert_close(part.dense_covariance(), dense[form][rows], rtol=1e-12, atol=1e-14)
    assert torch.equal(part.mean, dist.mean[rows]) and torch.equal(part.sq_norm, dist.sq_norm[rows])
    for name, tensor in shared.items():
        assert getattr(part.covariance, name) is tensor  # not copied
    assert type(dist[rows].covariance) is type(part.covariance)


@pytest.mark.parametrize("form", FORMS)
def test_to_casts_every_tensor(form, generator):
    dists, dense = batches(generator)
    moved = dists[form].precompute().to(torch.float32)
    tensors = [moved.mean, moved.sq_norm, *moved.covariance.per_item_tensors().values(),
               *moved.covariance.shared_tensors().values()]
    assert all(t.dtype == torch.float32 for t in tensors)
    torch.testing.assert_close(moved.dense_covariance().double(), dense[form], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", FORMS)
def test_cat_joins_parts_of_one_batch(form, generator):
    dists, dense = batches(generator)
    dist = dists[form]
    other = dists["kron"].covariance.shared if form == "kron" else None
    dist = dist.precompute(against=other)
    joined = EmbeddingDistribution.cat([dist[:3], dist[3:4], dist[4:]])
    torch.testing.assert_close(joined.dense_covariance(), dense[form], rtol=0, atol=0)
    assert torch.equal(joined.mean, dist.mean) and torch.equal(joined.sq_norm, dist.sq_norm)
    if other is not None:
        assert torch.equal(joined.cross_quad, dist.cross_quad) and joined.cached_cross_quad(other) is not None


def test_cat_refuses_other_shared_tensors_and_mixed_forms(generator):
    dists, _ = batches(generator)
    kron = dists["kron"]
    foreign = EmbeddingDistribution.kron(kron.mean, kron.alpha, kron.shared * 2)
    with pytest.raises(ValueError, match="must share one 'shared'"):
        EmbeddingDistribution.cat([kron, foreign])
    with pytest.raises(ValueError, match="covariances of one form"):
        EmbeddingDistribution.cat([kron, dists["diag"]])
    with pytest.raises(ValueError, match="at least one"):
        EmbeddingDistribution.cat([])


def test_cat_drops_statistics_cached_against_different_matrices(generator):
    dists, _ = batches(generator)
    kron = dists["kron"]
    a = kron[:3].precompute(against=kron.shared)
    b = kron[3:].precompute(against=kron.shared + 1)
    joined = EmbeddingDistribution.cat([a, b])
    assert joined.cross_quad is None and joined.cross_shared is None and joined.sq_norm is not None


@pytest.mark.parametrize("form", FORMS)
def test_tensors_round_trip_with_their_declared_shapes(form, generator):
    dists, _ = batches(generator)
    cov = dists[form].covariance
    tensors = cov.per_item_tensors() | cov.shared_tensors()
    assert set(tensors) == set(cov.PER_ITEM + cov.SHARED)
    assert {name: tuple(t.shape) for name, t in tensors.items()} == type(cov).shapes(N, D)
    rebuilt = type(cov).from_tensors(tensors)
    assert all(getattr(rebuilt, name) is t for name, t in tensors.items())


def test_kron_shared_tensors_fill_the_eigenbasis(generator):
    dists, _ = batches(generator)
    cov = dists["kron"].covariance
    assert cov.basis is None
    shared = cov.shared_tensors()
    basis, eigvals = shared["basis"], shared["shared_eigvals"]
    torch.testing.assert_close(basis @ torch.diag(eigvals) @ basis.T, cov.shared, rtol=1e-10, atol=1e-12)


def test_form_fields_read_through_the_distribution(generator):
    dists, _ = batches(generator)
    assert dists["kron"].alpha is dists["kron"].covariance.alpha and dists["kron"].variances is None
    assert dists["eigen"].k is dists["eigen"].covariance.k and dists["eigen"].alpha is None
    assert dists["diag"].variances is dists["diag"].covariance.variances and dists["diag"].basis is None
    with pytest.raises(AttributeError):
        dists["diag"].no_such_field


def test_replace_swaps_a_tensor_unchecked(generator):
    dists, _ = batches(generator)
    cov = dists["kron"].covariance
    copy = cov.shared.clone()
    replaced = cov.replace(shared=copy)
    assert replaced.shared is copy and replaced.alpha is cov.alpha and cov.shared is not copy


def test_checked_validates_the_covariance(generator):
    dists, _ = batches(generator)
    mean = dists["diag"].mean
    with pytest.raises(ValueError, match="argument 'covariance' must be a Covariance"):
        EmbeddingDistribution.checked(mean, torch.ones(N, D))
    with pytest.raises(ValueError, match="argument 'variances' must be non-negative"):
        EmbeddingDistribution.checked(mean, DiagCovariance(-torch.ones(N, D, dtype=torch.float64)))
    with pytest.raises(ValueError, match="argument 'k'"):
        EmbeddingDistribution.checked(mean, EigenCovariance(torch.ones(N + 1, D), torch.eye(D)))
    with pytest.raises(ValueError, match="argument 'alpha'"):
        EmbeddingDistribution.checked(mean, KronCovariance(torch.ones(N - 1), torch.eye(D)))
