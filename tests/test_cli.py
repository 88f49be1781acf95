"""`bayesvlm-ext fit` end to end on a random-init open_clip model and generated image-caption pairs."""

import json
import os

import pytest
import torch

from bayesvlm_ext import KronPosterior
from bayesvlm_ext.cli import main

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")


def write_pairs(folder):
    """Six good pairs plus one of each kind of bad line."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    lines = []
    for i, (name, rgb) in enumerate(list(colours.items()) * 2):
        Image.new("RGB", (40 + 8 * i, 32), rgb).save(os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {name} square number {i}"}))
    with open(os.path.join(folder, "broken.png"), "wb") as f:
        f.write(b"not an image")
    lines += [json.dumps({"image": "broken.png", "caption": "unreadable"}),
              json.dumps({"image": "absent.png", "caption": "missing"}),
              json.dumps({"image": "0.png", "caption": "  "}),
              "{not json", json.dumps({"caption": "no image key"})]
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_fit_command_writes_loadable_posteriors_and_the_published_format(tmp_path, capsys):
    pairs = write_pairs(str(tmp_path))
    out = str(tmp_path / "out")
    torch.manual_seed(0)
    status = main(["fit", "--model", "ViT-B-32", "--pairs", pairs, "--out", out, "--batch-size", "4",
                   "--class-batch-size", "4", "--device", "cpu", "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "fitted 6 pairs" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["pairs"] == 6
    assert summary["skipped"] == {"unreadable image": 1, "missing image": 1, "empty caption": 1,
                                  "malformed line": 2}
    for tower, short in (("image", "img"), ("text", "txt")):
        posterior = KronPosterior.load(os.path.join(out, f"posterior_{tower}"))
        assert posterior.prior_precision == summary["towers"][tower]["prior_precision"] > 0
        published = KronPosterior.from_bayesvlm_dir(os.path.join(out, "bayesvlm"), short, posterior.weight)
        torch.testing.assert_close(published.A, posterior.A, rtol=1e-6, atol=1e-9)  # float32 files
        assert published.prior_precision == posterior.prior_precision


def test_fit_command_fails_when_nothing_is_left(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "absent.png", "caption": "x"}) + "\n")
    status = main(["fit", "--model", "ViT-B-32", "--pairs", str(path), "--out", str(tmp_path / "o"), "--quiet",
                   "--device", "cpu"])
    assert status == 1 and "no usable pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--model", "ViT-B-32", "--pairs", str(tmp_path / "nope.jsonl"), "--out", "o"])
