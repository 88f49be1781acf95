"""Active selection (SPEC.md section 8) against float64 brute force: scores from loops over the joint
weight samples, selection against argsort and a round-robin loop, neighbours against dense distance
matrices, the online update against a refit from scratch, the label curvature against autograd."""

import math

import pytest
import torch
from testing import spd

from bayesvlm_ext import EmbeddingDistribution, KronPosterior, kfac_factors
from bayesvlm_ext import active
from bayesvlm_ext.active import (JointSamples, acquisition_scores, label_curvature, nearest_neighbours, select,
                                 update_posterior)
from bayesvlm_ext.curvature import Likelihood, projected_curvature
from bayesvlm_ext.zeroshot import ZeroShotClassifier

P_IMG, P_TXT, C, D = 5, 4, 3, 6
N_POOL, M_TARGETS, K = 7, 5, 32
SCALE = math.log(10.0)
f64 = torch.float64


def make_classifier(generator, *, likelihood="softmax", damping="kron", prior_precision=0.5, residual=False):
    """Both towers with a bias; for "sigmoid" a logit bias and (with `residual`) SigLIP-style residuals."""
    def tower(p, lam, n):
        return KronPosterior(spd(p + 1, generator), spd(D, generator), torch.randn(D, p, generator=generator, dtype=f64),
                             torch.randn(D, generator=generator, dtype=f64), prior_precision=lam, pseudo_count=n,
                             damping=damping)
    img, txt = tower(P_IMG, prior_precision, 1.0), tower(P_TXT, 1.6 * prior_precision, 2.0)
    class_features = torch.randn(C, P_TXT, generator=generator, dtype=f64)
    class_residual = torch.randn(C, D, generator=generator, dtype=f64) if residual else None
    clf = ZeroShotClassifier(img, txt, class_features, SCALE, -1.5 if likelihood == "sigmoid" else 0.0, likelihood,
                             class_residual=class_residual)
    return clf, class_features, class_residual


def features(generator, rows, cols=P_IMG):
    return torch.randn(rows, cols, generator=generator, dtype=f64)


def brute_probabilities(clf, class_features, class_residual, seed, phi, residual=None):
    """[K, N, C] by hand: the documented draws (image tower, then text tower, one generator), loops."""
    generator = torch.Generator().manual_seed(seed)
    W_img, b_img = clf.image_posterior.sample_weights(K, generator, f64)
    W_txt, b_txt = clf.text_posterior.sample_weights(K, generator, f64)
    s, beta = math.exp(SCALE), float(clf.logit_bias)
    out = torch.empty(K, len(phi), C, dtype=f64)
    for k in range(K):
        t = class_features @ W_txt[k].T + b_txt[k] + (0 if class_residual is None else class_residual)
        for i in range(len(phi)):
            g = W_img[k] @ phi[i] + b_img[k] + (0 if residual is None else residual[i])
            z = torch.stack([s * (g @ t[c]) / (g.norm() * t[c].norm()) + beta for c in range(C)])
            out[k, i] = torch.softmax(z, 0) if clf.likelihood.value == "softmax" else torch.sigmoid(z)
    return out


def categorical(p, softmax):
    """Per class probabilities [..., C] as a list of distributions: one over C, or C binary ones."""
    return [p] if softmax else [torch.stack([p[..., c], 1 - p[..., c]], -1) for c in range(p.shape[-1])]


def entropy(p):
    return -(p * p.log()).sum(-1)


def brute_epig(p, q, softmax):
    """Double loop over pool item i and target j: mean_j sum_{y,y*} J log(J / (p(y) p(y*)))."""
    out = torch.zeros(p.shape[1], dtype=f64)
    for i in range(p.shape[1]):
        for j in range(q.shape[1]):
            for a, b in zip(categorical(p[:, i], softmax), categorical(q[:, j], softmax)):  # [K, Y] each
                joint = a.T @ b / a.shape[0]  # [Y, Y*]
                out[i] += (joint * (joint / torch.outer(a.mean(0), b.mean(0))).log()).sum() / q.shape[1]
    return out


