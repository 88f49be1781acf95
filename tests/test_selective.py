"""Selective prediction (SPEC.md section 11): risk-coverage, AURC, E-AURC and the error AUROC against brute
force in exact fractions, sklearn and scipy; ties, degenerate inputs and the confidence helpers."""

import itertools
import math
from fractions import Fraction

import pytest
import scipy.stats
import sklearn.metrics
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from testing import devices, dtypes

from bayesvlm_ext.evaluation import (aurc, eaurc, error_auroc, max_probability, neg_top_logit_variance, recall_at_k,
                                     retrieval_hits, risk_coverage, selective_metrics)

PERCENT = [Fraction(k, 100) for k in range(1, 101)]  # SPEC 11's coverages, exact


def brute_risks(confidence, correct, coverages=PERCENT):
    """Expected error rate among the ceil(c N) most confident items, ties taken in random order: every item
    of a more confident level, then a share of the boundary level in proportion to its errors."""
    conf, wrong, n_items = [float(x) for x in confidence], [not bool(x) for x in correct], len(confidence)
    risks = []
    for c in coverages:
        n = max(1, math.ceil(Fraction(c) * n_items))
        taken, errors = 0, Fraction(0)
        for level in sorted(set(conf), reverse=True):
            members = [i for i in range(n_items) if conf[i] == level]
            take = min(len(members), n - taken)
            errors += Fraction(take * sum(wrong[i] for i in members), len(members))
            taken += take
            if taken == n:
                break
        risks.append(errors / n)
    return risks


def brute_auroc(confidence, correct):
    pos = [float(c) for c, ok in zip(confidence, correct) if ok]
    neg = [float(c) for c, ok in zip(confidence, correct) if not ok]
    wins = sum(Fraction(1) if p > q else Fraction(1, 2) if p == q else Fraction(0) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def tied_data(n, seed, levels=6):
    g = torch.Generator().manual_seed(seed)
    confidence = torch.randint(0, levels, (n,), generator=g).double() / levels  # many ties
    correct = torch.rand(n, generator=g, dtype=torch.float64) < 0.3 + 0.6 * confidence  # confident: more right
    return confidence, correct


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n", [1, 7, 100, 203])
def test_risk_coverage_against_fractions(seed, n):
    confidence, correct = tied_data(n, seed)
    coverages, risks = risk_coverage(confidence, correct)
    assert coverages.shape == risks.shape == (100,) and risks.dtype == torch.float64
    assert coverages.tolist() == [float(c) for c in PERCENT]
    expected = brute_risks(confidence, correct)
    assert risks.tolist() == pytest.approx([float(r) for r in expected], abs=1e-14)
    assert aurc(confidence, correct) == pytest.approx(float(sum(expected) / 100), abs=1e-14)


def test_ceil_of_coverage_times_n_is_exact():
    # 0.07 * 100 = 7.000000000000001 in float64: the 7 most confident items, not 8.
    confidence = -torch.arange(100, dtype=torch.float64)
    correct = torch.ones(100, dtype=torch.bool)
    correct[7] = False  # the 8th most confident item
    _, risks = risk_coverage(confidence, correct)
    assert risks[6].item() == 0.0 and risks[7].item() == pytest.approx(1 / 8, abs=1e-15)
    _, risks = risk_coverage(confidence[:10], correct[:10], [0.001, 0.5, 0.7, 0.71, 1])
    assert risks.tolist() == pytest.approx([0, 0, 0, 1 / 8, 1 / 10], abs=1e-15)  # 1 (at least one), 5, 7, 8, 10


@pytest.mark.parametrize("seed", range(3))
def test_ties_equal_the_average_over_every_tie_breaking(seed):
    # The tie rule by enumeration: every order sorted by confidence is equally likely, the risk its mean.
    confidence, correct = tied_data(7, seed, levels=3)
    orders = [p for p in itertools.permutations(range(7))
              if all(confidence[p[i]] >= confidence[p[i + 1]] for i in range(6))]
    coverages = [Fraction(k, 7) for k in range(1, 8)]
    expected = [sum(Fraction(sum(not bool(correct[i]) for i in p[:n]), n) for p in orders) / len(orders)
                for n in range(1, 8)]
    _, risks = risk_coverage(confidence, correct, [float(c) for c in coverages])
    assert risks.tolist() == pytest.approx([float(r) for r in expected], abs=1e-14)
    assert expected == brute_risks(confidence, correct, coverages)


@pytest.mark.parametrize("seed", range(3))
def test_result_does_not_depend_on_the_input_order(seed):
    confidence, correct = tied_data(150, seed)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(seed + 10))
    _, risks = risk_coverage(confidence, correct)
    _, permuted = risk_coverage(confidence[perm], correct[perm])
    assert torch.equal(risks, permuted)
    assert error_auroc(confidence[perm], correct[perm]) == error_auroc(confidence, correct)
    assert selective_metrics(confidence[perm], correct[perm]) == selective_metrics(confidence, correct)


