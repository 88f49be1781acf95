"""capture: the features entering a tower's projection reproduce the model's own embeddings, and the
model is left exactly as it was."""

import pytest
import torch
from testing import tiny_hugging_face_configs
from torch import nn

from bayesvlm_ext import capture
from bayesvlm_ext.capture import ProjectionSite, find_projection

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def clip_model():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)  # random init: no download
    return model.eval()


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_open_clip_features_reproduce_the_embeddings(clip_model):
    pixels = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red disc", "a checkerboard"])
    before, hook_count = state_snapshot(clip_model), hooks(clip_model)
    for tower, encode, inputs in (("image", clip_model.encode_image, pixels), ("text", clip_model.encode_text, tokens)):
        site = find_projection(clip_model, tower)
        captured = capture.capture(encode, inputs, site)
        weight, bias = site.layer()
        assert bias is None and captured.features.shape == (len(inputs), weight.shape[1])
        with torch.no_grad():
            expected = encode(inputs)
        torch.testing.assert_close(captured.embeddings, expected, rtol=0, atol=0)
        torch.testing.assert_close(captured.features @ weight.T, expected, rtol=1e-5, atol=1e-6)
    after = state_snapshot(clip_model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert hooks(clip_model) == hook_count and not clip_model.training
    assert isinstance(clip_model.visual.proj, nn.Parameter)


class TinyTower(nn.Module):
    """A user's own tower: a trunk, then a named nn.Linear projection with bias."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.GELU())
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        return self.head(self.trunk(x))


def test_named_linear_projection_with_bias():
    torch.manual_seed(2)
    tower = TinyTower().train()
    x = torch.randn(6, 5)
    captured = capture.capture(tower, x, ProjectionSite(tower, "head"))
    weight, bias = ProjectionSite(tower, "head").layer()
    torch.testing.assert_close(captured.features @ weight.T + bias, captured.embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(captured.embeddings, tower(x).detach(), rtol=0, atol=0)
    assert tower.training and hooks(tower) == 0


def test_model_restored_when_the_forward_raises(clip_model):
    site = find_projection(clip_model, "image")
    proj = clip_model.visual.proj
    with pytest.raises(RuntimeError):
        capture.capture(clip_model.encode_image, torch.randn(2, 3, 17, 5), site)  # wrong image size
    assert clip_model.visual.proj is proj
    tower = TinyTower()
    with pytest.raises(RuntimeError):
        capture.capture(tower, torch.randn(2, 4), ProjectionSite(tower, "head"))  # wrong width
    assert hooks(tower) == 0


def test_capture_errors_name_what_is_missing():
    tower = TinyTower()
    with pytest.raises(ValueError, match="not an nn.Linear"):
        capture.capture(tower, torch.randn(2, 5), ProjectionSite(tower, "trunk"))
    with pytest.raises(ValueError, match="visual.proj"):
        find_projection(tower, "image")
    with pytest.raises(ValueError, match="'tower'"):
        find_projection(tower, "audio")


def test_siglip_image_tower_residual_and_text_linear():
    # SigLIP: the image tower's last linear map is the attention pool's mlp.fc2 (with bias) inside a
    # residual, g = z + fc2(h); the text tower ends in an nn.Linear with bias (SPEC.md section 1).
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16-SigLIP", pretrained=None).eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    # Its tokenizer needs the Hugging Face tokenizers package; random token ids serve a random-init model.
    vocab, length = model.text.token_embedding.num_embeddings, model.text.context_length
    tokens = torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(5))
    hook_count = hooks(model)
    site = find_projection(model, "image")
    captured = capture.capture(model.encode_image, pixels, site)
    weight, bias = site.layer()
    assert bias is not None and captured.residual is not None and captured.residual.shape == captured.embeddings.shape
    with torch.no_grad():
        expected = model.encode_image(pixels)
    torch.testing.assert_close(captured.embeddings, expected, rtol=0, atol=0)
    # The residual is z itself (recorded where the pool first reads it), not the difference: the identity
    # g = h W^T + b + z is a real check of the structure.
    torch.testing.assert_close(captured.features @ weight.T + bias + captured.residual, expected, rtol=1e-5,
                               atol=1e-5)
    text_site = find_projection(model, "text")
    text = capture.capture(model.encode_text, tokens, text_site)
    w_txt, b_txt = text_site.layer()
    assert b_txt is not None and text.residual is None
    torch.testing.assert_close(text.features @ w_txt.T + b_txt, text.embeddings, rtol=1e-5, atol=1e-5)
    assert hooks(model) == hook_count


def test_convnext_image_tower_through_its_timm_head():
    # open_clip's ConvNeXt CLIP: a timm trunk, then head = [dropout, proj]; proj is an nn.Linear.
    torch.manual_seed(0)
    model = open_clip.create_model("convnext_tiny", pretrained=None).eval()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    before = state_snapshot(model)
    site = find_projection(model, "image")
    assert site.module is model.visual.head and site.name == "proj"
    captured = capture.capture(model.encode_image, pixels, site)
    weight, bias = site.layer()
    with torch.no_grad():
        expected = model.encode_image(pixels)
    torch.testing.assert_close(captured.embeddings, expected, rtol=0, atol=0)
    torch.testing.assert_close(captured.features @ weight.T + (0 if bias is None else bias), expected, rtol=1e-5,
                               atol=1e-5)
    assert captured.residual is None and hooks(model) == 0
    after = state_snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_coca_towers_with_the_unnormalised_encoders():
    from bayesvlm_ext.fit import unnormalised_encoder

    torch.manual_seed(0)
    model = open_clip.create_model("coca_ViT-B-32", pretrained=None).eval()
    inputs = {"image": torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(6)),
              "text": open_clip.get_tokenizer("coca_ViT-B-32")(["a red disc", "a checkerboard"])}
    for tower, x in inputs.items():
        encode = unnormalised_encoder(model, tower)  # CoCa normalises unless told not to
        site = find_projection(model, tower)
        captured = capture.capture(encode, x, site)
        weight, bias = site.layer()
        with torch.no_grad():
            expected = encode(x)
        assert not torch.allclose(expected.norm(dim=1), torch.ones(2))  # really unnormalised
        torch.testing.assert_close(captured.embeddings, expected, rtol=0, atol=0)
        torch.testing.assert_close(captured.features @ weight.T, expected, rtol=1e-5, atol=1e-6)


def test_hugging_face_clip_and_siglip():
    transformers = pytest.importorskip("transformers")
    from bayesvlm_ext.fit import unnormalised_encoder

    torch.manual_seed(0)
    vision, text = tiny_hugging_face_configs()
    models = {
        "clip": transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                               projection_dim=16)).eval(),
        "siglip": transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval(),
    }
    inputs = {"image": torch.randn(3, 3, 30, 30, generator=torch.Generator().manual_seed(7)),
              "text": torch.randint(2, 99, (3, 16), generator=torch.Generator().manual_seed(8))}
    for name, model in models.items():
        for tower, x in inputs.items():
            encode = unnormalised_encoder(model, tower)
            site = find_projection(model, tower)
            captured = capture.capture(encode, x, site)
            weight, bias = site.layer()
            with torch.no_grad():
                expected = encode(x)
            torch.testing.assert_close(captured.embeddings, expected, rtol=0, atol=0)
            rebuilt = captured.features @ weight.T + (0 if bias is None else bias)
            if captured.residual is not None:
                rebuilt = rebuilt + captured.residual
            torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-5)
            assert (captured.residual is not None) == (name == "siglip" and tower == "image")
            assert (bias is not None) == (name == "siglip")