# ---- scores -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
def test_variance_and_entropy_from_the_logit_moments(likelihood, generator):
    clf, _, _ = make_classifier(generator, likelihood=likelihood)
    pool = features(generator, N_POOL)
    mean, var = clf.logits(pool)
    torch.testing.assert_close(acquisition_scores(clf, pool, "variance"), var.sum(1), rtol=1e-12, atol=0)
    t = mean / torch.sqrt(1 + math.pi / 8 * var)  # the probit predictive, written out
    if likelihood == "softmax":
        expected = entropy(torch.softmax(t, 1))
    else:
        p = torch.sigmoid(t)
        expected = (entropy(torch.stack([p, 1 - p], -1))).sum(1)
    scores = acquisition_scores(clf, pool, "entropy")
    assert scores.dtype == f64 and scores.shape == (N_POOL,)
    torch.testing.assert_close(scores, expected, rtol=1e-12, atol=1e-14)
    # Chunking is bookkeeping: each chunk scores exactly as a call on its rows alone. Against the whole pool it
    # agrees to rounding only (checked above), since BLAS (MKL on AVX-512) may round a row differently in a GEMM
    # with another row count.
    per_chunk = torch.cat([acquisition_scores(clf, pool[i:i + 2], "entropy") for i in range(0, N_POOL, 2)])
    torch.testing.assert_close(acquisition_scores(clf, pool, "entropy", chunk_size=2), per_chunk, rtol=0, atol=0)


@pytest.mark.parametrize("likelihood,residual", [("softmax", False), ("sigmoid", True)])
def test_joint_samples_are_the_documented_draws(likelihood, residual, generator):
    clf, cf, cr = make_classifier(generator, likelihood=likelihood, residual=residual)
    pool = features(generator, N_POOL)
    pool_residual = torch.randn(N_POOL, D, generator=generator, dtype=f64) if residual else None
    samples = JointSamples(clf, K, generator=torch.Generator().manual_seed(5), dtype=f64)
    probs = samples.probabilities(pool, pool_residual)
    assert probs.shape == (K, N_POOL, C) and probs.dtype == f64
    torch.testing.assert_close(probs, brute_probabilities(clf, cf, cr, 5, pool, pool_residual), rtol=1e-12,
                               atol=1e-14)
    # Chunks of a pool see the same draws as the whole pool.
    torch.testing.assert_close(samples.probabilities(pool[2:4], None if pool_residual is None else pool_residual[2:4]),
                               probs[:, 2:4], rtol=1e-14, atol=0)


@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
def test_bald_and_aleatoric_against_a_loop_over_the_samples(likelihood, generator):
    clf, cf, _ = make_classifier(generator, likelihood=likelihood)
    pool = features(generator, N_POOL)
    samples = JointSamples(clf, K, generator=torch.Generator().manual_seed(3), dtype=f64)
    p = brute_probabilities(clf, cf, None, 3, pool)
    softmax = likelihood == "softmax"
    expected_aleatoric = torch.zeros(N_POOL, dtype=f64)
    expected_bald = torch.zeros(N_POOL, dtype=f64)
    for i in range(N_POOL):
        for dist in categorical(p[:, i], softmax):  # [K, Y]
            per_sample = torch.stack([entropy(dist[k]) for k in range(K)])
            expected_aleatoric[i] += per_sample.mean()
            expected_bald[i] += entropy(dist.mean(0)) - per_sample.mean()
    aleatoric = acquisition_scores(clf, pool, "aleatoric", samples=samples)
    bald = acquisition_scores(clf, pool, "bald", samples=samples)
    torch.testing.assert_close(aleatoric, expected_aleatoric, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bald, expected_bald, rtol=1e-10, atol=1e-14)
    assert bool((bald > 0).all())  # a broad posterior: the draws disagree
    torch.testing.assert_close(acquisition_scores(clf, pool, "bald", samples=samples, chunk_size=3), bald, rtol=1e-14,
                               atol=0)


