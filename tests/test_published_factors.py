"""The real published factors for open_clip ViT-B-32 (../shared/data/hessians): load, clamp, moments."""

import hashlib
import math
import os

import pytest
import torch

from bayesvlm_ext import KronPosterior, cosine_moments, predictive


def test_checksums(published_factor_dir):
    with open(os.path.join(published_factor_dir, "SHA256SUMS")) as f:
        for line in f:
            digest, name = line.split()
            with open(os.path.join(published_factor_dir, name.lstrip("*")), "rb") as data:
                assert hashlib.sha256(data.read()).hexdigest() == digest, name


@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_published_factors_load_clamp_and_give_finite_moments(published_factor_dir, damping):
    g = torch.Generator().manual_seed(0)
    D, P_img, P_txt = 512, 768, 512
    # Projections and features of matching sizes (the pretrained weights cannot be downloaded here).
    w_img = torch.randn(D, P_img, generator=g) / math.sqrt(P_img)
    w_txt = torch.randn(D, P_txt, generator=g) / math.sqrt(P_txt)
    post_img = KronPosterior.from_bayesvlm_dir(published_factor_dir, tower="img", weight=w_img, damping=damping)
    post_txt = KronPosterior.from_bayesvlm_dir(published_factor_dir, tower="txt", weight=w_txt, damping=damping)
    assert post_img.prior_precision == pytest.approx(1708.9451904296875)
    assert post_txt.prior_precision == pytest.approx(1255.334228515625)
    assert post_img.pseudo_count == post_txt.pseudo_count == 1.0

    # SPEC.md section 2: B factors are slightly asymmetric with small negative eigenvalues.
    raw_b = torch.load(os.path.join(published_factor_dir, "B_img_analytic.pt"), map_location="cpu",
                       weights_only=True).double()
    assert torch.equal(post_img.B, (raw_b + raw_b.T) / 2) and torch.equal(post_img.B, post_img.B.T)
    report = post_img.factor_report["B"]
    assert report.asymmetry == pytest.approx((raw_b - raw_b.T).abs().max().item())
    assert 0 < report.asymmetry < 1e-4
    assert report.num_clamped >= 1 and -1e-3 < report.min_eigenvalue < 0
    assert post_img.factor_report["A"].num_clamped == 0
    assert post_img.factor_report["A"].min_eigenvalue == pytest.approx(40.7, rel=1e-2)
    assert post_txt.factor_report["B"].num_clamped >= 1

    img = post_img.embed(torch.randn(64, P_img, generator=g))
    txt = post_txt.embed(torch.randn(10, P_txt, generator=g))
    assert bool((img.trace() > 0).all())
    for variant in ("diag", None):
        mean, var = cosine_moments(img, txt, logit_scale=math.log(100.0), variant=variant)
        assert bool(torch.isfinite(mean).all() and torch.isfinite(var).all()) and bool((var > 0).all())
        probs = predictive(mean, var)
        torch.testing.assert_close(probs.sum(-1), torch.ones(64), rtol=1e-5, atol=1e-5)
    assert math.isfinite(post_img.logdet()) and math.isfinite(post_img.log_marginal_likelihood())
    lam = post_txt.optimize_prior_precision()
    assert math.isfinite(lam) and lam > 0