def test_constant_confidence_has_the_overall_error_rate_at_every_coverage():
    confidence, correct = torch.zeros(40, dtype=torch.float64), torch.arange(40) % 4 != 0  # 10 wrong
    _, risks = risk_coverage(confidence, correct)
    torch.testing.assert_close(risks, torch.full((100,), 0.25, dtype=torch.float64), rtol=0, atol=1e-15)
    assert error_auroc(confidence, correct) == 0.5


def test_oracle_and_anti_oracle_orderings_have_known_aurc():
    # N = 100, 20 wrong: coverage k % answers the k most confident items.
    correct = torch.arange(100) % 5 != 0
    noise = torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    oracle = correct.double() + 0.5 * noise  # every correct item above every wrong one, no ties
    oracle_aurc = sum(Fraction(max(0, k - 80), k) for k in range(1, 101)) / 100
    anti_aurc = sum(Fraction(min(k, 20), k) for k in range(1, 101)) / 100
    assert aurc(oracle, correct) == pytest.approx(float(oracle_aurc), abs=1e-15)
    assert aurc(-oracle, correct) == pytest.approx(float(anti_aurc), abs=1e-15)
    assert eaurc(oracle, correct) == pytest.approx(0.0, abs=1e-15)
    assert eaurc(-oracle, correct) == pytest.approx(float(anti_aurc - oracle_aurc), abs=1e-15)
    assert error_auroc(oracle, correct) == 1.0 and error_auroc(-oracle, correct) == 0.0
    assert selective_metrics(oracle, correct) == pytest.approx({"aurc": float(oracle_aurc), "eaurc": 0.0,
                                                                "auroc": 1.0}, abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [2, 9, 300])
def test_error_auroc_equals_sklearn_scipy_and_fractions(seed, n):
    confidence, correct = tied_data(n, seed)
    correct[0], correct[1] = True, False  # both classes present
    got = error_auroc(confidence, correct)
    assert got == pytest.approx(sklearn.metrics.roc_auc_score(correct.numpy(), confidence.numpy()), abs=1e-12)
    u = scipy.stats.mannwhitneyu(confidence[correct].numpy(), confidence[~correct].numpy()).statistic
    assert got == pytest.approx(u / (int(correct.sum()) * int((~correct).sum())), abs=1e-12)
    assert got == pytest.approx(float(brute_auroc(confidence, correct)), abs=1e-12)
    assert selective_metrics(confidence, correct)["auroc"] == got


def test_eaurc_against_fractions_and_selective_metrics_are_plain_floats():
    confidence, correct = tied_data(120, 7)
    oracle = brute_risks(correct.double(), correct)
    expected = (sum(brute_risks(confidence, correct)) - sum(oracle)) / 100
    assert eaurc(confidence, correct) == pytest.approx(float(expected), abs=1e-14)
    assert eaurc(confidence, correct) >= 0
    metrics = selective_metrics(confidence, correct)
    assert set(metrics) == {"aurc", "eaurc", "auroc"} and all(type(v) is float for v in metrics.values())
    assert metrics == {"aurc": aurc(confidence, correct), "eaurc": eaurc(confidence, correct),
                       "auroc": error_auroc(confidence, correct)}


@pytest.mark.parametrize("value", [True, False])
@pytest.mark.parametrize("n", [1, 5])
def test_all_right_or_all_wrong(value, n):
    confidence = torch.linspace(0, 1, n, dtype=torch.float64)
    correct = torch.full((n,), value)
    _, risks = risk_coverage(confidence, correct)
    assert torch.equal(risks, torch.full((100,), 0.0 if value else 1.0, dtype=torch.float64))
    assert aurc(confidence, correct) == (0.0 if value else 1.0)
    assert eaurc(confidence, correct) == 0.0
    assert math.isnan(error_auroc(confidence, correct))  # nothing to tell apart
    assert selective_metrics(confidence, correct) == {"aurc": 0.0 if value else 1.0, "eaurc": 0.0, "auroc": None}


def test_infinite_confidence_ranks_at_the_ends():
    confidence = torch.tensor([float("inf"), 0.5, float("-inf"), 0.5])
    correct = torch.tensor([True, False, False, True])
    _, risks = risk_coverage(confidence, correct, [0.25, 0.5, 0.75, 1.0])
    assert risks.tolist() == pytest.approx([0.0, 0.25, 1 / 3, 0.5], abs=1e-15)
    assert error_auroc(confidence, correct) == pytest.approx(0.875, abs=1e-15)  # pairs: 1, 1, 1/2, 1