def test_bald_and_epig_vanish_for_a_point_mass_posterior(generator):
    clf, cf, _ = make_classifier(generator, prior_precision=1e20)
    pool = features(generator, N_POOL)
    samples = JointSamples(clf, K, generator=torch.Generator().manual_seed(0), dtype=f64)
    torch.testing.assert_close(acquisition_scores(clf, pool, "bald", samples=samples),
                               torch.zeros(N_POOL, dtype=f64), rtol=0, atol=1e-12)
    torch.testing.assert_close(acquisition_scores(clf, pool, "epig", samples=samples, targets=pool[:3]),
                               torch.zeros(N_POOL, dtype=f64), rtol=0, atol=1e-12)
    aleatoric = acquisition_scores(clf, pool, "aleatoric", samples=samples)
    torch.testing.assert_close(aleatoric, entropy(clf.map_probabilities(pool)), rtol=1e-8, atol=0)


@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
def test_epig_against_a_double_loop(likelihood, generator, monkeypatch):
    clf, cf, _ = make_classifier(generator, likelihood=likelihood)
    pool = features(generator, N_POOL)
    targets = features(generator, M_TARGETS)
    samples = JointSamples(clf, K, generator=torch.Generator().manual_seed(4), dtype=f64)
    expected = brute_epig(brute_probabilities(clf, cf, None, 4, pool), brute_probabilities(clf, cf, None, 4, targets),
                          likelihood == "softmax")
    epig = acquisition_scores(clf, pool, "epig", samples=samples, targets=targets)
    torch.testing.assert_close(epig, expected, rtol=1e-10, atol=1e-14)
    assert bool((epig > 0).all())
    # Small chunks on both sides (several pool and target chunks) give the same sums.
    monkeypatch.setattr(active.chunking, "CHUNK_ELEMENTS", 2 * C * C)
    chunked = acquisition_scores(clf, pool, "epig", samples=samples, targets=targets, chunk_size=2)
    torch.testing.assert_close(chunked, epig, rtol=1e-12, atol=1e-15)


def test_epig_needs_joint_samples(generator):
    # SPEC.md section 8: pushing pool and targets through the same W_k is what EPIG measures. Giving every
    # target item its own permutation of the sample index (independent noise per item) destroys it.
    clf, cf, _ = make_classifier(generator)
    pool = features(generator, N_POOL)
    targets = pool[:M_TARGETS] + 0.1 * features(generator, M_TARGETS)  # targets that the pool informs
    samples = JointSamples(clf, 1024, generator=torch.Generator().manual_seed(7), dtype=f64)
    joint = acquisition_scores(clf, pool, "epig", samples=samples, targets=targets)
    p, q = samples.probabilities(pool), samples.probabilities(targets)  # [K, N, C], [K, M, C]
    permutation = torch.stack([torch.randperm(1024, generator=generator) for _ in range(M_TARGETS)], 1)  # [K, M]
    shuffled = brute_epig(p, torch.gather(q, 0, permutation[:, :, None].expand_as(q)), True)
    assert joint.mean() > 0.05
    assert shuffled.max() < 0.1 * joint.mean()  # ~0: the finite-K bias of a plug-in mutual information


def test_random_scores_are_seeded(generator):
    clf, _, _ = make_classifier(generator)
    pool = features(generator, N_POOL)
    first = acquisition_scores(clf, pool, "random", generator=torch.Generator().manual_seed(1))
    again = acquisition_scores(clf, pool, "random", generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and first.dtype == f64 and bool(((first >= 0) & (first < 1)).all())


# ---- selection ----------------------------------------------------------------------------------------
def test_select_top_is_a_stable_descending_argsort(generator):
    scores = torch.randn(20, generator=generator, dtype=f64)
    torch.testing.assert_close(select(scores, 6), torch.argsort(scores, descending=True)[:6], rtol=0, atol=0)
    tied = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0])
    assert select(tied, 4).tolist() == [1, 2, 4, 0]
    assert select(tied, 0).shape == (0,) and select(tied, 0).dtype == torch.int64


