"""The "projected" cosine variance (SPEC.md section 4): against 2e4-sample Monte Carlo across rho, against the
dense float64 formula, and the compiled kernels against their PyTorch twin on every dtype and device here."""

import math

import pytest
import torch
from testing import devices, dtypes, needs_extension, spd

from bayesvlm_ext import EmbeddingDistribution, KronPosterior, _torch_impl, cosine_moments, ops, topk
from bayesvlm_ext.moments import pairwise_inputs

P, D, N, M, SAMPLES = 24, 12, 6, 6, 20000
# (pseudo-count n, prior precision lambda): rho = ||mu||^2 / tr(S) from about 0.9 to 3e4 on these factors
GRID = [(1.0, 30.0), (1.0, 300.0), (10.0, 1e3), (100.0, 1e4), (1e3, 1e5), (1e4, 1e6)]


def towers(generator):
    parts = []
    for _ in range(2):
        weight = torch.randn(D, P, generator=generator, dtype=torch.float64) / math.sqrt(P)
        bias = 0.1 * torch.randn(D, generator=generator, dtype=torch.float64)
        parts.append((spd(P + 1, generator), spd(D, generator), weight, bias))
    return parts


def relative_errors(var, mc):
    rel = ((var - mc).abs() / mc).flatten()
    return float(rel.median()), float(rel.max())


