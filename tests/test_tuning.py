"""The pseudo-count chosen on held-out data (SPEC.md section 2): tune_pseudo_count against the same search written
out by hand with fresh posteriors, and BayesVLM.tune on a tiny open_clip model."""

import copy
import math

import pytest
import torch
from testing import spd, tiny_open_clip

from bayesvlm_ext import BayesVLM, KronPosterior, ZeroShotClassifier, nlpd
from bayesvlm_ext.tuning import DEFAULT_GRID, tune_pseudo_count

P_IMG, P_TXT, D, C, N = 10, 8, 6, 4, 40
GRID = [0.01, 0.3, 1.0, 30.0, 1000.0]


def towers(generator):
    posteriors = []
    for p in (P_IMG, P_TXT):
        weight = torch.randn(D, p, generator=generator, dtype=torch.float64)
        bias = torch.randn(D, generator=generator, dtype=torch.float64)
        posteriors.append(KronPosterior(spd(p + 1, generator) * 5, spd(D, generator) * 5, weight, bias))
    return posteriors


def held_out(generator):
    return (torch.randn(N, P_IMG, generator=generator, dtype=torch.float64),
            torch.randint(0, C, (N,), generator=generator),
            torch.randn(C, P_TXT, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("likelihood", ["softmax", "sigmoid"])
def test_the_search_is_the_grid_written_out_by_hand(likelihood):
    generator = torch.Generator().manual_seed(3)
    image, text = towers(generator)
    features, labels, class_features = held_out(generator)
    originals = copy.deepcopy((image, text))
    search = tune_pseudo_count(image, text, features, labels, class_features, math.log(20.0), -1.0, likelihood,
                               grid=GRID)
    expected_nlpd, expected_lambda = [], {"image": [], "text": []}
    for n in GRID:
        fresh = {}
        for name, original in zip(("image", "text"), originals):
            fresh[name] = KronPosterior(original.A, original.B, original.weight, original.bias, pseudo_count=n)
            expected_lambda[name].append(fresh[name].optimize_prior_precision())
        classifier = ZeroShotClassifier(fresh["image"], fresh["text"], class_features, math.log(20.0), -1.0,
                                        likelihood)
        expected_nlpd.append(nlpd(classifier.predict(features), labels))
    for name in ("image", "text"):
        assert search.prior_precisions[name] == pytest.approx(expected_lambda[name], rel=1e-9)
    assert search.nlpd == pytest.approx(expected_nlpd, rel=1e-9)
    best = min(range(len(GRID)), key=lambda i: expected_nlpd[i])
    assert search.best == best and search.pseudo_count == GRID[best]
    assert len(set(round(v, 6) for v in expected_nlpd)) > 1  # the grid matters on this data
    for name, posterior in (("image", image), ("text", text)):
        assert posterior.pseudo_count == GRID[best]
        assert posterior.prior_precision == search.prior_precisions[name][best]


def test_bad_arguments_are_named():
    generator = torch.Generator().manual_seed(4)
    image, text = towers(generator)
    features, labels, class_features = held_out(generator)
    with pytest.raises(ValueError, match="argument 'grid'"):
        tune_pseudo_count(image, text, features, labels, class_features, 3.0, grid=[1.0, -2.0])
    with pytest.raises(ValueError, match="argument 'labels' must lie in"):
        tune_pseudo_count(image, text, features, labels + C, class_features, 3.0, grid=GRID)
    with pytest.raises(ValueError, match="argument 'labels' must hold one label"):
        tune_pseudo_count(image, text, features, labels[:-1], class_features, 3.0, grid=GRID)
    with pytest.raises(ValueError, match="argument 'image' must be a KronPosterior"):
        tune_pseudo_count(None, text, features, labels, class_features, 3.0, grid=GRID)
    assert 1.0 in DEFAULT_GRID and DEFAULT_GRID == tuple(sorted(DEFAULT_GRID))


def pairs(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(1, 64, (4, 8), generator=g)) for _ in range(n // 4)]


def test_bayesvlm_tune_on_zero_shot_labels_and_on_captions():
    pytest.importorskip("open_clip")
    model = tiny_open_clip()
    vlm = BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False)
    class_tokens = torch.randint(1, 64, (3, 2, 8), generator=torch.Generator().manual_seed(7))
    clf = vlm.zero_shot(class_tokens)
    pixels, tokens = pairs(8, seed=2)[0][0].repeat(2, 1, 1, 1), pairs(8, seed=2)[0][1].repeat(2, 1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    search = vlm.tune(pixels, labels, clf, grid=GRID, progress=False)
    assert vlm.image.pseudo_count == vlm.text.pseudo_count == search.pseudo_count
    assert search.extra == {"held_out": 8, "task": "zero-shot"}
    # The classifier made before the search follows the tuned posteriors: the same as one made afresh.
    torch.testing.assert_close(clf.predict(pixels), vlm.zero_shot(class_tokens).predict(pixels), rtol=0, atol=0)
    assert search.nlpd[search.best] == pytest.approx(nlpd(clf.predict(pixels), labels), rel=1e-6)
    matched = vlm.tune(pixels[:4], tokens[:4], grid=GRID, progress=False)
    assert matched.extra["task"] == "caption matching" and len(matched.nlpd) == len(GRID)
    with pytest.raises(ValueError, match="argument 'targets' must hold one caption per image"):
        vlm.tune(pixels, tokens[:3], grid=GRID, progress=False)
    other = BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False)
    with pytest.raises(ValueError, match="argument 'classifier' must be a ZeroShot made by this BayesVLM"):
        other.tune(pixels, labels, clf, grid=GRID, progress=False)


def test_fit_with_held_out_data_chooses_n_and_keeps_the_table():
    pytest.importorskip("open_clip")
    model = tiny_open_clip()
    pixels, tokens = pairs(8, seed=3)[0][0].repeat(2, 1, 1, 1), pairs(8, seed=3)[0][1].repeat(2, 1)
    vlm = BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False, val=(pixels, tokens))
    assert vlm.tuning.extra["task"] == "caption matching" and len(vlm.tuning.nlpd) == len(DEFAULT_GRID)
    assert vlm.image.pseudo_count == vlm.text.pseudo_count == vlm.tuning.pseudo_count
    # the same search run by hand on a plain fit gives the same table
    plain = BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False)
    assert plain.tuning is None
    assert plain.tune(pixels, tokens, progress=False).nlpd == pytest.approx(vlm.tuning.nlpd, rel=1e-12)
    classes = torch.randint(1, 64, (3, 8), generator=torch.Generator().manual_seed(9))
    labelled = BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False,
                            val=(pixels, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), classes))
    assert labelled.tuning.extra["task"] == "zero-shot"
    with pytest.raises(ValueError, match="argument 'val' must be"):
        BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False, val=(pixels,))