def round_robin(scores, predicted, budget):
    """The reference: per round, every class with items left offers its best one; best offers first."""
    remaining = {c: sorted((i for i in range(len(scores)) if predicted[i] == c), key=lambda i: (-scores[i], i))
                 for c in set(predicted.tolist())}
    picked = []
    while len(picked) < budget:
        offers = sorted((items.pop(0) for items in remaining.values() if items), key=lambda i: (-scores[i], i))
        picked += offers[:budget - len(picked)]
    return picked


@pytest.mark.parametrize("budget", [1, 5, 9, 16, 20])
def test_select_class_balanced_is_a_round_robin(budget, generator):
    scores = torch.randn(20, generator=generator, dtype=f64)
    predicted = torch.tensor([0] * 8 + [1] * 7 + [4] * 5)[torch.randperm(20, generator=generator)]
    chosen = select(scores, budget, strategy="class_balanced", predicted=predicted)
    assert chosen.tolist() == round_robin(scores, predicted, budget)
    counts = torch.bincount(predicted[chosen], minlength=5)[[0, 1, 4]]
    if budget <= 15:  # until class 4 (5 items) runs out, class counts differ by at most one
        assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == budget


def test_select_randomised_is_seeded_and_follows_the_softmax(generator):
    scores = torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=f64)
    temperature = 2.0
    picks = [select(scores, 2, strategy="randomised", temperature=temperature,
                    generator=torch.Generator().manual_seed(seed)) for seed in range(20000)]
    assert torch.equal(picks[3], select(scores, 2, strategy="randomised", temperature=temperature,
                                        generator=torch.Generator().manual_seed(3)))
    p = torch.softmax(scores / temperature, 0)
    first = torch.bincount(torch.stack([x[0] for x in picks]), minlength=4).double() / len(picks)
    # Plackett-Luce: P(i then j) = p_i p_j / (1 - p_i); the unordered pair {i, j} sums both orders.
    pair_freq, pair_prob = {}, {}
    for x in picks:
        key = tuple(sorted(x.tolist()))
        pair_freq[key] = pair_freq.get(key, 0) + 1 / len(picks)
    for i in range(4):
        for j in range(i + 1, 4):
            pair_prob[(i, j)] = float(p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]))
    # Each frequency within 5 binomial standard deviations (a Bonferroni bound over the 10 checks).
    for freq, prob in [(float(first[i]), float(p[i])) for i in range(4)] + [
            (pair_freq.get(key, 0.0), prob) for key, prob in pair_prob.items()]:
        assert abs(freq - prob) <= 5 * math.sqrt(prob * (1 - prob) / len(picks))
    # A vanishing temperature is the top-k.
    assert select(scores, 3, strategy="randomised", temperature=1e-9,
                  generator=torch.Generator().manual_seed(0)).tolist() == [2, 1, 0]


# ---- nearest neighbours -------------------------------------------------------------------------------
def sqrtm(S):
    values, vectors = torch.linalg.eigh(S)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def gaussian_w2(mean_a, cov_a, mean_b, cov_b):
    """The general Gaussian 2-Wasserstein distance squared, by matrix square roots."""
    root_a = sqrtm(cov_a)
    return ((mean_a - mean_b) ** 2).sum() + torch.trace(cov_a + cov_b - 2 * sqrtm(root_a @ cov_b @ root_a))


def brute_neighbours(distance, k):  # distance [M, N], smaller = nearer
    neighbours = torch.stack([torch.sort(row, stable=True).indices[:k] for row in distance])
    return torch.unique(neighbours), neighbours


