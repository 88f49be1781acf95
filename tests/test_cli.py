"""`bayesvlm-ext fit` end to end on a random-init open_clip model and generated image-caption pairs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bayesvlm_ext import KronPosterior
from bayesvlm_ext.cli import main

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")


def write_pairs(folder, unreadable=True):
    """Six good pairs plus one of each kind of bad line (the unreadable image optional)."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    lines = []
    for i, (name, rgb) in enumerate(list(colours.items()) * 2):
        Image.new("RGB", (40 + 8 * i, 32), rgb).save(os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {name} square number {i}"}))
    if unreadable:
        with open(os.path.join(folder, "broken.png"), "wb") as f:
            f.write(b"not an image")
        lines.append(json.dumps({"image": "broken.png", "caption": "unreadable"}))
    lines += [json.dumps({"image": "absent.png", "caption": "missing"}),
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


def test_fit_command_fails_when_every_image_is_unreadable(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not an image")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    status = main(["fit", "--model", "ViT-B-32", "--pairs", str(path), "--out", str(tmp_path / "o"), "--quiet",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1 and "no pairs" in err and "unreadable image" in err
    with pytest.raises(SystemExit):
        main(["fit", "--model", "ViT-B-32", "--pairs", str(path), "--out", "o", "--pseudo-count", "0"])


def run_fit(arguments, launcher=()):
    # OMP_NUM_THREADS=1 in both runs, as torchrun sets it: the model's float32 forward then rounds alike.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *launcher, "-m", "bayesvlm_ext", "fit", *arguments], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fit_command_under_torchrun_matches_one_process(tmp_path):
    # 6 readable pairs in class batches of 4 (two class batches, one per rank), loader batches of 3;
    # the malformed, missing and empty-caption lines are dropped before the data are dealt out.
    pairs = write_pairs(str(tmp_path), unreadable=False)
    common = ["--model", "ViT-B-32", "--pairs", pairs, "--batch-size", "3", "--class-batch-size", "4", "--device",
              "cpu", "--quiet", "--likelihood", "siglip", "--pseudo-count", "2"]
    run_fit([*common, "--out", str(tmp_path / "one")])
    printed = run_fit([*common, "--out", str(tmp_path / "two")],
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert "fitted 6 pairs" in printed and "2 processes" in printed
    one, two = (json.load(open(tmp_path / name / "summary.json")) for name in ("one", "two"))
    assert one["pairs"] == two["pairs"] == 6 and two["processes"] == 2
    assert one["skipped"] == two["skipped"] == {"missing image": 1, "empty caption": 1, "malformed line": 2}
    for tower in ("image", "text"):
        single = KronPosterior.load(tmp_path / "one" / f"posterior_{tower}")
        sharded = KronPosterior.load(tmp_path / "two" / f"posterior_{tower}")
        assert single.pseudo_count == sharded.pseudo_count == 2.0
        for name in ("A", "B"):
            mine, theirs = getattr(sharded, name), getattr(single, name)
            assert ((mine - theirs).norm() / theirs.norm()).item() <= 1e-14
        assert sharded.prior_precision == pytest.approx(single.prior_precision, rel=1e-9)
