"""The object API against the building blocks it composes: what `BayesVLM` costs on top of them.

A user of `bv.BayesVLM` embeds captured features (`encode_image_features`, `encode_text_features`) and
scores them (`logits`, `topk`); the same work through the functions is `KronPosterior.embed(...,
against=other)` then `cosine_moments` / `topk`. Both are timed on the same inputs in one group (the
functions are the baseline), so the report's ratio is the object's overhead; the results are checked
equal first. The model forward (`encode_image(pixels)`) is the model's cost and not timed here.
"""

from __future__ import annotations

import pytest
import torch

from bayesvlm_ext import BayesVLM, cosine_moments, topk

from .conftest import LOGIT_SCALE, SEED, shapes, towers
from .test_bench_core import group_name, run_timed


@pytest.fixture(scope="module")
def object_inputs(device):
    """(vlm, image features [N, P_img], text features [M, P_txt]) at the moments shape."""
    generator = torch.Generator().manual_seed(SEED + 5)
    shape = shapes(device)["moments"]
    image, text = (p.to(device) for p in towers(shape, generator))
    vlm = BayesVLM(image, text, logit_scale=LOGIT_SCALE)
    phi_image = torch.randn(shape["N"], shape["P_img"], generator=generator).to(device)
    phi_text = torch.randn(shape["M"], shape["P_txt"], generator=generator).to(device)
    return vlm, phi_image, phi_text


def through_object(vlm, phi_image, phi_text):
    return vlm.logits(vlm.encode_image_features(phi_image), vlm.encode_text_features(phi_text))


def through_functions(vlm, phi_image, phi_text):
    image, text = vlm.image, vlm.text
    return cosine_moments(image.embed(phi_image, against=text), text.embed(phi_text, against=image),
                          logit_scale=LOGIT_SCALE)


def topk_through_object(vlm, phi_image, phi_text, k):
    return vlm.topk(vlm.encode_text_features(phi_text[:256]), vlm.encode_image_features(phi_image), k,
                    score="probit")


def topk_through_functions(vlm, phi_image, phi_text, k):
    image, text = vlm.image, vlm.text
    return topk(text.embed(phi_text[:256], against=image), image.embed(phi_image, against=text), k, score="probit",
                logit_scale=LOGIT_SCALE)


@pytest.mark.benchmark
@pytest.mark.parametrize("path", ["object", "functions"])
def test_embed_and_score(benchmark, object_inputs, device, path):
    """Embed N image and M text feature rows and score all N x M pairs."""
    benchmark.group = "object logits, " + group_name("moments")
    vlm, phi_image, phi_text = object_inputs
    fn = through_object if path == "object" else through_functions
    if path == "object":  # the same numbers both ways, to the bit
        for mine, theirs in zip(through_object(*object_inputs), through_functions(*object_inputs)):
            assert torch.equal(mine, theirs)
    run_timed(benchmark, lambda: fn(vlm, phi_image, phi_text), device,
              "candidate" if path == "object" else "baseline", f"object_logits_{path}", "moments")


@pytest.mark.benchmark
@pytest.mark.parametrize("path", ["object", "functions"])
def test_embed_and_topk(benchmark, object_inputs, device, path):
    """Embed 256 text queries and an image gallery of N rows, then the probit top-10."""
    benchmark.group = "object top-k, " + group_name("moments")
    fn = topk_through_object if path == "object" else topk_through_functions
    if path == "object":
        for mine, theirs in zip(topk_through_object(*object_inputs, 10), topk_through_functions(*object_inputs, 10)):
            assert torch.equal(mine, theirs)
    run_timed(benchmark, lambda: fn(*object_inputs, 10), device, "candidate" if path == "object" else "baseline",
              f"object_topk_{path}", "moments")
