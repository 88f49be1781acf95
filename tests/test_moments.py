"""cosine_moments against the dense formulas of SPEC.md section 4, Monte Carlo and the reference."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import spd

from bayesvlm_ext import EmbeddingDistribution, KronPosterior, cosine_moments, reference

D = 4


def towers(generator, damping_img="kron", damping_txt="kron", P_img=5, P_txt=3):
    def tower(P, damping, bias):
        return KronPosterior(spd(P + bias, generator), spd(D, generator), torch.randn(D, P, generator=generator,
                             dtype=torch.float64), torch.randn(D, generator=generator, dtype=torch.float64) if bias
                             else None, prior_precision=0.8, pseudo_count=1.7, damping=damping)
    return tower(P_img, damping_img, True), tower(P_txt, damping_txt, False)


def embed_pair(generator, N=6, M=5, **kwargs):
    post_img, post_txt = towers(generator, **kwargs)
    img = post_img.embed(torch.randn(N, post_img.in_features, generator=generator, dtype=torch.float64))
    txt = post_txt.embed(torch.randn(M, post_txt.in_features, generator=generator, dtype=torch.float64))
    return img, txt


def dense_moments(mu_x, S_x, mu_y, S_y, logit_scale, logit_bias):
    """SPEC.md section 4 written out pair by pair with dense covariances."""
    N, M = mu_x.shape[0], mu_y.shape[0]
    mean, var = torch.empty(N, M, dtype=torch.float64), torch.empty(N, M, dtype=torch.float64)
    s = math.exp(logit_scale)
    for i in range(N):
        for j in range(M):
            dot = mu_x[i] @ mu_y[j]
            dot_var = mu_x[i] @ S_y[j] @ mu_x[i] + mu_y[j] @ S_x[i] @ mu_y[j] + torch.trace(S_x[i] @ S_y[j])
            norms = (mu_x[i] @ mu_x[i] + torch.trace(S_x[i])) * (mu_y[j] @ mu_y[j] + torch.trace(S_y[j]))
            mean[i, j] = s * dot / norms.sqrt() + logit_bias
            var[i, j] = s * s * dot_var / norms
    return mean, var


@pytest.mark.parametrize("variant,damping_img,damping_txt", [
    ("kron", "kron", "kron"), (None, "kron", "kron"), ("exact", "kron", "kron"), ("exact", "exact", "exact"),
    ("exact", "kron", "exact"), (None, "exact", "kron")])
def test_exact_variants_match_dense_formulas(variant, damping_img, damping_txt, generator):
    img, txt = embed_pair(generator, damping_img=damping_img, damping_txt=damping_txt)
    mean, var = cosine_moments(img, txt, logit_scale=1.3, logit_bias=-0.4, variant=variant)
    expected_mean, expected_var = dense_moments(img.mean, img.dense_covariance(), txt.mean, txt.dense_covariance(),
                                                1.3, -0.4)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_diag_variant_matches_dense_formulas_with_diagonal_covariances(damping, generator):
    img, txt = embed_pair(generator, damping_img=damping, damping_txt=damping)
    mean, var = cosine_moments(img, txt, logit_scale=0.5, variant="diag")
    diag_img, diag_txt = (torch.diag_embed(d.diagonal_variance()) for d in (img, txt))
    expected_mean, expected_var = dense_moments(img.mean, diag_img, txt.mean, diag_txt, 0.5, 0.0)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, expected_var, rtol=1e-10, atol=1e-14)
    # The published formulation (three GEMMs) gives the same numbers.
    ref_mean, ref_var = reference.cosine_moments_diag(img.mean, img.diagonal_variance(), txt.mean,
                                                      txt.diagonal_variance(), 0.5)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-14)


def test_reference_embedding_variance_diag_matches_posterior(generator):
    post = KronPosterior(spd(5, generator), spd(D, generator), torch.randn(D, 5, generator=generator,
                         dtype=torch.float64), prior_precision=0.8, pseudo_count=1.7)
    phi = torch.randn(7, 5, generator=generator, dtype=torch.float64)
    dist = post.embed(phi)
    A_inv = torch.linalg.inv(math.sqrt(1.7) * post.A + math.sqrt(0.8) * torch.eye(5, dtype=torch.float64))
    B_inv = torch.linalg.inv(math.sqrt(1.7) * post.B + math.sqrt(0.8) * torch.eye(D, dtype=torch.float64))
    torch.testing.assert_close(dist.diagonal_variance(), reference.embedding_variance_diag(phi, A_inv, B_inv),
                               rtol=1e-11, atol=1e-14)


def test_diagonal_form_inputs(generator):
    mu_x = torch.randn(5, D, generator=generator, dtype=torch.float64)
    mu_y = torch.randn(3, D, generator=generator, dtype=torch.float64)
    v_x = torch.rand(5, D, generator=generator, dtype=torch.float64)
    v_y = torch.rand(3, D, generator=generator, dtype=torch.float64)
    img, txt = EmbeddingDistribution.diagonal(mu_x, v_x), EmbeddingDistribution.diagonal(mu_y, v_y)
    mean, var = cosine_moments(img, txt, logit_scale=2.0, logit_bias=1.0)
    expected = dense_moments(mu_x, torch.diag_embed(v_x), mu_y, torch.diag_embed(v_y), 2.0, 1.0)
    torch.testing.assert_close((mean, var), expected, rtol=1e-12, atol=1e-14)


def test_dot_product_moments_match_monte_carlo(generator):
    """E[x.y], Var[x.y] and E||x||^2 (the pieces of SPEC.md section 4) against sampling, 1%."""
    img, txt = embed_pair(generator, N=2, M=2)
    mean, var = cosine_moments(img, txt, logit_scale=0.0)  # s = 1, beta = 0
    sq_norm_img = (img.mean**2).sum(-1) + img.trace()
    sq_norm_txt = (txt.mean**2).sum(-1) + txt.trace()
    norms = sq_norm_img[:, None] * sq_norm_txt[None, :]
    dot_mean, dot_var = mean * norms.sqrt(), var * norms
    samples, mc = 1_000_000, torch.Generator().manual_seed(99)

    def draw(dist):  # [S, N, D] = mean + L eps with L L^T the dense covariance
        L = torch.linalg.cholesky(dist.dense_covariance())
        eps = torch.randn(samples, len(dist), D, 1, generator=mc, dtype=torch.float64)
        return dist.mean + (L @ eps).squeeze(-1)

    x, y = draw(img), draw(txt)
    dots = torch.einsum("snd,smd->snm", x, y)
    torch.testing.assert_close(dots.mean(0), dot_mean, rtol=1e-2, atol=1e-2 * dot_var.sqrt().max().item())
    torch.testing.assert_close(dots.var(0), dot_var, rtol=1e-2, atol=0)
    torch.testing.assert_close((x**2).sum(-1).mean(0), sq_norm_img, rtol=1e-2, atol=0)
    torch.testing.assert_close((y**2).sum(-1).mean(0), sq_norm_txt, rtol=1e-2, atol=0)


def test_scale_and_bias_enter_as_specified(generator):
    img, txt = embed_pair(generator)
    m0, v0 = cosine_moments(img, txt, logit_scale=0.0)
    m1, v1 = cosine_moments(img, txt, logit_scale=math.log(50.0), logit_bias=-3.0)
    torch.testing.assert_close(m1, 50.0 * m0 - 3.0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v1, 2500.0 * v0, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_return_float32(dtype, generator):
    img, txt = embed_pair(generator)
    low_img = EmbeddingDistribution.kron(img.mean.to(dtype), img.alpha.float(), img.shared.float())
    low_txt = EmbeddingDistribution.kron(txt.mean.to(dtype), txt.alpha.float(), txt.shared.float())
    mean, var = cosine_moments(low_img, low_txt, logit_scale=1.0)
    assert mean.dtype == var.dtype == torch.float32
    exact_img = EmbeddingDistribution.kron(low_img.mean.double(), img.alpha, img.shared)
    exact_txt = EmbeddingDistribution.kron(low_txt.mean.double(), txt.alpha, txt.shared)
    emean, evar = cosine_moments(exact_img, exact_txt, logit_scale=1.0)
    torch.testing.assert_close(mean.double(), emean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), evar, rtol=1e-4, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(N=st.integers(0, 6), M=st.integers(0, 6), variant=st.sampled_from(["kron", "exact", "diag"]),
       seed=st.integers(0, 2**31 - 1))
def test_property_shapes_including_empty(N, M, variant, seed):
    g = torch.Generator().manual_seed(seed)
    img, txt = embed_pair(g, N=N, M=M)
    mean, var = cosine_moments(img, txt, logit_scale=1.0, variant=variant)
    assert mean.shape == var.shape == (N, M)
    assert bool(torch.isfinite(mean).all()) and bool((var >= 0).all())


def test_bad_input(generator):
    img, txt = embed_pair(generator)
    other = EmbeddingDistribution.diagonal(torch.zeros(2, D + 1), torch.ones(2, D + 1))
    with pytest.raises(ValueError, match="one embedding size D"):
        cosine_moments(img, other, logit_scale=1.0)
    with pytest.raises(ValueError, match="'variant'"):
        cosine_moments(img, txt, logit_scale=1.0, variant="full")
    with pytest.raises(ValueError, match="'logit_scale'"):
        cosine_moments(img, txt, logit_scale=float("nan"))
    with pytest.raises(ValueError, match="'img' and 'txt'"):
        cosine_moments(img.mean, txt, logit_scale=1.0)
    diag = EmbeddingDistribution.diagonal(torch.zeros(2, D), torch.ones(2, D))
    with pytest.raises(ValueError, match="variant 'kron' needs kron-form"):
        cosine_moments(img, diag, logit_scale=1.0, variant="kron")
    with pytest.raises(ValueError, match="variant 'exact'"):
        cosine_moments(diag, txt, logit_scale=1.0, variant="exact")
