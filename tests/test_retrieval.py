"""The public API on the fused ops: cosine_moments outputs, cached gallery statistics and topk."""

import math

import pytest
import torch
from testing import devices, spd

import bayesvlm_ext
from bayesvlm_ext import EmbeddingDistribution, KronPosterior, cosine_moments, topk

D = 6
LOGIT_SCALE, LOGIT_BIAS = math.log(30.0), -1.5


def tower(generator, P, damping="kron", bias=False, dtype=torch.float64):
    return KronPosterior(spd(P + bias, generator), spd(D, generator),
                         torch.randn(D, P, generator=generator, dtype=torch.float64),
                         torch.randn(D, generator=generator, dtype=torch.float64) if bias else None,
                         prior_precision=0.5, pseudo_count=2.0, damping=damping)


def towers_and_features(generator, n=9, m=40, damping="kron"):
    post_q, post_g = tower(generator, 5, damping, bias=True), tower(generator, 4, damping)
    phi_q = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    phi_g = torch.randn(m, 4, generator=generator, dtype=torch.float64)
    return post_q, post_g, phi_q, phi_g


@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_fused_and_autograd_paths_agree(damping, generator):
    post_q, post_g, phi_q, phi_g = towers_and_features(generator, damping=damping)
    fused = cosine_moments(post_q.embed(phi_q), post_g.embed(phi_g), LOGIT_SCALE, LOGIT_BIAS)
    phi_q.requires_grad_(True)
    grad_path = cosine_moments(post_q.embed(phi_q), post_g.embed(phi_g), LOGIT_SCALE, LOGIT_BIAS)
    for got, expected in zip(grad_path, fused):
        torch.testing.assert_close(got.detach(), expected, rtol=1e-12, atol=1e-12)
    (grad_path[0].sum() + grad_path[1].sum()).backward()
    assert phi_q.grad is not None and torch.isfinite(phi_q.grad).all() and phi_q.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["kron", "diag", "exact"])
