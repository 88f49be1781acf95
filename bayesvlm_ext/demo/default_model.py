"""The embedded default VLM: a tiny open_clip CLIP trained by this package on its own shapes data.

No pretrained weights can be fetched where this package is tested, so the demo needs a model that
means something without them. `load_default_model()` returns an open_clip `CLIP` (a ViT image tower
on 32-pixel images, a transformer text tower over the `shapes` vocabulary) trained contrastively on
`shapes.generate(..., domain="train")` pairs, seeded. Its trained weights ship with the package
(`default_clip.safetensors`, 1.1 MB, with the settings they were trained with and their figures), so no
user waits for training; other settings (or `shipped=False`) train on first use, about 100 s on 2 CPU
cores, then load from the cache directory (`cache_directory()`), keyed by a hash of the architecture, the
training settings, the data generator's version and the torch / open_clip versions. Retraining from this
module reproduces the shipped figures (tests/test_shapes.py; `python -m bayesvlm_ext.demo.default_model`
rewrites the file). It is an ordinary open_clip model: capture, fit_factors and everything else treat it
like any other.

Training: AdamW with a linear warm-up and a cosine decay, the symmetric InfoNCE loss of CLIP with a
learnt logit scale, where pairs with identical captions in a batch count as positives of each other
(the captions repeat: there are only 360 distinct ones).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import shapes
from .._files import replacing

__all__ = ["ModelConfig", "TrainingConfig", "build_model", "train_default_model", "load_default_model",
           "cache_directory", "model_figures", "SHIPPED"]

DATA_VERSION = 1  # bump when shapes.generate draws different images for the same seed
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_clip.safetensors")
FIGURE_PAIRS, FIGURE_SEED = 2048, 7  # the held-out "test" pairs the shipped figures are measured on


@dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 32
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 64
    vision_layers: int = 3
    vision_head_width: int = 32
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 2


@dataclass(frozen=True)
class TrainingConfig:
    seed: int = 0
    pairs: int = 24576  # generated training pairs, reused every epoch
    steps: int = 1500
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100


def build_model(config: ModelConfig = ModelConfig()) -> nn.Module:
    """An untrained open_clip CLIP of the default architecture (float32, eval mode)."""
    import open_clip

    vision = open_clip.CLIPVisionCfg(layers=config.vision_layers, width=config.vision_width,
                                     head_width=config.vision_head_width, patch_size=config.patch_size,
                                     image_size=config.image_size)
    text = open_clip.CLIPTextCfg(context_length=shapes.CONTEXT_LENGTH, vocab_size=shapes.VOCAB_SIZE,
                                 width=config.text_width, heads=config.text_heads, layers=config.text_layers)
    return open_clip.CLIP(embed_dim=config.embed_dim, vision_cfg=vision, text_cfg=text).eval()


def train_default_model(
    model_config: ModelConfig = ModelConfig(),
    training: TrainingConfig = TrainingConfig(),
    progress: bool = True,
) -> tuple[nn.Module, list[float]]:  # (model in eval mode, loss per step)
    """Trains the default model from scratch: deterministic for a given config on a given machine."""
    torch.manual_seed(training.seed)
    model = build_model(model_config).train()
    data = shapes.generate(training.pairs, "train", seed=training.seed, image_size=model_config.image_size)
    images, tokens, ids = shapes.normalise_images(data.images), shapes.tokenize(data.captions), data.caption_ids
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimiser = torch.optim.AdamW([{"params": decay, "weight_decay": training.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=training.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: _learning_rate_factor(step, training))
    order = torch.Generator().manual_seed(training.seed + 1)
    losses, permutation, cursor = [], torch.randperm(len(data), generator=order), 0
    for _ in tqdm(range(training.steps), disable=not progress, desc="training the default model", unit="step"):
        if cursor + training.batch_size > len(data):
            permutation, cursor = torch.randperm(len(data), generator=order), 0
        batch = permutation[cursor:cursor + training.batch_size]
        cursor += training.batch_size
        image_features, text_features, scale = model(images[batch], tokens[batch])[:3]
        loss = contrastive_loss(image_features, text_features, scale, ids[batch])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100.0))
        losses.append(loss.item())
    return model.eval(), losses


def contrastive_loss(
    image_features: Tensor,  # [B, D] normalised
    text_features: Tensor,  # [B, D] normalised
    logit_scale: Tensor,  # s = exp(logit_scale), as open_clip's forward returns it
    caption_ids: Tensor,  # [B] equal ids = equal captions
) -> Tensor:
    """Symmetric InfoNCE; every pair with the same caption is a positive (targets spread evenly over them)."""
    logits = logit_scale * image_features @ text_features.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, targets)
                  + torch.nn.functional.cross_entropy(logits.T, targets))


def _learning_rate_factor(step: int, training: TrainingConfig) -> float:
    if step < training.warmup_steps:
        return (step + 1) / training.warmup_steps
    progress = (step - training.warmup_steps) / max(1, training.steps - training.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def cache_directory() -> str:
    """$BAYESVLM_EXT_CACHE, else $XDG_CACHE_HOME/bayesvlm_ext, else ~/.cache/bayesvlm_ext."""
    explicit = os.environ.get("BAYESVLM_EXT_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bayesvlm_ext")


def _settings(model_config: ModelConfig, training: TrainingConfig) -> dict:
    """What the trained weights depend on, the machine and library versions aside."""
    return {"model": asdict(model_config), "training": asdict(training), "data": DATA_VERSION,
            "vocabulary": list(shapes.VOCABULARY)}


def _cache_key(model_config: ModelConfig, training: TrainingConfig) -> str:
    import open_clip

    settings = _settings(model_config, training) | {"torch": torch.__version__.split("+")[0],
                                                     "open_clip": open_clip.__version__}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def model_figures(model: nn.Module, image_size: int = 32) -> dict[str, float]:
    """Zero-shot caption matching on held-out "test" pairs: each image against every distinct caption of
    the set, softmax of the model's logits. {"accuracy": top-1 accuracy, "nlpd": mean -log p(own caption)}."""
    data = shapes.generate(FIGURE_PAIRS, "test", seed=FIGURE_SEED, image_size=image_size)
    ids, first = torch.unique(data.caption_ids, return_inverse=True)
    captions = [None] * len(ids)
    for row, column in enumerate(first.tolist()):
        captions[column] = captions[column] or data.captions[row]
    with torch.no_grad():
        image = nn.functional.normalize(model.encode_image(shapes.normalise_images(data.images)), dim=1)
        text = nn.functional.normalize(model.encode_text(shapes.tokenize(captions)), dim=1)
        log_p = torch.log_softmax(model.logit_scale.exp() * image @ text.T, dim=1)
    return {"accuracy": float((log_p.argmax(1) == first).double().mean()),
            "nlpd": float(-log_p.gather(1, first[:, None]).double().mean())}


