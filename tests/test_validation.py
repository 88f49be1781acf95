"""Logit scales beyond what the results can hold are a ValueError naming the argument (or the command-line
option) at every entry point, never an OverflowError from math.exp or an inf variance (issue 15)."""

import math

import pytest
import torch
from testing import command_fails, spd

from bayesvlm_ext import EmbeddingDistribution, KronPosterior, ZeroShotClassifier, cosine_moments, topk
from bayesvlm_ext.curvature import FactorAccumulator
from bayesvlm_ext.cli import main

D, P = 4, 5
# 710: math.exp raises OverflowError; 45: exp is finite (3.5e19) but s^2 = 1.2e39 is not a float32.
TOO_LARGE = [710.0, 1e4, 45.0]


def towers(generator):
    return [KronPosterior(spd(P, generator), spd(D, generator), torch.randn(D, P, generator=generator,
                                                                             dtype=torch.float64))
            for _ in range(2)]


def distributions(generator, n=3, m=4):
    img, txt = towers(generator)
    return (img.embed(torch.randn(n, P, generator=generator)), txt.embed(torch.randn(m, P, generator=generator)))


@pytest.mark.parametrize("logit_scale", TOO_LARGE)
def test_api_entry_points_refuse_a_logit_scale_that_overflows(logit_scale, generator):
    img, txt = distributions(generator)
    img_post, txt_post = towers(generator)
    diag = EmbeddingDistribution.diagonal(img.mean, img.diagonal_variance())
    entry_points = {
        "cosine_moments": lambda: cosine_moments(img, txt, logit_scale),
        "cosine_moments diag": lambda: cosine_moments(diag, txt, logit_scale, variant="diag"),
        "topk": lambda: topk(img, txt, 2, "probit", logit_scale=logit_scale),
        "ZeroShotClassifier": lambda: ZeroShotClassifier(img_post, txt_post, torch.randn(3, P), logit_scale),
        "FactorAccumulator": lambda: FactorAccumulator("infonce", logit_scale),
    }
    for name, call in entry_points.items():
        with pytest.raises(ValueError, match=r"'logit_scale' \(log s\) must be at most 44") as raised:
            call()
        assert not isinstance(raised.value, OverflowError), name


def test_the_largest_logit_scale_gives_finite_float32_moments(generator):
    from bayesvlm_ext._validation import LOGIT_SCALE_MAX
    img, txt = distributions(generator)
    mean, var = cosine_moments(img, txt, LOGIT_SCALE_MAX)
    assert mean.dtype == torch.float32
    assert bool(torch.isfinite(mean).all() and torch.isfinite(var).all())
    s = math.exp(LOGIT_SCALE_MAX)
    assert math.isfinite(torch.tensor(s * s, dtype=torch.float32).item())
    # Small and negative log s are fine: s -> 0 leaves the logits at beta.
    mean, var = cosine_moments(img, txt, -800.0, logit_bias=0.25)
    assert bool((mean == 0.25).all() and (var == 0).all())


@pytest.mark.parametrize("command", ["index", "retrieve"])
def test_cli_refuses_a_logit_scale_that_overflows(command, tmp_path, capsys):
    (tmp_path / "posterior").mkdir()
    (tmp_path / "index").mkdir()
    (tmp_path / "features.safetensors").write_bytes(b"")
    if command == "index":
        argv = ["index", "--posterior", str(tmp_path / "posterior"), "--features",
                str(tmp_path / "features.safetensors"), "--tower", "image", "--out", str(tmp_path / "out")]
    else:
        argv = ["retrieve", "--index", str(tmp_path / "index"), "--posterior", str(tmp_path / "posterior"),
                "--queries", str(tmp_path / "features.safetensors"), "--out", str(tmp_path / "out.jsonl")]
    # Refused by the argument checks (exit 2) before any file is read: an OverflowError traceback before.
    command_fails(main, capsys, [*argv, "--logit-scale", "710"], "--logit-scale (log s) must be at most 44", status=2)
    command_fails(main, capsys, [*argv, "--logit-scale", "45"], "--logit-scale (log s) must be at most 44", status=2)