@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_nearest_neighbours_against_dense_distances(damping, generator):
    clf, _, _ = make_classifier(generator, damping=damping, prior_precision=0.05)
    post = clf.image_posterior
    pool, targets = post.embed(features(generator, 12)), post.embed(features(generator, 5))
    cosine = torch.tensor([[-float(torch.nn.functional.cosine_similarity(t, x, dim=0)) for x in pool.mean]
                           for t in targets.mean])
    for chunk_size in (None, 2):
        support, neighbours = nearest_neighbours(pool, targets, 4, chunk_size=chunk_size)
        expected_support, expected = brute_neighbours(cosine, 4)
        assert torch.equal(neighbours, expected) and torch.equal(support, expected_support)
    # One posterior: the covariances commute, and the result is the exact Gaussian W2.
    cov_pool, cov_targets = pool.dense_covariance(), targets.dense_covariance()
    w2 = torch.tensor([[float(gaussian_w2(targets.mean[j], cov_targets[j], pool.mean[i], cov_pool[i]))
                        for i in range(12)] for j in range(5)])
    support, neighbours = nearest_neighbours(pool, targets, 4, "wasserstein", chunk_size=3)
    expected_support, expected = brute_neighbours(w2, 4)
    assert torch.equal(neighbours, expected) and torch.equal(support, expected_support)
    # The variances matter here: ranking by the means alone would differ.
    euclid = torch.cdist(targets.mean, pool.mean)
    assert not torch.equal(brute_neighbours(euclid, 4)[1], expected)


def test_nearest_neighbours_wasserstein_with_diagonal_variances(generator):
    pool = EmbeddingDistribution.diagonal(torch.randn(12, D, generator=generator, dtype=f64),
                                          torch.rand(12, D, generator=generator, dtype=f64) * 3)
    targets = EmbeddingDistribution.diagonal(torch.randn(5, D, generator=generator, dtype=f64),
                                             torch.rand(5, D, generator=generator, dtype=f64) * 3)
    w2 = torch.tensor([[float(gaussian_w2(targets.mean[j], torch.diag(targets.variances[j]), pool.mean[i],
                                          torch.diag(pool.variances[i]))) for i in range(12)] for j in range(5)])
    assert torch.equal(nearest_neighbours(pool, targets, 3, "wasserstein")[1], brute_neighbours(w2, 3)[1])
    # Mixed forms (no shared eigenbasis): the diagonal formula on the diagonal variances.
    clf, _, _ = make_classifier(generator, damping="exact")
    kron_targets = clf.image_posterior.embed(features(generator, 5))
    v_pool, v_targets = pool.variances, kron_targets.diagonal_variance()
    diagonal = torch.tensor([[float(((kron_targets.mean[j] - pool.mean[i]) ** 2).sum()
                                    + ((v_targets[j].sqrt() - v_pool[i].sqrt()) ** 2).sum()) for i in range(12)]
                             for j in range(5)])
    assert torch.equal(nearest_neighbours(pool, kron_targets, 3, "wasserstein")[1], brute_neighbours(diagonal, 3)[1])


