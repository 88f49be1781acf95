"""BayesVLM, the object around a model: each method against the package functions it composes, the model's own
embeddings bit for bit, save / load round trips, and clear errors."""

import json
import math
import os

import pytest
import torch
from testing import tiny_hugging_face_configs, tiny_open_clip

from bayesvlm_ext import BayesVLM, KronPosterior, ZeroShotClassifier, cosine_moments, fit_factors, topk
from bayesvlm_ext.active import label_curvature, update_posterior
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.fit import unnormalised_encoder
from bayesvlm_ext.index import save_index, search

pytest.importorskip("open_clip")


def pairs(n=12, seed=0, image_size=32, vocab=64, length=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, image_size, image_size, generator=g), torch.randint(1, vocab, (4, length), generator=g))
            for _ in range(n // 4)]


@pytest.fixture(scope="module")
def fitted():
    model = tiny_open_clip()
    return model, BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False)


def test_fit_equals_the_glue_it_replaces(fitted):
    model, vlm = fitted
    fits = fit_factors(model, pairs(), class_batch_size=5, progress=False)
    for tower, posterior in vlm.posteriors.items():
        expected = KronPosterior(fits[tower].A, fits[tower].B, fits[tower].weight, fits[tower].bias)
        expected.optimize_prior_precision()
        assert torch.equal(posterior.A, expected.A) and torch.equal(posterior.B, expected.B)
        assert posterior.prior_precision == expected.prior_precision
    assert vlm.num_data == 12 and vlm.likelihood.value == "infonce"
    assert vlm.logit_scale == model.logit_scale.item() and vlm.logit_bias == 0.0


def test_encodings_are_the_model_own_embeddings_bit_for_bit(fitted):
    model, vlm = fitted
    pixels, tokens = pairs(4, seed=1)[0]
    image, text = vlm.encode_image(pixels), vlm.encode_text(tokens)
    with torch.no_grad():  # inference, as encode_* runs it (with autograd on, torch may pick another GEMM path)
        assert torch.equal(image.mean, model.encode_image(pixels, normalize=False))
        assert torch.equal(text.mean, model.encode_text(tokens, normalize=False))
    # The covariance is the posterior's at the captured features.
    features = capture(unnormalised_encoder(model, "image"), pixels, find_projection(model, "image")).features
    expected = vlm.image.embed(features, against=vlm.text)
    torch.testing.assert_close(image.dense_covariance(), expected.dense_covariance(), rtol=0, atol=0)
    torch.testing.assert_close(image.mean, expected.mean, rtol=1e-5, atol=1e-6)  # W phi + b by another GEMM
    # Statistics cached for the model's mean, against the other tower.
    torch.testing.assert_close(image.sq_norm, (image.mean.double() ** 2).sum(1).float(), rtol=1e-6, atol=0)
    assert image.cached_cross_quad(text.shared) is not None and text.cached_cross_quad(image.shared) is not None


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hugging_face_models_bit_for_bit(family):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision, text = tiny_hugging_face_configs()
    if family == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                               projection_dim=12)).eval()
    else:
        model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    batches = pairs(8, seed=2, image_size=30, vocab=99, length=16)
    vlm = BayesVLM.fit(model, batches, class_batch_size=4, progress=False)
    assert vlm.likelihood.value == ("siglip" if family == "siglip" else "infonce")
    pixels, tokens = batches[0]
    image, txt = vlm.encode_image(pixels), vlm.encode_text(tokens)

    def own(output):  # get_*_features may return a model output holding the embedding
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        assert torch.equal(image.mean, own(model.get_image_features(pixel_values=pixels)))
        assert torch.equal(txt.mean, own(model.get_text_features(input_ids=tokens)))
    mean, var = vlm.logits(image, txt)
    assert mean.shape == var.shape == (4, 4) and bool((var > 0).all())


def test_scoring_methods_are_the_package_functions(fitted, tmp_path):
    _, vlm = fitted
    pixels, tokens = pairs(4, seed=3)[0]
    image, text = vlm.encode_image(pixels), vlm.encode_text(tokens)
    for output in ("mean", "probit"):
        got = vlm.logits(image, text, output=output)
        expected = cosine_moments(image, text, vlm.logit_scale, vlm.logit_bias, output=output)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    got = vlm.topk(text, image, 3, score="probit")
    expected = topk(text, image, 3, "probit", logit_scale=vlm.logit_scale, logit_bias=vlm.logit_bias)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    index = save_index(tmp_path / "index", image, shard_rows=3)  # no stored logit scale: the model's is used
    for options in ({}, {"shards": [1]}):
        got = vlm.search(index, text, 1, "probit", **options)
        expected = search(index, text, 1, "probit", logit_scale=vlm.logit_scale, logit_bias=vlm.logit_bias, **options)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_save_load_round_trip_and_the_published_format(fitted, tmp_path):
    model, vlm = fitted
    vlm.save(tmp_path / "posterior")
    loaded = BayesVLM.load(tmp_path / "posterior", model)
    for tower in ("image", "text"):
        a, b = vlm.posteriors[tower], loaded.posteriors[tower]
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.weight, b.weight)
        assert a.prior_precision == b.prior_precision and a.pseudo_count == b.pseudo_count
    assert (loaded.logit_scale, loaded.logit_bias, loaded.likelihood, loaded.num_data) == \
        (vlm.logit_scale, vlm.logit_bias, vlm.likelihood, vlm.num_data)
    pixels = pairs(4, seed=4)[0][0]
    assert torch.equal(loaded.encode_image(pixels).alpha, vlm.encode_image(pixels).alpha)
    # Without the model: features only.
    bare = BayesVLM.load(tmp_path / "posterior")
    with pytest.raises(ValueError, match="holds no model"):
        bare.encode_image(pixels)
    # The published factor format beside it (SPEC 10): the same posterior up to float32 storage of A and B.
    published = BayesVLM.from_published(model, tmp_path / "posterior" / "bayesvlm")
    assert published.num_data is None
    for tower in ("image", "text"):
        torch.testing.assert_close(published.posteriors[tower].A, vlm.posteriors[tower].A, rtol=1e-6, atol=1e-12)
        assert published.posteriors[tower].prior_precision == vlm.posteriors[tower].prior_precision


