"""predictive() and the metrics: formulas of SPEC.md section 5, torchmetrics for ECE."""

import math

import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from bayesvlm_ext import accuracy, ece, nlpd, predictive


def logits(generator, N=50, C=7):
    mean = 3 * torch.randn(N, C, generator=generator, dtype=torch.float64)
    var = 4 * torch.rand(N, C, generator=generator, dtype=torch.float64)
    return mean, var


def test_probit_and_sigmoid_formulas(generator):
    mean, var = logits(generator)
    kappa = 1 / torch.sqrt(1 + math.pi / 8 * var)
    torch.testing.assert_close(predictive(mean, var, link="probit"), torch.softmax(mean * kappa, -1), rtol=1e-13,
                               atol=1e-15)
    torch.testing.assert_close(predictive(mean, var, link="sigmoid"), torch.sigmoid(mean * kappa), rtol=1e-13, atol=1e-15)
    # Zero variance: the deterministic model.
    torch.testing.assert_close(predictive(mean, torch.zeros_like(var)), torch.softmax(mean, -1), rtol=0, atol=0)


def test_monte_carlo_is_seeded_and_converges(generator):
    mean, var = logits(generator, N=4, C=5)
    a = predictive(mean, var, link="mc", num_samples=500, generator=torch.Generator().manual_seed(3))
    b = predictive(mean, var, link="mc", num_samples=500, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    torch.testing.assert_close(a.sum(-1), torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # Independent estimate: one big draw of softmax(mean + sd * eps).
    eps = torch.randn(200_000, 4, 5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    brute = torch.softmax(mean + var.sqrt() * eps, -1).mean(0)
    estimate = predictive(mean, var, link="mc", num_samples=200_000, generator=torch.Generator().manual_seed(5))
    assert (estimate - brute).abs().max() < 5e-3
    # Chunking does not change the draw count or the value's distribution; with no variance it is exact.
    exact = predictive(mean, torch.zeros_like(var), link="mc", num_samples=7, chunk_size=3)
    torch.testing.assert_close(exact, torch.softmax(mean, -1), rtol=1e-12, atol=1e-12)


def test_monte_carlo_sigmoid_matches_gauss_hermite_quadrature(generator):
    import numpy as np

    mean, var = logits(generator, N=3, C=4)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # E f(Z), Z ~ N(0, 1), to float64 accuracy here
    m, sd = mean.numpy()[..., None], var.sqrt().numpy()[..., None]
    expected = torch.from_numpy((weights / weights.sum() / (1 + np.exp(-(m + sd * nodes)))).sum(-1))
    estimate = predictive(mean, var, link="mc_sigmoid", num_samples=200_000,
                          generator=torch.Generator().manual_seed(2))
    assert (estimate - expected).abs().max() < 3e-3  # about 5 standard errors of a 200k-sample mean
    assert not torch.allclose(estimate.sum(-1), torch.ones(3, dtype=torch.float64))  # elementwise, not normalised


def test_dtypes(generator):
    mean, var = logits(generator)
    assert predictive(mean.half(), var.half()).dtype == torch.float32
    assert predictive(mean, var.float()).dtype == torch.float64


def test_predictive_bad_input(generator):
    mean, var = logits(generator)
    with pytest.raises(ValueError, match="'mean' and 'var'"):
        predictive(mean, var[:, :-1])
    with pytest.raises(ValueError, match="'var' must be non-negative"):
        predictive(mean, -var)
    with pytest.raises(ValueError, match="'link'"):
        predictive(mean, var, link="logit")
    with pytest.raises(ValueError, match="'num_samples'"):
        predictive(mean, var, link="mc", num_samples=0)


def test_accuracy_and_nlpd(generator):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 1, 0])
    assert accuracy(probs, targets) == 0.5
    tiny = torch.finfo(torch.float32).tiny
    expected = -(math.log(0.7) + math.log(0.1) + math.log(0.4) + math.log(tiny)) / 4
    assert nlpd(probs, targets) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("C", [2, 10])
def test_ece_equals_torchmetrics(seed, C):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(400, C, generator=g), -1)
    probs[:7] = torch.nn.functional.one_hot(torch.arange(7) % C, C).float()  # confidence exactly 1
    targets = torch.randint(0, C, (400,), generator=g)
    expected = MulticlassCalibrationError(num_classes=C, n_bins=20, norm="l1")(probs, targets).item()
    assert ece(probs, targets) == pytest.approx(expected, rel=1e-6, abs=1e-7)


def test_metric_bad_input():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="'targets' must lie in"):
        ece(probs, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="'targets' must have 3 entries"):
        nlpd(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="'targets' must hold integer"):
        accuracy(probs, torch.tensor([0.0, 1.0, 2.0]))