def _shipped(model_config: ModelConfig, training: TrainingConfig) -> nn.Module | None:
    """The shipped weights, when they were trained with exactly these settings (else None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not os.path.isfile(SHIPPED):
        return None
    with safe_open(SHIPPED, framework="pt") as f:
        metadata = f.metadata() or {}
    if json.loads(metadata.get("settings", "null")) != json.loads(json.dumps(_settings(model_config, training))):
        return None
    model = build_model(model_config)
    model.load_state_dict(load_file(SHIPPED))
    return model.eval()


def shipped_metadata() -> dict:
    """The shipped file's record: settings, figures, the versions and seconds it was trained with."""
    from safetensors import safe_open

    with safe_open(SHIPPED, framework="pt") as f:
        return {key: json.loads(value) for key, value in (f.metadata() or {}).items()}


def load_default_model(
    model_config: ModelConfig = ModelConfig(),
    training: TrainingConfig = TrainingConfig(),
    cache: str | os.PathLike | None = None,  # directory; default cache_directory()
    progress: bool = True,
    shipped: bool = True,  # use the weights shipped with the package when their settings are these
) -> nn.Module:  # open_clip CLIP, float32, eval mode, on the CPU
    """The default model: the shipped weights for the default settings, else from the cache when it is there,
    else trained now (and cached)."""
    from safetensors.torch import load_file, save_file

    if shipped:
        model = _shipped(model_config, training)
        if model is not None:
            return model
    folder = os.fspath(cache) if cache is not None else cache_directory()
    path = os.path.join(folder, f"default_clip-{_cache_key(model_config, training)}.safetensors")
    if os.path.exists(path):
        model = build_model(model_config)
        model.load_state_dict(load_file(path))
        return model.eval()
    start = time.perf_counter()
    model, losses = train_default_model(model_config, training, progress=progress)
    os.makedirs(folder, exist_ok=True)
    metadata = {"seconds": f"{time.perf_counter() - start:.1f}", "final_loss": f"{losses[-1]:.4f}",
                "model": json.dumps(asdict(model_config)), "training": json.dumps(asdict(training))}
    # Written aside and renamed: another process training the same model at once cannot leave a torn file.
    with replacing(path, "default model cache") as temporary:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary, metadata=metadata)
    return model


def _ship() -> None:
    """`python -m bayesvlm_ext.demo.default_model`: trains the default model and rewrites the shipped file."""
    import open_clip
    from safetensors.torch import save_file

    start = time.perf_counter()
    model, losses = train_default_model()
    seconds = time.perf_counter() - start
    figures = model_figures(model)
    metadata = {"settings": _settings(ModelConfig(), TrainingConfig()), "figures": figures,
                "torch": torch.__version__, "open_clip": open_clip.__version__, "seconds": round(seconds, 1),
                "final_loss": round(losses[-1], 4)}
    with replacing(SHIPPED, "shipped default model") as temporary:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, temporary,
                  metadata={key: json.dumps(value) for key, value in metadata.items()})
    print(f"wrote {SHIPPED}: {json.dumps(metadata)}")


if __name__ == "__main__":
    _ship()