def test_probit_outputs_of_cosine_moments(variant, generator):
    post_q, post_g, phi_q, phi_g = towers_and_features(generator)
    q, g = post_q.embed(phi_q), post_g.embed(phi_g)
    mean, var = cosine_moments(q, g, LOGIT_SCALE, LOGIT_BIAS, variant=variant)
    probit = mean / torch.sqrt(1 + math.pi / 8 * var)
    first, var2 = cosine_moments(q, g, LOGIT_SCALE, LOGIT_BIAS, variant=variant, output="probit")
    torch.testing.assert_close(first, probit, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(var2, var, rtol=0, atol=0)
    first, _ = cosine_moments(q, g, LOGIT_SCALE, LOGIT_BIAS, variant=variant, output="sigmoid_probit")
    torch.testing.assert_close(first, torch.sigmoid(probit), rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="'output'"):
        cosine_moments(q, g, LOGIT_SCALE, output="softmax")


@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_embed_against_caches_the_gallery_statistics(damping, generator):
    post_q, post_g, phi_q, phi_g = towers_and_features(generator, damping=damping)
    q = post_q.embed(phi_q)
    gallery = post_g.embed(phi_g, against=post_q)
    assert gallery.sq_norm is not None
    torch.testing.assert_close(gallery.sq_norm, (gallery.mean ** 2).sum(-1), rtol=1e-13, atol=0)
    if damping == "kron":
        assert gallery.cached_cross_quad(q.shared) is not None
        expected = torch.einsum("md,de,me->m", gallery.mean, q.shared, gallery.mean)
        torch.testing.assert_close(gallery.cross_quad, expected, rtol=1e-12, atol=0)
        assert gallery.cached_cross_quad(q.shared + 1) is None  # another matrix: not reused
    plain = post_g.embed(phi_g)
    for got, expected in zip(cosine_moments(q, gallery, LOGIT_SCALE), cosine_moments(q, plain, LOGIT_SCALE)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def dense_topk(queries, gallery, k, score, kappa, variant=None):
    mean, var = cosine_moments(queries, gallery, LOGIT_SCALE, LOGIT_BIAS, variant=variant)
    key = {"mean": mean, "pessimistic": mean - kappa * var.sqrt(), "optimistic": mean + kappa * var.sqrt(),
           "probit": mean / torch.sqrt(1 + math.pi / 8 * var)}[score]
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]
    values = key.gather(1, order)
    return (torch.sigmoid(values) if score == "probit" else values), order, mean.gather(1, order), var.gather(1, order)


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("score", ["mean", "pessimistic", "optimistic", "probit"])
@pytest.mark.parametrize("variant", ["kron", "diag", "exact"])
def test_topk_equals_dense_scores(device, score, variant, generator):
    post_q, post_g, phi_q, phi_g = towers_and_features(generator, m=300)
    post_q, post_g = post_q.to(device), post_g.to(device)
    queries = post_q.embed(phi_q.to(device))
    gallery = post_g.embed(phi_g.to(device), against=post_q)
    values, indices, mean, var = topk(queries, gallery, 7, score=score, kappa=0.8, logit_scale=LOGIT_SCALE,
                                      logit_bias=LOGIT_BIAS, variant=variant)
    expected = dense_topk(queries, gallery, 7, score, 0.8, variant)
    assert torch.equal(indices, expected[1])
    for got, exp in zip((values, mean, var), (expected[0], expected[2], expected[3])):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_topk_with_diagonal_distributions(generator):
    # ProbVLM-style per-dimension variances go through the variance-feature GEMM.
    queries = EmbeddingDistribution.diagonal(torch.randn(5, D, generator=generator, dtype=torch.float64),
                                             torch.rand(5, D, generator=generator, dtype=torch.float64))
    gallery = EmbeddingDistribution.diagonal(torch.randn(80, D, generator=generator, dtype=torch.float64),
                                             torch.rand(80, D, generator=generator, dtype=torch.float64))
    values, indices, mean, var = topk(queries, gallery, 4, score="pessimistic", logit_scale=LOGIT_SCALE,
                                      logit_bias=LOGIT_BIAS)
    expected = dense_topk(queries, gallery, 4, "pessimistic", 1.0)
    assert torch.equal(indices, expected[1])
    torch.testing.assert_close(values, expected[0], rtol=1e-12, atol=1e-12)


def test_topk_float32_gallery_from_posteriors(generator):
    post_q, post_g, phi_q, phi_g = towers_and_features(generator, m=2000)
    queries = post_q.embed(phi_q.float())
    gallery = post_g.embed(phi_g.float(), against=post_q)
    values, indices, mean, var = topk(queries, gallery, 5, score="pessimistic", logit_scale=LOGIT_SCALE)
    assert values.dtype == torch.float32 and indices.dtype == torch.int64
    exp_mean, exp_var = cosine_moments(post_q.embed(phi_q), post_g.embed(phi_g), LOGIT_SCALE)  # float64
    key = exp_mean - exp_var.sqrt()
    torch.testing.assert_close(values.double(), key.gather(1, indices), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.double(), key.topk(5, dim=1).values, rtol=1e-5, atol=1e-5)


def test_topk_errors(generator):
    post_q, post_g, phi_q, phi_g = towers_and_features(generator, m=10)
    q, g = post_q.embed(phi_q), post_g.embed(phi_g)
    with pytest.raises(ValueError, match="'k' must be in \\[0, 10\\]"):
        topk(q, g, 11, logit_scale=LOGIT_SCALE)
    with pytest.raises(ValueError, match="'score'"):
        topk(q, g, 3, score="median", logit_scale=LOGIT_SCALE)
    with pytest.raises(ValueError, match="'kappa'"):
        topk(q, g, 3, kappa=float("nan"), logit_scale=LOGIT_SCALE)
    with pytest.raises(ValueError, match="EmbeddingDistribution"):
        topk(q.mean, g, 3, logit_scale=LOGIT_SCALE)
    with pytest.raises(TypeError):
        topk(q, g, 3)  # logit_scale is required


def test_backend_reports_the_compiled_cpu_path():
    if not bayesvlm_ext.has_extension():
        pytest.skip("compiled extension not built")
    assert bayesvlm_ext.backend("cpu") == "cpu"
