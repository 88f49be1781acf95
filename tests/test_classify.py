"""`bayesvlm-ext classify`: the command's probabilities and logit standard deviations equal BayesVLM.zero_shot's on
the same images, from a fit's posterior or published factors; bad lines are skipped; options are checked first."""

import json
import os

import pytest
import torch
from testing import command_fails, tiny_open_clip_config, truncated_png

from bayesvlm_ext import BayesVLM
from bayesvlm_ext.cli import main
from bayesvlm_ext.cli.inputs import decoded_rgb

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")

CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a {} square.", "a photo of {}."]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (200, 200, 20)]


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(folder, model name, the model and preprocess the command builds, its fitted BayesVLM saved in folder/fit)."""
    folder = tmp_path_factory.mktemp("classify")
    name = tiny_open_clip_config(str(folder / "configs"))
    (folder / "images").mkdir()
    for i, rgb in enumerate(COLOURS):
        Image.new("RGB", (20 + 3 * i, 20), rgb).save(folder / "images" / f"{i}.png")
    torch.manual_seed(0)  # as the command builds the random-init model (--seed 0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randn(4, 3, 32, 32, generator=g), tokenizer([f"a {c} thing" for c in ("red", "dark", "big", "odd")]))
             for _ in range(3)]
    vlm = BayesVLM.fit(model, pairs, class_batch_size=6, progress=False)
    vlm.save(folder / "fit")
    return folder, name, model, preprocess, vlm


def expected(setting, files, vlm=None, link="probit"):
    """(probabilities [N, C], logit sd [N, C]) of BayesVLM.zero_shot in-process on the images `files`."""
    folder, name, model, preprocess, fitted = setting
    vlm = vlm or fitted
    tokenizer = open_clip.get_tokenizer(name)
    tokens = tokenizer([t.format(c) for c in CLASSES for t in TEMPLATES]).reshape(len(CLASSES), len(TEMPLATES), -1)
    clf = vlm.zero_shot(tokens)
    pixels = torch.stack([preprocess(decoded_rgb(str(f))) for f in files])
    mean, var = clf.logits(pixels)
    return clf.classifier.probabilities(mean, var, link), var.sqrt()


def classify(setting, out, *extra):
    folder, name = setting[:2]
    return main(["classify", "--model", name, "--images", str(folder / "images"), "--classes", ",".join(CLASSES),
                 *sum((["--template", t] for t in TEMPLATES), []), "--out", str(out), "--device", "cpu", *extra])


def read(out) -> list[dict]:
    return [json.loads(line) for line in open(out)]


def test_classify_equals_zero_shot_of_the_fitted_posterior(setting, tmp_path, capsys):
    folder = setting[0]
    out = tmp_path / "predictions.jsonl"
    assert classify(setting, out, "--posterior", str(folder / "fit")) == 0
    printed = capsys.readouterr().out
    lines = read(out)
    assert [line["image"] for line in lines] == [f"{i}.png" for i in range(len(COLOURS))]
    probs, std = expected(setting, [folder / "images" / f"{i}.png" for i in range(len(COLOURS))])
    assert torch.equal(torch.tensor([line["probabilities"] for line in lines]), probs)  # the same batch: same bits
    assert torch.equal(torch.tensor([line["logit_std"] for line in lines]), std)
    for line, row in zip(lines, probs):
        best = int(row.argmax())
        assert line["predicted"] == CLASSES[best] and line["probability"] == float(row[best])
        assert [t["class"] for t in line["top"]][0] == CLASSES[best] and len(line["top"]) == 3
        assert f"{line['image']}: {CLASSES[best]} {float(row[best]):.3f}" in printed
    assert f"classified {len(COLOURS)} images into 3 classes (2 templates each, infonce, probit)" in printed
    # Batches of 2: the same figures up to the BLAS rounding of another batch size.
    again = tmp_path / "batched.jsonl"
    assert classify(setting, again, "--posterior", str(folder / "fit"), "--batch-size", "2", "--quiet") == 0
    torch.testing.assert_close(torch.tensor([line["probabilities"] for line in read(again)]), probs, rtol=1e-5,
                               atol=1e-6)


def test_classify_from_published_factors_and_with_monte_carlo(setting, tmp_path):
    folder, _, model = setting[:3]
    out = tmp_path / "published.jsonl"
    assert classify(setting, out, "--factors", str(folder / "fit" / "bayesvlm"), "--quiet") == 0
    published = BayesVLM.from_published(model, folder / "fit" / "bayesvlm")
    probs, _ = expected(setting, [folder / "images" / f"{i}.png" for i in range(len(COLOURS))], vlm=published)
    assert torch.equal(torch.tensor([line["probabilities"] for line in read(out)]), probs)
    mc = [tmp_path / f"mc{i}.jsonl" for i in range(2)]
    for path in mc:
        assert classify(setting, path, "--posterior", str(folder / "fit"), "--link", "mc", "--mc-samples", "200",
                        "--quiet") == 0
    first, second = (torch.tensor([line["probabilities"] for line in read(path)]) for path in mc)
    assert torch.equal(first, second)  # seeded
    torch.testing.assert_close(first.sum(1), torch.ones(len(COLOURS)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(first, probs, rtol=0, atol=0.1)  # Monte Carlo near the probit predictive


def test_a_bad_line_or_image_is_skipped_with_its_line_number(setting, tmp_path, capsys):
    folder, name = setting[:2]
    truncated_png(str(tmp_path / "truncated.png"))
    listing = tmp_path / "list.jsonl"
    listing.write_text("\n".join([json.dumps({"image": str(folder / "images" / "0.png")}), json.dumps({"image": 5}),
                                  json.dumps({"image": str(tmp_path / "truncated.png")}),
                                  json.dumps({"image": str(folder / "images" / "2.png")})]) + "\n")
    out = tmp_path / "out.jsonl"
    status = main(["classify", "--model", name, "--posterior", str(folder / "fit"), "--images", str(listing),
                   "--classes", ",".join(CLASSES), "--out", str(out), "--device", "cpu", "--quiet"])
    assert status == 0
    err = capsys.readouterr().err
    assert "line 2: image is not a string (got 5); skipped" in err
    assert "line 3: image " in err and "truncated.png: cannot be read" in err
    assert [line["image"] for line in read(out)] == [str(folder / "images" / "0.png"), str(folder / "images" / "2.png")]


def test_options_are_checked_before_any_work(setting, tmp_path, capsys):
    folder, name = setting[:2]
    base = ["classify", "--model", name, "--posterior", str(folder / "fit"), "--images", str(folder / "images"),
            "--out", str(tmp_path / "out.jsonl")]
    command_fails(main, capsys, [*base, "--classes", "red,red"], "each class must be named once", status=2)
    command_fails(main, capsys, [*base, "--classes", "red,,blue"], "class names must be non-empty", status=2)
    command_fails(main, capsys, [*base, "--classes", "red", "--template", "no slot"], "exactly one {}", status=2)
    command_fails(main, capsys, [*base, "--classes", "red", "--top-k", "0"], "--top-k must be at least 1", status=2)
    os.mkdir(tmp_path / "a-folder")
    command_fails(main, capsys, [*base[:-1], str(tmp_path / "a-folder"), "--classes", "red"], "is a directory",
                  status=2)
    # A posterior of another model: refused, nothing written.
    other = tmp_path / "other-fit"
    BayesVLM(setting[4].image, setting[4].text, logit_scale=setting[4].logit_scale).save(other)
    command_fails(main, capsys, ["classify", "--model", name, "--posterior", str(other), "--images",
                                 str(folder / "images"), "--classes", "red", "--out", str(tmp_path / "x.jsonl"),
                                 "--seed", "3"], "fitted on another model")
    assert not (tmp_path / "x.jsonl").exists()


def test_classify_with_the_published_vit_b_32_factors(published_factor_dir, tmp_path, capsys):
    # The real published factors (SPEC 10) on a random-init ViT-B-32 of the same sizes: loaded, checked against
    # the model's projections, and every image gets finite probabilities summing to 1 with positive logit sd.
    for i, rgb in enumerate(COLOURS[:2]):
        Image.new("RGB", (64, 48), rgb).save(tmp_path / f"{i}.png")
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", "ViT-B-32", "--factors", published_factor_dir, "--images", str(tmp_path),
                 "--classes", "cat,dog,car", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    lines = read(out)
    probs, std = (torch.tensor([line[key] for line in lines]) for key in ("probabilities", "logit_std"))
    assert probs.shape == (2, 3) and bool(probs.isfinite().all()) and bool((std > 0).all())
    torch.testing.assert_close(probs.sum(1), torch.ones(2, dtype=probs.dtype), rtol=1e-6, atol=1e-6)
