"""Zero-shot classification: template averaging keeps the correlation between templates, and the
classifier's probabilities are the documented compositions, checked against float64 brute force."""

import math

import pytest
import torch
from test_posterior import D, dense_embedding_covariance, dense_precision
from testing import spd

from bayesvlm_ext import KronPosterior, cosine_moments, predictive
from bayesvlm_ext.zeroshot import ZeroShotClassifier, template_average

P_IMG, P_TXT, C, T = 5, 4, 3, 6


def posteriors(generator, damping="kron", bias=True):
    img = KronPosterior(spd(P_IMG, generator), spd(D, generator), torch.randn(D, P_IMG, generator=generator,
                        dtype=torch.float64), prior_precision=0.5, damping=damping)
    p = P_TXT + bias
    txt = KronPosterior(spd(p, generator), spd(D, generator), torch.randn(D, P_TXT, generator=generator,
                        dtype=torch.float64), torch.randn(D, generator=generator, dtype=torch.float64) if bias else None,
                        prior_precision=0.8, pseudo_count=2.0, damping=damping)
    return img, txt


@pytest.mark.parametrize("damping", ["kron", "exact"])
def test_class_embedding_is_the_weighted_template_sum_for_every_weight(damping, generator):
    img, txt = posteriors(generator, damping)
    features = torch.randn(C, T, P_TXT, generator=generator, dtype=torch.float64)
    averaged, residual = template_average(features, txt.weight, txt.bias)
    assert residual is None and averaged.shape == (C, P_TXT)
    inverse_norms = 1 / (features @ txt.weight.T + txt.bias).norm(dim=2)  # [C, T]
    # For any weight W (here posterior samples), sum_t (W phi_t + b) / ||g*_t|| = (sum_t 1/||g*_t||) (W phi_c + b).
    weights, biases = txt.sample_weights(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for W, b in zip(weights, biases):
        per_template = ((features @ W.T + b) * inverse_norms[:, :, None]).sum(1)
        torch.testing.assert_close(per_template, inverse_norms.sum(1, keepdim=True) * (averaged @ W.T + b),
                                   rtol=1e-12, atol=1e-12)
    # At the MAP: parallel to CLIP's mean of normalised template embeddings.
    clip_average = torch.nn.functional.normalize(features @ txt.weight.T + txt.bias, dim=2).mean(1)
    cosine = torch.nn.functional.cosine_similarity(averaged @ txt.weight.T + txt.bias, clip_average, dim=1)
    torch.testing.assert_close(cosine, torch.ones(C, dtype=torch.float64), rtol=0, atol=1e-14)
    # Its Gaussian is the dense covariance of the averaged (augmented) features.
    clf = ZeroShotClassifier.from_templates(img, txt, features, math.log(20.0))
    augmented = torch.cat([averaged, torch.ones(C, 1, dtype=torch.float64)], 1)
    expected = dense_embedding_covariance(augmented, dense_precision(txt.A, txt.B, 0.8, 2.0, damping))
    torch.testing.assert_close(clf.classes.dense_covariance(), expected, rtol=1e-10, atol=1e-12)


def test_identical_templates_do_not_shrink_the_variance(generator):
    # Independent templates would divide the variance by T; one shared W does not.
    img, txt = posteriors(generator)
    one = torch.randn(C, 1, P_TXT, generator=generator, dtype=torch.float64)
    single = ZeroShotClassifier.from_templates(img, txt, one, math.log(20.0))
    repeated = ZeroShotClassifier.from_templates(img, txt, one.expand(C, T, P_TXT), math.log(20.0))
    torch.testing.assert_close(repeated.classes.dense_covariance(), single.classes.dense_covariance(), rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
def test_probabilities_against_their_definitions(likelihood, generator):
    img, txt = posteriors(generator)
    features = torch.randn(C, T, P_TXT, generator=generator, dtype=torch.float64)
    images = torch.randn(7, P_IMG, generator=generator, dtype=torch.float64)
    scale, bias = math.log(20.0), (-1.5 if likelihood == "sigmoid" else 0.0)
    clf = ZeroShotClassifier.from_templates(img, txt, features, scale, bias, likelihood=likelihood)
    mean, var = clf.logits(images)
    averaged, _ = template_average(features, txt.weight, txt.bias)
    ref_mean, ref_var = cosine_moments(img.embed(images), txt.embed(averaged), scale, bias)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    probit = clf.predict(images)
    link = "probit" if likelihood == "softmax" else "sigmoid"
    torch.testing.assert_close(probit, predictive(mean, var, link=link), rtol=1e-12, atol=1e-12)
    mc = clf.predict(images, link="mc", num_samples=50_000, generator=torch.Generator().manual_seed(0))
    assert (mc - probit).abs().max() < 0.05  # probit approximates the Monte Carlo predictive
    if likelihood == "softmax":
        torch.testing.assert_close(probit.sum(1), torch.ones(7, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # MAP: the deterministic model from raw matrices, CLIP's template average of normalised embeddings.
    x = torch.nn.functional.normalize(images @ img.weight.T, dim=1)
    y = torch.nn.functional.normalize(
        torch.nn.functional.normalize(features @ txt.weight.T + txt.bias, dim=2).mean(1), dim=1)
    logits = 20.0 * x @ y.T + bias
    expected = torch.softmax(logits, 1) if likelihood == "softmax" else torch.sigmoid(logits)
    torch.testing.assert_close(clf.map_probabilities(images), expected, rtol=1e-12, atol=1e-12)


def test_zero_shot_errors_name_the_argument(generator):
    img, txt = posteriors(generator)
    with pytest.raises(ValueError, match="'features'"):
        template_average(torch.randn(C, T, P_TXT + 1, dtype=torch.float64), txt.weight, txt.bias)
    with pytest.raises(ValueError, match="at least one template"):
        template_average(torch.randn(C, 0, P_TXT, dtype=torch.float64), txt.weight, txt.bias)
    with pytest.raises(ValueError, match="'likelihood'"):
        ZeroShotClassifier(img, txt, torch.randn(C, P_TXT, dtype=torch.float64), 1.0, likelihood="hinge")
    with pytest.raises(ValueError, match="'text_posterior'"):
        ZeroShotClassifier(img, "txt", torch.randn(C, P_TXT, dtype=torch.float64), 1.0)
    clf = ZeroShotClassifier(img, txt, torch.randn(C, P_TXT, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="'link'"):
        clf.predict(torch.randn(2, P_IMG, dtype=torch.float64), link="sigmoid")
    with pytest.raises(ValueError, match="'phi'"):
        clf.predict(torch.randn(2, P_IMG + 1, dtype=torch.float64))