def test_load_of_an_older_fit_directory_takes_the_model_settings(fitted, tmp_path):
    model, vlm = fitted
    vlm.save(tmp_path)
    os.remove(tmp_path / "bayesvlm.json")
    with pytest.raises(ValueError, match="pass the model"):
        BayesVLM.load(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"pairs": 12}))
    loaded = BayesVLM.load(tmp_path, model)
    assert loaded.num_data == 12 and loaded.logit_scale == vlm.logit_scale


def test_zero_shot_on_pixels(fitted):
    model, vlm = fitted
    g = torch.Generator().manual_seed(5)
    class_tokens = torch.randint(1, 64, (3, 2, 8), generator=g)  # 3 classes, 2 templates
    pixels = torch.randn(5, 3, 32, 32, generator=g)
    clf = vlm.zero_shot(class_tokens)
    probs = clf.predict(pixels)
    assert probs.shape == (5, 3) and clf.num_classes == 3
    torch.testing.assert_close(probs.sum(1), torch.ones(5), rtol=1e-6, atol=1e-6)
    # The same classifier built from captured features; the image means differ by rounding only.
    features = capture(unnormalised_encoder(model, "text"), class_tokens.reshape(6, 8), find_projection(model, "text"))
    expected = ZeroShotClassifier.from_templates(vlm.image, vlm.text, features.features.reshape(3, 2, -1),
                                                 vlm.logit_scale)
    image_features = capture(unnormalised_encoder(model, "image"), pixels, find_projection(model, "image")).features
    torch.testing.assert_close(probs, expected.predict(image_features), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clf.map_probabilities(pixels), expected.map_probabilities(image_features), rtol=1e-5,
                               atol=1e-6)
    single = vlm.zero_shot(class_tokens[:, 0])  # [C, L]: one prompt per class
    assert single.predict(pixels).shape == (5, 3)
    with pytest.raises(ValueError, match="'class_tokens'"):
        vlm.zero_shot(class_tokens[0, 0])


def test_update_folds_labelled_images_into_the_image_posterior(tmp_path):
    model = tiny_open_clip()
    vlm = BayesVLM.fit(model, pairs(), class_batch_size=5, progress=False)
    g = torch.Generator().manual_seed(6)
    clf = vlm.zero_shot(torch.randint(1, 64, (3, 8), generator=g))
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    before, text_before = vlm.image, vlm.text
    features = capture(unnormalised_encoder(model, "image"), pixels, find_projection(model, "image")).features
    expected = update_posterior(before, features, label_curvature(clf.classifier, features), 12)
    vlm.update(pixels, clf)
    assert vlm.num_data == 16 and vlm.text is text_before
    assert torch.equal(vlm.image.A, expected.A) and torch.equal(vlm.image.B, expected.B)
    assert vlm.image.prior_precision == expected.prior_precision
    clf.predict(pixels)  # the classifier follows the updated posterior
    vlm.num_data = None
    with pytest.raises(ValueError, match="number of pairs"):
        vlm.update(pixels, clf)


def test_errors_name_what_is_wrong(fitted):
    model, vlm = fitted
    other = tiny_open_clip(seed=1)
    with pytest.raises(ValueError, match="fitted on another model"):
        BayesVLM(vlm.image, vlm.text, logit_scale=vlm.logit_scale, model=other)
    with pytest.raises(ValueError, match="'logit_scale'"):
        BayesVLM(vlm.image, vlm.text, logit_scale=math.inf)
    with pytest.raises(ValueError, match="'text' must be a KronPosterior"):
        BayesVLM(vlm.image, "posterior", logit_scale=1.0)
    with pytest.raises(ValueError, match="'num_data'"):
        BayesVLM(vlm.image, vlm.text, logit_scale=1.0, num_data=-1)
    with pytest.raises(ValueError, match="'likelihood'"):
        BayesVLM(vlm.image, vlm.text, logit_scale=1.0, likelihood="softmax")
    with pytest.raises(ValueError, match="must be a ZeroShot"):
        vlm.update(torch.randn(1, 3, 32, 32), None)
    with pytest.raises(FileNotFoundError):
        BayesVLM.load("/nonexistent/posterior")