@pytest.mark.parametrize("device", devices)
@pytest.mark.parametrize("dtype", dtypes)
def test_dtypes_and_devices_rank_the_values_they_hold(device, dtype):
    confidence, correct = tied_data(90, 3, levels=90)
    confidence = torch.sigmoid(3 * confidence).to(dtype)  # low precision makes ties of its own
    exact = confidence.double()
    coverages, risks = risk_coverage(confidence.to(device), correct.to(device))
    assert coverages.device.type == risks.device.type == device.type and risks.dtype == torch.float64
    assert risks.cpu().tolist() == pytest.approx([float(r) for r in brute_risks(exact, correct)], abs=1e-14)
    assert error_auroc(confidence.to(device), correct.to(device)) == pytest.approx(
        float(brute_auroc(exact, correct)), abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=25),
       st.lists(st.integers(1, 1000), min_size=1, max_size=5))
def test_property_against_fractions(items, per_mille):
    confidence = torch.tensor([float(c) for c, _ in items], dtype=torch.float64)
    correct = torch.tensor([ok for _, ok in items], dtype=torch.bool)
    coverages = [Fraction(p, 1000) for p in per_mille]
    _, risks = risk_coverage(confidence, correct, [float(c) for c in coverages])
    assert risks.tolist() == pytest.approx([float(r) for r in brute_risks(confidence, correct, coverages)],
                                           abs=1e-14)
    assert eaurc(confidence, correct) >= -1e-15
    if correct.any() and not correct.all():
        assert error_auroc(confidence, correct) == pytest.approx(float(brute_auroc(confidence, correct)), abs=1e-14)


def test_bad_input_names_the_argument():
    confidence, correct = torch.rand(5), torch.tensor([True, False, True, True, False])
    for bad_confidence, match in ((torch.rand(5, 1), "'confidence' must be 1-D"),
                                  (torch.arange(5), "'confidence' must be float"),
                                  ([0.1] * 5, "'confidence' must be a torch.Tensor"),
                                  (torch.tensor([0.1, float("nan"), 0.2, 0.3, 0.4]), "'confidence' contains NaN")):
        with pytest.raises(ValueError, match=match):
            risk_coverage(bad_confidence, correct)
    for bad_correct in (correct.int(), correct.double(), correct[:4], correct[:, None]):
        with pytest.raises(ValueError, match="'correct' must be a bool"):
            risk_coverage(confidence, bad_correct)
    for fn in (risk_coverage, aurc, eaurc, error_auroc, selective_metrics):
        with pytest.raises(ValueError, match="'confidence' must hold at least one item"):
            fn(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
        with pytest.raises(ValueError, match="'correct'"):
            fn(confidence, correct.int())
    for bad_coverages in ([], [0.0, 0.5], [1.5], [float("nan")], [[0.5]], "half"):
        with pytest.raises(ValueError, match="'coverages'"):
            risk_coverage(confidence, correct, bad_coverages)


def test_max_probability_and_neg_top_logit_variance():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(30, 5, generator=g), dim=1)
    assert torch.equal(max_probability(probs), torch.tensor([max(row) for row in probs.tolist()]))
    mean = torch.randint(0, 3, (30, 5), generator=g).float()  # ties for the top class: the lowest index
    var = torch.rand(30, 5, generator=g)
    expected = [-var[i, mean[i].tolist().index(max(mean[i].tolist()))].item() for i in range(30)]
    assert neg_top_logit_variance(mean, var).tolist() == expected
    with pytest.raises(ValueError, match="'probs'"):
        max_probability(probs[0])
    with pytest.raises(ValueError, match="'mean' and 'var'"):
        neg_top_logit_variance(mean, var[:, :4])
    with pytest.raises(ValueError, match="'var'"):
        neg_top_logit_variance(mean, var.long())


def test_retrieval_hits_give_recall_and_rank1_correctness():
    g = torch.Generator().manual_seed(5)
    gallery_labels = torch.randint(0, 8, (20,), generator=g)
    query_labels = torch.randint(0, 8, (12,), generator=g)
    top = torch.stack([torch.randperm(20, generator=g)[:5] for _ in range(12)])
    hits = retrieval_hits(top, query_labels, gallery_labels)
    assert hits.tolist() == [[int(gallery_labels[top[i, j]]) == int(query_labels[i]) for j in range(5)]
                             for i in range(12)]
    assert recall_at_k(hits, (1,))["recall@1"] == hits[:, 0].double().mean().item()
    confidence = torch.rand(12, generator=g)
    assert selective_metrics(confidence, hits[:, 0])["aurc"] == aurc(confidence, hits[:, 0])  # rank-1 errors
    with pytest.raises(ValueError, match="'top'"):
        retrieval_hits(top + 20, query_labels, gallery_labels)
    with pytest.raises(ValueError, match="'top'"):
        retrieval_hits(top.double(), query_labels, gallery_labels)
    with pytest.raises(ValueError, match="'query_labels'"):
        retrieval_hits(top, query_labels[:5], gallery_labels)
