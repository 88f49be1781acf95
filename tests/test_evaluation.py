"""Retrieval metrics and the reliability diagram against brute force and scipy."""

import pytest
import scipy.stats
import torch

from bayesvlm_ext import ece
from bayesvlm_ext.predictive import reliability
from bayesvlm_ext.evaluation import recall_at_k, spearman, uncertainty_recall


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 6, (40,), generator=g).double()  # many ties
    y = torch.randn(40, generator=g, dtype=torch.float64).round(decimals=1)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_spearman_of_monotone_sequences_and_errors():
    x = torch.arange(10.0)
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x.exp()) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="'x' and 'y'"):
        spearman(x, x[:5])
    with pytest.raises(ValueError, match="'y' contains NaN"):
        spearman(x, torch.full((10,), float("nan")))


def test_recall_at_k_by_brute_force():
    g = torch.Generator().manual_seed(0)
    hits = torch.rand(50, 10, generator=g) < 0.15
    got = recall_at_k(hits)
    for k in (1, 5, 10):
        expected = sum(any(bool(hits[i, j]) for j in range(k)) for i in range(50)) / 50
        assert got[f"recall@{k}"] == expected
    with pytest.raises(ValueError, match="'ks'"):
        recall_at_k(hits, ks=(11,))
    with pytest.raises(ValueError, match="'hits' must be a bool"):
        recall_at_k(hits.int())


def test_uncertainty_recall_bins_by_brute_force():
    g = torch.Generator().manual_seed(1)
    n, bins = 103, 10
    uncertainty = torch.rand(n, generator=g, dtype=torch.float64)
    hit = torch.rand(n, generator=g) > uncertainty.float()  # less certain, fewer hits
    bin_u, bin_r, rho = uncertainty_recall(uncertainty, hit, bins)
    order = sorted(range(n), key=lambda i: (float(uncertainty[i]), i))
    sizes = [n // bins + (1 if b < n % bins else 0) for b in range(bins)]  # the first n mod bins one larger
    start = 0
    for b, size in enumerate(sizes):
        members = order[start:start + size]
        start += size
        assert float(bin_u[b]) == pytest.approx(sum(float(uncertainty[i]) for i in members) / size, rel=1e-12)
        assert float(bin_r[b]) == pytest.approx(sum(bool(hit[i]) for i in members) / size, rel=1e-12)
    assert rho == pytest.approx(scipy.stats.spearmanr(bin_u.numpy(), bin_r.numpy()).statistic, abs=1e-12)
    assert rho < 0  # the construction makes recall fall with uncertainty
    with pytest.raises(ValueError, match="'n_bins'"):
        uncertainty_recall(uncertainty, hit, n + 1)
    with pytest.raises(ValueError, match="'hit'"):
        uncertainty_recall(uncertainty, hit[:-1], bins)


def test_reliability_bins_by_brute_force_and_ece_from_them():
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(3 * torch.randn(500, 4, generator=g, dtype=torch.float64), dim=1)
    probs[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # confidence exactly 1: the extra last bin
    targets = torch.randint(0, 4, (500,), generator=g)
    count, confidence, accuracy = reliability(probs, targets, 10)
    conf, pred = probs.max(1)
    for b in range(11):
        lo, hi = b / 10, (b + 1) / 10
        members = [i for i in range(500) if (lo <= float(conf[i]) < hi if b < 10 else float(conf[i]) == 1.0)]
        assert int(count[b]) == len(members)
        if members:
            assert float(confidence[b]) == pytest.approx(sum(float(conf[i]) for i in members) / len(members))
            assert float(accuracy[b]) == pytest.approx(sum(int(pred[i] == targets[i]) for i in members) / len(members))
        else:
            assert torch.isnan(confidence[b]) and torch.isnan(accuracy[b])
    occupied = count > 0
    expected = float(((accuracy - confidence).abs()[occupied] * count[occupied]).sum() / 500)
    assert ece(probs, targets, 10) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="'n_bins'"):
        reliability(probs, targets, 0)


def test_retrieval_report_against_dense_rankings():
    from testing import spd

    from bayesvlm_ext import KronPosterior, cosine_moments
    from bayesvlm_ext.evaluation import retrieval_report

    g = torch.Generator().manual_seed(3)
    D, P, N, M, scale = 6, 8, 60, 12, 2.0
    weight = torch.randn(D, P, generator=g, dtype=torch.float64)  # one map for both towers: aligned embeddings
    posts = {t: KronPosterior(spd(P, g), spd(D, g), weight, prior_precision=0.5) for t in ("image", "text")}
    phi_txt = torch.randn(M, P, generator=g, dtype=torch.float64)
    captions = torch.randint(0, M, (N,), generator=g)
    phi_img = phi_txt[captions] + 0.8 * torch.randn(N, P, generator=g, dtype=torch.float64)  # near their caption
    img = posts["image"].embed(phi_img, against=posts["text"])
    txt = posts["text"].embed(phi_txt, against=posts["image"])
    results, curves = retrieval_report(img, txt, captions, scale, n_bins=4)

    unit_img = torch.nn.functional.normalize(img.mean, dim=1)
    unit_txt = torch.nn.functional.normalize(txt.mean, dim=1)
    mean, var = cosine_moments(img, txt, scale)  # [N, M]
    probit = mean / (1 + torch.pi / 8 * var).sqrt()
    dense = {"image_to_text": (unit_img @ unit_txt.T, probit, captions, torch.arange(M), img),
             "text_to_image": (unit_txt @ unit_img.T, probit.T, torch.arange(M), captions, txt)}
    for name, (cosines, scores, query_labels, gallery_labels, queries) in dense.items():
        for method, s in (("map", cosines), ("bayesvlm", scores)):
            top = s.argsort(dim=1, descending=True, stable=True)[:, :10]
            expected = recall_at_k(gallery_labels[top] == query_labels[:, None])
            for key, value in expected.items():
                assert results[method][name][key] == pytest.approx(value, abs=1e-12)
        top1 = scores.argsort(dim=1, descending=True, stable=True)[:, 0]
        uncertainty = queries.dense_covariance().diagonal(dim1=1, dim2=2).sum(1) / (queries.mean**2).sum(1)
        bin_u, bin_r, rho = uncertainty_recall(uncertainty, gallery_labels[top1] == query_labels, 4)
        torch.testing.assert_close(torch.tensor(curves[name]["uncertainty"], dtype=torch.float64), bin_u,
                                   rtol=1e-10, atol=0)
        assert curves[name]["recall@1"] == bin_r.tolist()
        assert results["bayesvlm"][name]["spearman"] == (pytest.approx(rho, abs=1e-12) if rho == rho else None)
    assert "spearman" not in results["map"]["image_to_text"]
    assert results["map"]["image_to_text"]["recall@10"] >= results["map"]["image_to_text"]["recall@1"] > 0.3
    with pytest.raises(ValueError, match="'image_captions'"):
        retrieval_report(img, txt, captions.clamp_max(M - 2) + 1 + (captions == M - 1) * M, scale)
    # Another method's name keys the same results.
    renamed, _ = retrieval_report(img, txt, captions, scale, n_bins=4, method="probvlm")
    assert renamed == {"map": results["map"], "probvlm": results["bayesvlm"]}
    with pytest.raises(ValueError, match="'method'"):
        retrieval_report(img, txt, captions, scale, method="map")
