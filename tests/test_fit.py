"""fit_factors: streaming both towers' factors over a DataLoader equals kfac_factors on the same pairs,
and a run stopped and resumed from its checkpoint ends with the same factors as an uninterrupted one."""

import pytest
import torch
from testing import tiny_hugging_face_configs

from bayesvlm_ext import kfac_factors
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.fit import fit_factors

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def model_and_batches():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    g = torch.Generator().manual_seed(3)
    words = ["red", "blue", "disc", "square", "small", "large", "left", "right"]
    batches = []
    for b in range(3):  # 3 loader batches of 4 pairs
        images = torch.randn(4, 3, 224, 224, generator=g)
        captions = [" ".join(words[(b * 4 + i + j) % len(words)] for j in range(3)) for i in range(4)]
        batches.append((images, tokenizer(captions)))
    return model, batches


def test_streamed_factors_equal_kfac_factors_on_the_captured_pairs(model_and_batches):
    model, batches = model_and_batches
    result = fit_factors(model, batches, class_batch_size=5, progress=False)  # class batches straddle loader batches
    captured = {tower: [capture(getattr(model, f"encode_{tower}"), batch[i], find_projection(model, tower))
                        for batch in batches] for i, tower in enumerate(("image", "text"))}
    feats = {t: torch.cat([c.features for c in captured[t]]).double() for t in captured}
    embs = {t: torch.cat([c.embeddings for c in captured[t]]).double() for t in captured}
    log_scale = model.logit_scale.detach().item()
    for tower, other in (("image", "text"), ("text", "image")):
        A, B = kfac_factors(feats[tower], embs[tower], embs[other], "infonce", log_scale, class_batch_size=5)
        torch.testing.assert_close(result[tower].A, A, rtol=1e-12, atol=0)
        torch.testing.assert_close(result[tower].B, B, rtol=1e-12, atol=0)
        assert result[tower].count == 12
        assert result[tower].weight.shape == (B.shape[0], A.shape[0])


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(model_and_batches, tmp_path):
    model, batches = model_and_batches
    whole = fit_factors(model, batches, likelihood="siglip", class_batch_size=5, logit_bias=-1.0, progress=False)
    path = tmp_path / "kfac.pt"
    partial = fit_factors(model, batches, likelihood="siglip", class_batch_size=5, logit_bias=-1.0, checkpoint=path,
                          checkpoint_every=1, max_batches=2, progress=False)
    assert partial == {} and path.exists()  # stopped: nothing final yet, everything in the checkpoint
    resumed = fit_factors(model, batches, likelihood="siglip", class_batch_size=5, logit_bias=-1.0,
                          checkpoint=path, progress=False)
    for tower in ("image", "text"):
        assert torch.equal(resumed[tower].A, whole[tower].A) and torch.equal(resumed[tower].B, whole[tower].B)
    with pytest.raises(ValueError, match="another likelihood"):
        fit_factors(model, batches, likelihood="infonce", class_batch_size=5, checkpoint=path, progress=False)


def test_fit_errors(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ValueError, match="'class_batch_size'"):
        fit_factors(model, batches, class_batch_size=0, progress=False)
    with pytest.raises(ValueError, match="'sites'"):
        fit_factors(model, batches, sites={"image": find_projection(model, "image")}, progress=False)


def test_fit_factors_on_a_hugging_face_siglip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision, text = tiny_hugging_face_configs()
    model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randn(5, 3, 30, 30, generator=g), torch.randint(2, 99, (5, 16), generator=g)) for _ in range(2)]
    result = fit_factors(model, batches, likelihood="siglip", class_batch_size=4, progress=False)
    # The image tower's layer is the head's fc2 with its bias: A has the bias row and column.
    assert result["image"].A.shape == (38, 38) and result["image"].bias is not None
    assert result["text"].A.shape == (33, 33) and result["image"].count == 10
    for tower in ("image", "text"):
        eigenvalues = torch.linalg.eigvalsh(result[tower].B)
        assert eigenvalues.min() >= -1e-10 * eigenvalues.max() and eigenvalues.max() > 0
