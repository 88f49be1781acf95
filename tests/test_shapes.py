"""The package's own data: procedurally drawn shapes with captions, and the embedded default model."""

import dataclasses

import pytest
import torch

from bayesvlm_ext.demo import default_model, shapes


def test_generation_is_reproducible_and_captions_name_the_attributes():
    a, b = shapes.generate(300, "train", seed=3), shapes.generate(300, "train", seed=3)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.images.shape == (300, 3, 32, 32) and a.images.dtype == torch.float32
    assert 0 <= a.images.min() and a.images.max() <= 1
    other = shapes.generate(300, "test", seed=3)
    assert not torch.equal(a.images, other.images)  # test draws other images than train
    for i in range(0, 300, 37):
        words = a.captions[i].split()
        assert words[1] == list(shapes.SIZES)[a.size[i]] and words[2] == list(shapes.COLOURS)[a.colour[i]]
        assert words[3] == shapes.SHAPES[a.shape[i]]
        assert a.captions[i].endswith(list(shapes.POSITIONS)[a.position[i]])
    # equal caption ids exactly when the captions are equal
    ids = a.caption_ids.tolist()
    assert all((ids[i] == ids[j]) == (a.captions[i] == a.captions[j]) for i in range(50) for j in range(50))


def test_held_out_combinations_appear_only_under_shift():
    held = {(list(shapes.COLOURS).index(c), shapes.SHAPES.index(s)) for c, s in shapes.HELD_OUT}
    for domain in ("train", "test"):
        data = shapes.generate(2000, domain, seed=1)
        assert not {(int(c), int(s)) for c, s in zip(data.colour, data.shape)} & held
    shifted = shapes.generate(2000, "shifted", seed=1)
    fraction = sum((int(c), int(s)) in held for c, s in zip(shifted.colour, shifted.shape)) / 2000
    assert 0.4 < fraction < 0.6


def test_shapes_are_drawn_where_the_caption_says():
    # The colour-coded pixels of a large shape on a dark background sit in the named half of the image.
    data = shapes.generate(400, "train", seed=2, image_size=32)
    rgb = torch.tensor(list(shapes.COLOURS.values()))[data.colour]  # [N, 3]
    close = ((data.images - rgb[:, :, None, None]).abs().amax(1) < 0.15).float()  # [N, H, W]
    xs = torch.arange(32.0)
    mass = close.sum((1, 2)).clamp_min(1)
    cx, cy = (close.sum(1) * xs).sum(1) / mass, (close.sum(2) * xs).sum(1) / mass
    names = list(shapes.POSITIONS)
    for i in range(400):
        if close[i].sum() < 10:
            continue  # a background tint too near the shape's colour: nothing to locate
        where = names[data.position[i]]
        if where == "on the left":
            assert cx[i] < 14
        elif where == "on the right":
            assert cx[i] > 18
        elif where == "at the top":
            assert cy[i] < 14
        elif where == "at the bottom":
            assert cy[i] > 18


def test_tokenize_and_its_errors():
    tokens = shapes.tokenize(["a small red circle on the left", "a large blue ring in the centre"])
    assert tokens.shape == (2, shapes.CONTEXT_LENGTH)
    assert tokens[0, 0] == shapes.START and tokens.max() == shapes.END  # open_clip pools at the largest id
    assert (tokens.argmax(1) == torch.tensor([8, 8])).all()
    with pytest.raises(ValueError, match="outside the vocabulary.*'dog'"):
        shapes.tokenize("a small dog")
    with pytest.raises(ValueError, match="'domain'"):
        shapes.generate(3, "mars")
    with pytest.raises(ValueError, match="'n'"):
        shapes.generate(-1)


SHORT = default_model.TrainingConfig(pairs=1024, steps=60, batch_size=64, warmup_steps=10)


def test_training_lowers_the_loss_and_is_deterministic():
    model_a, losses_a = default_model.train_default_model(training=SHORT, progress=False)
    model_b, losses_b = default_model.train_default_model(training=SHORT, progress=False)
    assert losses_a == losses_b
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert sum(losses_a[-10:]) / 10 < 0.75 * sum(losses_a[:5]) / 5  # from about log(64) at the start
    assert not model_a.training


def test_default_model_is_cached_and_reloaded(tmp_path, monkeypatch):
    first = default_model.load_default_model(training=SHORT, cache=tmp_path, progress=False)
    assert len(list(tmp_path.glob("default_clip-*.safetensors"))) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model must be loaded, not retrained")

    monkeypatch.setattr(default_model, "train_default_model", no_training)
    again = default_model.load_default_model(training=SHORT, cache=tmp_path, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), again.state_dict().values()))
    with pytest.raises(AssertionError, match="retrained"):  # other settings are another model
        default_model.load_default_model(training=dataclasses.replace(SHORT, seed=1), cache=tmp_path)
    monkeypatch.setenv("BAYESVLM_EXT_CACHE", str(tmp_path / "elsewhere"))
    assert default_model.cache_directory() == str(tmp_path / "elsewhere")


def test_the_shipped_default_model_serves_the_default_settings_without_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the shipped model must be loaded, not retrained")

    monkeypatch.setattr(default_model, "train_default_model", no_training)
    model = default_model.load_default_model(cache=tmp_path, progress=False)
    assert not list(tmp_path.iterdir())  # served by the package's file: nothing trained, nothing cached
    metadata = default_model.shipped_metadata()
    assert metadata["settings"]["training"] == dataclasses.asdict(default_model.TrainingConfig())
    assert metadata["settings"]["model"] == dataclasses.asdict(default_model.ModelConfig())
    figures = default_model.model_figures(model)  # the recorded figures are these weights' own
    assert figures["accuracy"] == pytest.approx(metadata["figures"]["accuracy"], abs=1e-3)
    assert figures["nlpd"] == pytest.approx(metadata["figures"]["nlpd"], rel=1e-3)
    with pytest.raises(AssertionError, match="retrained"):  # other settings, or shipped=False, train
        default_model.load_default_model(cache=tmp_path, shipped=False)


def test_retraining_from_the_package_reproduces_the_shipped_figures():
    # About two minutes on 2 cores. Training is deterministic on one machine (test above), and on the machine
    # that wrote the file it gives the same weights bit for bit; another BLAS may round differently and 1500
    # steps amplify that, hence a tolerance on the figures: 0.02 in accuracy, 0.03 nats in NLPD (about 20 %).
    model, losses = default_model.train_default_model(progress=False)
    figures = default_model.model_figures(model)
    shipped = default_model.shipped_metadata()["figures"]
    assert abs(figures["accuracy"] - shipped["accuracy"]) <= 0.02, (figures, shipped)
    assert abs(figures["nlpd"] - shipped["nlpd"]) <= 0.03, (figures, shipped)
    assert figures["accuracy"] > 0.9  # a model that means something: 360 captions, chance 1 / 360