@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_projected_variance_matches_monte_carlo_over_weight_samples_at_every_rho(damping, device):
    g = torch.Generator().manual_seed(1)
    (Ax, Bx, Wx, bx), (Ay, By, Wy, by) = towers(g)
    phi_x = torch.randn(N, P, generator=g, dtype=torch.float64)
    phi_y = torch.randn(M, P, generator=g, dtype=torch.float64)
    seen = []
    for n, lam in GRID:
        px = KronPosterior(Ax, Bx, Wx, bx, pseudo_count=n, prior_precision=lam, damping=damping)
        py = KronPosterior(Ay, By, Wy, by, pseudo_count=n, prior_precision=lam, damping=damping)
        x, y = px.embed(phi_x, against=py), py.embed(phi_y, against=px)
        rho = float(((x.mean ** 2).sum(1) / x.trace()).median())
        wx, bxs = px.sample_weights(SAMPLES, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        wy, bys = py.sample_weights(SAMPLES, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        gx = torch.nn.functional.normalize(torch.einsum("kdp,np->knd", wx, phi_x) + bxs[:, None], dim=2)
        gy = torch.nn.functional.normalize(torch.einsum("kdp,np->knd", wy, phi_y) + bys[:, None], dim=2)
        mc = torch.einsum("knd,kmd->knm", gx, gy).var(0)  # logit scale 1: the cosine's variance
        x, y = x.to(device), y.to(device)  # the moments on this backend; Monte Carlo on the CPU
        median, worst = relative_errors(cosine_moments(x, y, 0.0, variant="projected")[1].cpu(), mc)
        _, published_worst = relative_errors(cosine_moments(x, y, 0.0)[1].cpu(), mc)
        assert median <= 0.10, (rho, median)
        if rho >= 100:
            assert worst <= 0.10, (rho, worst)
            assert published_worst > 0.5, (rho, published_worst)  # what the projection is for
        seen.append(rho)
    assert min(seen) < 1 and max(seen) > 1e3  # the grid spans small and large rho


@pytest.mark.parametrize("device", devices, ids=str)
def test_projected_variance_of_diagonal_gaussians_matches_monte_carlo(device):
    g = torch.Generator().manual_seed(4)
    for spread in (1.0, 0.1, 0.01):  # rho = ||mu||^2 / tr(S) about 2, 200, 2e4
        mx = torch.randn(N, D, generator=g, dtype=torch.float64)
        my = torch.randn(M, D, generator=g, dtype=torch.float64)
        vx = spread ** 2 * torch.rand(N, D, generator=g, dtype=torch.float64)
        vy = spread ** 2 * torch.rand(M, D, generator=g, dtype=torch.float64)
        x, y = EmbeddingDistribution.diagonal(mx, vx), EmbeddingDistribution.diagonal(my, vy)
        sx = mx + vx.sqrt() * torch.randn(SAMPLES, N, D, generator=g, dtype=torch.float64)
        sy = my + vy.sqrt() * torch.randn(SAMPLES, M, D, generator=g, dtype=torch.float64)
        cos = torch.einsum("knd,kmd->knm", torch.nn.functional.normalize(sx, dim=2),
                           torch.nn.functional.normalize(sy, dim=2))
        var = cosine_moments(x.to(device), y.to(device), 0.0, variant="projected")[1].cpu()
        median, worst = relative_errors(var, cos.var(0))
        assert median <= 0.10, (spread, median, worst)


def dense_projected(x: EmbeddingDistribution, y: EmbeddingDistribution, scale: float):
    """SPEC.md section 4 written out with dense float64 covariances: projected numerator / published denominator."""
    sx, sy = x.dense_covariance().double(), y.dense_covariance().double()
    mx, my = x.mean.double(), y.mean.double()
    var = torch.empty(len(x), len(y), dtype=torch.float64)
    for i in range(len(x)):
        for j in range(len(y)):
            ux, uy = mx[i] / mx[i].norm(), my[j] / my[j].norm()
            px, py = torch.eye(x.dim, dtype=torch.float64) - torch.outer(ux, ux), \
                torch.eye(x.dim, dtype=torch.float64) - torch.outer(uy, uy)
            a, b = px @ my[j], py @ mx[i]
            numerator = a @ sx[i] @ a + b @ sy[j] @ b + torch.trace(sx[i] @ sy[j])
            norms = (mx[i] @ mx[i] + torch.trace(sx[i])) * (my[j] @ my[j] + torch.trace(sy[j]))
            var[i, j] = scale ** 2 * numerator / norms
    return var


@pytest.mark.parametrize("forms", [("kron", "kron"), ("exact", "exact"), ("diag", "diag")])
def test_projected_equals_the_dense_formula(forms):
    g = torch.Generator().manual_seed(5)
    if forms[0] == "diag":
        x = EmbeddingDistribution.diagonal(torch.randn(5, D, generator=g, dtype=torch.float64),
                                           torch.rand(5, D, generator=g, dtype=torch.float64))
        y = EmbeddingDistribution.diagonal(torch.randn(4, D, generator=g, dtype=torch.float64),
                                           torch.rand(4, D, generator=g, dtype=torch.float64))
    else:
        (Ax, Bx, Wx, bx), (Ay, By, Wy, by) = towers(g)
        px = KronPosterior(Ax, Bx, Wx, bx, prior_precision=3.0, damping=forms[0])
        py = KronPosterior(Ay, By, Wy, by, prior_precision=3.0, damping=forms[0])
        x = px.embed(torch.randn(5, P, generator=g, dtype=torch.float64), against=py)
        y = py.embed(torch.randn(4, P, generator=g, dtype=torch.float64), against=px)
    mean, var = cosine_moments(x, y, math.log(7.0), -0.5, variant="projected")
    torch.testing.assert_close(var, dense_projected(x, y, 7.0), rtol=1e-10, atol=1e-13)
    published_mean, _ = cosine_moments(x, y, math.log(7.0), -0.5)
    torch.testing.assert_close(mean, published_mean, rtol=0, atol=0)  # the mean stays as published


def kernel_inputs(dtype, device, generator, damping="kron", n=37, m=530):
    def post():
        return KronPosterior(spd(P, generator), spd(D, generator),
                             torch.randn(D, P, generator=generator, dtype=torch.float64), damping=damping,
                             prior_precision=20.0)
    px, py = post(), post()
    x = px.embed(torch.randn(n, P, generator=generator, dtype=torch.float64).to(dtype), against=py)
    y = py.embed(torch.randn(m, P, generator=generator, dtype=torch.float64).to(dtype), against=px)
    return pairwise_inputs(x.to(device), y.to(device), "projected")


@needs_extension
@pytest.mark.parametrize("device", devices, ids=str)
@pytest.mark.parametrize("dtype", dtypes, ids=str)
@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_compiled_projected_moments_and_topk_equal_the_twin(device, dtype, damping):
    g = torch.Generator().manual_seed(6)
    inputs = kernel_inputs(dtype, device, g, damping)
    args = (*inputs[:6], 12.0, -0.7, inputs.trace_cross)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}
    for output in (0, 1, 2):
        got = ops.pairwise_moments(*args, output, inputs.x_proj, inputs.y_proj)
        want = _torch_impl.pairwise_moments(*args, output, inputs.x_proj, inputs.y_proj)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
    for score in (0, 1, 2, 3):
        # on CUDA: fused lists (1, 9), fp64 past its fused k with projection (60), past every fused k (129, M)
        for k in (1, 9, 60, 129, inputs.y.shape[0]):
            values, index, mean, var = ops.topk_moments(*args, k, score, 0.8, inputs.x_proj, inputs.y_proj)
            want = _torch_impl.topk_moments(*args, k, score, 0.8, inputs.x_proj, inputs.y_proj)
            torch.testing.assert_close(values, want[0], **tol)
            # near-ties may swap across backends; the scores at each rank agree, and each chosen item's own
            # moments are its moments
            dense_mean, dense_var = _torch_impl.pairwise_moments(*args, 0, inputs.x_proj, inputs.y_proj)
            torch.testing.assert_close(mean, dense_mean.gather(1, index), **tol)
            torch.testing.assert_close(var, dense_var.gather(1, index), **tol)


@pytest.mark.parametrize("device", devices, ids=str)
def test_a_zero_mean_row_scores_nan_and_ranks_last(device):
    g = torch.Generator().manual_seed(7)
    x = EmbeddingDistribution.diagonal(torch.randn(3, D, generator=g), torch.rand(3, D, generator=g)).to(device)
    mean_y = torch.randn(40, D, generator=g)
    mean_y[5] = 0
    y = EmbeddingDistribution.diagonal(mean_y, torch.rand(40, D, generator=g)).to(device)
    _, var = cosine_moments(x, y, 1.0, variant="projected")
    assert bool(var[:, 5].isnan().all()) and bool(var[:, torch.arange(40) != 5].isfinite().all())
    values, index, _, _ = topk(x, y, 40, "probit", logit_scale=1.0, variant="projected")
    assert bool((index[:, -1] == 5).all()) and bool(values[:, -1].isnan().all())


def test_projection_features_are_checked():
    g = torch.Generator().manual_seed(8)
    inputs = kernel_inputs(torch.float32, "cpu", g, n=3, m=4)
    args = (*inputs[:6], 1.0, 0.0, inputs.trace_cross, 0)
    with pytest.raises(ValueError, match="'x_proj' and 'y_proj' must be given together"):
        ops.pairwise_moments(*args, inputs.x_proj, None)
    with pytest.raises(ValueError, match=r"argument 'x_stats' must have shape \(3, 5\)"):
        ops.pairwise_moments(inputs.x, inputs.y, inputs.x_stats[:, :3].contiguous(), inputs.y_stats, *args[4:],
                             inputs.x_proj, inputs.y_proj)
    with pytest.raises(ValueError, match="argument 'y_proj'"):
        ops.pairwise_moments(*args, inputs.x_proj, inputs.y_proj[:, :5].contiguous())


@needs_extension
def test_the_compiled_ops_check_projection_features_themselves():
    inputs = kernel_inputs(torch.float32, "cpu", torch.Generator().manual_seed(8), n=3, m=4)
    args = (*inputs[:6], 1.0, 0.0, inputs.trace_cross)
    with pytest.raises(ValueError, match=r"argument 'y_proj' must be \[4, 12\]"):
        torch.ops.bayesvlm_ext.pairwise_moments(*args, 0, inputs.x_proj, inputs.y_proj[:, :5].contiguous())
    with pytest.raises(ValueError, match="'x_proj' and 'y_proj' must be given together"):
        torch.ops.bayesvlm_ext.topk_moments(*args, 2, 0, 1.0, inputs.x_proj, None)


def test_a_precomputed_gallery_gives_the_same_projected_scores():
    g = torch.Generator().manual_seed(9)
    x = EmbeddingDistribution.diagonal(torch.randn(5, D, generator=g), torch.rand(5, D, generator=g))
    y = EmbeddingDistribution.diagonal(torch.randn(300, D, generator=g), torch.rand(300, D, generator=g))
    cached = y.precompute(projected=True)
    assert cached.projection is not None and cached[:7].projection[0].shape == (7, D)
    kept = cached.with_projection()  # the other cached statistics are kept, not recomputed
    assert kept.sq_norm is cached.sq_norm and all(torch.equal(a, b) for a, b in zip(kept.projection,
                                                                                    cached.projection))
    for a, b in zip(topk(x, y, 9, "probit", logit_scale=2.0, variant="projected"),
                    topk(x, cached, 9, "probit", logit_scale=2.0, variant="projected")):
        assert torch.equal(a, b)
    joined = EmbeddingDistribution.cat([cached[:100], cached[100:]])
    assert all(torch.equal(a, b) for a, b in zip(joined.projection, cached.projection))


def test_an_index_stores_the_projection_statistics_and_searches_with_them(tmp_path):
    from bayesvlm_ext import build_index, open_index, search
    from bayesvlm_ext.index import save_index

    g = torch.Generator().manual_seed(10)
    (Ax, Bx, Wx, bx), (Ay, By, Wy, by) = towers(g)
    gallery_post = KronPosterior(Ax, Bx, Wx, bx, prior_precision=50.0)
    query_post = KronPosterior(Ay, By, Wy, by, prior_precision=50.0)
    features = torch.randn(50, P, generator=g)
    queries = query_post.embed(torch.randn(4, P, generator=g), against=gallery_post)
    stored = build_index(tmp_path / "stored", gallery_post, features, query_post, shard_rows=16, projected=True,
                         logit_scale=2.0)
    plain = build_index(tmp_path / "plain", gallery_post, features, query_post, shard_rows=16, logit_scale=2.0)
    assert stored.projected and not plain.projected and stored.shard(1).projection[0].shape == (16, D)
    whole = gallery_post.embed(features, against=query_post)
    expected = topk(queries, whole, 7, "probit", logit_scale=2.0, variant="projected")
    for index in (stored, plain, open_index(tmp_path / "stored")):
        values, rows, mean, var = search(index, queries, 7, "probit", variant="projected")
        assert torch.equal(rows, expected[1])
        for got, want in zip((values, mean, var), (expected[0], expected[2], expected[3])):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    saved = save_index(tmp_path / "saved", whole.precompute(against=query_post.embed(features[:0]),
                                                            projected=True), shard_rows=16)
    assert saved.projected  # a gallery that caches them stores them