# ---- online update ------------------------------------------------------------------------------------
@pytest.mark.parametrize("damping", ["kron", "exact"])
@pytest.mark.parametrize("bias", [False, True])
def test_update_equals_a_refit_on_all_the_data(damping, bias, generator):
    old, new, batch = 8, 4, 4
    phi = features(generator, old + new)
    g, t = torch.randn(old + new, D, generator=generator, dtype=f64), torch.randn(old + new, D, generator=generator,
                                                                                  dtype=f64)
    weight, b = torch.randn(D, P_IMG, generator=generator, dtype=f64), torch.randn(D, generator=generator, dtype=f64)
    fit = dict(likelihood="infonce", logit_scale=SCALE, class_batch_size=batch, bias=bias)
    A_old, B_old = kfac_factors(phi[:old], g[:old], t[:old], **fit)
    A_all, B_all = kfac_factors(phi, g, t, **fit)
    posterior = KronPosterior(A_old, B_old, weight, b if bias else None, prior_precision=0.3, pseudo_count=2.0,
                              damping=damping)
    A_before = posterior.A.clone()
    curvature = projected_curvature(g[old:], t[old:], Likelihood.INFONCE, math.exp(SCALE), 0.0)  # the new batch
    updated = update_posterior(posterior, phi[old:], curvature, old)
    torch.testing.assert_close(updated.A, A_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(updated.B, B_all, rtol=1e-12, atol=1e-12)
    assert (updated.pseudo_count, updated.damping) == (2.0, posterior.damping)
    assert torch.equal(updated.weight, posterior.weight) and torch.equal(posterior.A, A_before)
    refit = KronPosterior(A_all, B_all, weight, b if bias else None, prior_precision=0.3, pseudo_count=2.0,
                          damping=damping)
    assert updated.prior_precision == pytest.approx(refit.optimize_prior_precision(), rel=1e-9)
    assert posterior.prior_precision == 0.3  # the input is untouched
    kept = update_posterior(posterior, phi[old:], curvature, old, tune_prior_precision=False,
                            weight=2 * weight)
    assert kept.prior_precision == 0.3 and torch.equal(kept.weight, 2 * weight)


@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
def test_label_curvature_is_the_ggn_of_the_zero_shot_loss(likelihood, generator):
    clf, _, _ = make_classifier(generator, likelihood=likelihood)
    phi = features(generator, 4)
    H = label_curvature(clf, phi)
    post = clf.image_posterior
    g = phi @ post.weight.T + post.bias  # [n, D] MAP image embeddings
    Y = torch.nn.functional.normalize(clf.classes.mean, dim=1)  # [C, D] MAP class directions
    s, beta = math.exp(SCALE), float(clf.logit_bias)
    expected = torch.zeros(D, D, dtype=f64)
    for gi in g:  # SPEC.md section 6, one dense H_i = J_i M_i J_i per image
        u = gi / gi.norm()
        J = (torch.eye(D, dtype=f64) - torch.outer(u, u)) / gi.norm()
        z = s * Y @ u + beta
        if likelihood == "softmax":
            p = torch.softmax(z, 0)
            M = s * s * (Y.T @ torch.diag(p) @ Y - torch.outer(Y.T @ p, Y.T @ p))
        else:
            c = torch.sigmoid(z) * (1 - torch.sigmoid(z))
            M = s * s * Y.T @ torch.diag(c) @ Y
        expected += J @ M @ J
    torch.testing.assert_close(H, expected, rtol=1e-10, atol=1e-12)

    # One image by autograd: GGN = (dz/dg)^T Hess_z(loss) (dz/dg), and the Hessian of the loss in g with the
    # model's own probabilities as (soft) labels: the residual term vanishes and only the GGN remains.
    def logits(x):
        return s * torch.nn.functional.normalize(x, dim=0) @ Y.T + beta

    def loss(z, target):
        if likelihood == "softmax":
            return -(target * torch.log_softmax(z, 0)).sum()
        return torch.nn.functional.binary_cross_entropy_with_logits(z, target, reduction="sum")

    x = g[0].clone()
    z0 = logits(x).detach()
    target = torch.softmax(z0, 0) if likelihood == "softmax" else torch.sigmoid(z0)
    jac = torch.autograd.functional.jacobian(logits, x)  # [C, D]
    loss_hessian = torch.autograd.functional.hessian(lambda z: loss(z, target), z0)  # [C, C]
    single = label_curvature(clf, phi[:1])
    torch.testing.assert_close(single, jac.T @ loss_hessian @ jac, rtol=1e-10, atol=1e-12)
    full_hessian = torch.autograd.functional.hessian(lambda v: loss(logits(v), target), x)
    torch.testing.assert_close(single, full_hessian, rtol=1e-9, atol=1e-11)


def test_label_curvature_feeds_the_update(generator):
    clf, _, _ = make_classifier(generator)
    phi = features(generator, 3)
    updated = update_posterior(clf.image_posterior, phi, label_curvature(clf, phi), 100)
    x = torch.cat([phi, torch.ones(3, 1, dtype=f64)], 1)
    expected_A = (10 * clf.image_posterior.A + x.T @ x) / math.sqrt(103)
    torch.testing.assert_close(updated.A, expected_A, rtol=1e-13, atol=1e-14)
    assert updated.prior_precision > 0


# ---- bad input ----------------------------------------------------------------------------------------
def test_bad_input_names_the_argument(generator):
    clf, cf, _ = make_classifier(generator)
    pool = features(generator, N_POOL)
    samples = JointSamples(clf, 4, generator=torch.Generator().manual_seed(0), dtype=f64)
    other, other_cf, _ = make_classifier(generator)
    cases = [
        (lambda: acquisition_scores(clf, pool, "guess"), "'method'"),
        (lambda: acquisition_scores(clf, pool[:, :2], "variance"), "'phi_pool'"),
        (lambda: acquisition_scores(clf, pool * math.nan, "variance"), "'phi_pool'"),
        (lambda: acquisition_scores("clf", pool, "variance"), "'classifier'"),
        (lambda: acquisition_scores(clf, pool, "bald"), "'samples'"),
        (lambda: acquisition_scores(clf, pool, "bald", samples=JointSamples(other, 2)), "'samples'"),
        (lambda: acquisition_scores(clf, pool, "epig", samples=samples), "'targets'"),
        (lambda: acquisition_scores(clf, pool, "epig", samples=samples, targets=pool[:0]), "'targets'"),
        (lambda: acquisition_scores(clf, pool, "variance", pool_residual=torch.zeros(2, D, dtype=f64)),
         "'pool_residual'"),
        (lambda: acquisition_scores(clf, pool, "variance", chunk_size=0), "'chunk_size'"),
        (lambda: JointSamples(clf, 0), "'num_samples'"),
        (lambda: JointSamples(clf, 4, dtype=torch.float16), "'dtype'"),
        (lambda: samples.probabilities(pool[:, :3]), "'image_features'"),
        (lambda: select(torch.zeros(3), 4), "'budget'"),
        (lambda: select(torch.zeros(3, 1), 1), "'scores'"),
        (lambda: select(torch.tensor([0.0, math.nan]), 1), "'scores'"),
        (lambda: select(torch.zeros(3), 1, strategy="best"), "'strategy'"),
        (lambda: select(torch.zeros(3), 1, strategy="class_balanced"), "'predicted'"),
        (lambda: select(torch.zeros(3), 1, strategy="class_balanced", predicted=torch.zeros(2, dtype=torch.long)),
         "'predicted'"),
        (lambda: select(torch.zeros(3), 1, strategy="class_balanced", predicted=torch.zeros(3)), "'predicted'"),
        (lambda: select(torch.zeros(3), 1, strategy="randomised", temperature=0.0), "'temperature'"),
        (lambda: nearest_neighbours(clf.classes, clf.classes, C + 1), "'k'"),
        (lambda: nearest_neighbours(clf.classes, clf.classes, 1, "l1"), "'metric'"),
        (lambda: nearest_neighbours(clf.classes, pool, 1), "'targets'"),
        (lambda: update_posterior(clf.image_posterior, pool[:, :3], torch.eye(D, dtype=f64), 5), "'phi'"),
        (lambda: update_posterior(clf.image_posterior, pool, torch.eye(D + 1, dtype=f64), 5), "'curvature'"),
        (lambda: update_posterior(clf.image_posterior, pool, torch.eye(D, dtype=f64), -1), "'num_data'"),
        (lambda: update_posterior(clf.image_posterior, pool, torch.eye(D, dtype=f64), 5,
                                  weight=torch.zeros(D, 2, dtype=f64)), "'weight'"),
        (lambda: update_posterior(clf, pool, torch.eye(D, dtype=f64), 5), "'posterior'"),
        (lambda: label_curvature(clf, pool[:, :1]), "'phi_labelled'"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_inputs_are_not_modified(generator):
    clf, cf, _ = make_classifier(generator)
    pool, targets = features(generator, N_POOL), features(generator, 3)
    copies = pool.clone(), targets.clone(), cf.clone()
    samples = JointSamples(clf, 8, generator=torch.Generator().manual_seed(0), dtype=f64)
    for method in active.Acquisition:
        acquisition_scores(clf, pool, method, samples=samples, targets=targets)
    assert all(torch.equal(a, b) for a, b in zip((pool, targets, cf), copies))
    assert acquisition_scores(clf, pool[:0], "bald", samples=samples).shape == (0,)
