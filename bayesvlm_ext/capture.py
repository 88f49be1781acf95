"""The features entering a tower's last linear map, and the embeddings leaving it (SPEC.md section 1).

A `ProjectionSite` names the Bayesian layer: an attribute of a module holding either an nn.Linear
or a Parameter [P, D] applied as `x @ P` (open_clip's `visual.proj` and `text_projection`).
`capture` runs the tower once and returns features [N, P] and embeddings [N, D]:
- nn.Linear: a forward hook records the layer's input; the embeddings are the tower's output.
- Parameter: there is no module to hook, so the attribute is set to None for the call (open_clip
  towers skip a None projection and return the features), and the embeddings are features @ P.
- A residual (SigLIP's image tower, `g = z + fc2(h)` inside the attention pool): a second hook
  records the input of `residual_from`, the module that first reads z (the pool's `norm`).
The model is left exactly as it was (attributes, hooks, training mode), also when the forward raises.
Found automatically (`find_projection`): open_clip `CLIP` (ViT image tower `visual.proj`; timm towers such
as ConvNeXt: `visual.head.proj`, or the last layer `visual.head.mlp.fc2`), `CoCa`, `CustomTextCLIP`
(SigLIP: timm image tower with an attention pool, text `text_projection`); anything else by naming
the projection. Pass an encoder that returns unnormalised embeddings (CoCa's `encode_image`
normalises by default: use `normalize=False`; `fit.unnormalised_encoder` does this). Hugging Face
`CLIPModel` (visual_projection, text_projection) and `SiglipModel` (the vision head's mlp.fc2 inside
its residual, text_model.head) are recognised by their attribute names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["ProjectionSite", "Captured", "find_projection", "capture"]


@dataclass(frozen=True)
class ProjectionSite:
    """`getattr(module, name)` is the tower's last linear map: an nn.Linear or a Parameter [P, D].
    `residual_from`: a module whose first input is the fixed residual r added to the map's output."""

    module: nn.Module
    name: str
    residual_from: nn.Module | None = None

    @property
    def projection(self) -> nn.Linear | Tensor:
        projection = getattr(self.module, self.name, None)
        if isinstance(projection, nn.Linear) or (isinstance(projection, Tensor) and projection.dim() == 2):
            return projection
        raise ValueError(f"{type(self.module).__name__}.{self.name} is {type(projection).__name__}, not an "
                         "nn.Linear or a 2-D Parameter applied as x @ P")

    def layer(self) -> tuple[Tensor, Tensor | None]:  # weight [D, P], bias [D] or None
        """The layer in the nn.Linear convention (a Parameter [P, D] is returned transposed), detached."""
        projection = self.projection
        if isinstance(projection, nn.Linear):
            return projection.weight.detach(), None if projection.bias is None else projection.bias.detach()
        return projection.detach().T, None


@dataclass
class Captured:
    features: Tensor  # [N, P] the input of the projection
    embeddings: Tensor  # [N, D] the tower's unnormalised output
    residual: Tensor | None = None  # [N, D] the fixed residual r (embeddings = features W^T + b + r)


def find_projection(
    model: nn.Module,
    tower: str,  # "image" or "text"
) -> ProjectionSite:
    """The projection site of a model's tower (see the module docstring for the families recognised).
    Raises ValueError naming what is missing."""
    hf = _hugging_face_site(model, tower)
    if hf is not None:
        return hf
    if tower == "image":
        visual = getattr(model, "visual", None)
        if visual is not None and getattr(visual, "proj", None) is not None:
            return ProjectionSite(visual, "proj")
        head = getattr(visual, "head", None)  # open_clip TimmModel (ConvNeXt): head = [drop, proj] or [drop, mlp]
        if isinstance(getattr(head, "proj", None), nn.Linear):
            return ProjectionSite(head, "proj")
        if isinstance(getattr(getattr(head, "mlp", None), "fc2", None), nn.Linear):
            return ProjectionSite(head.mlp, "fc2")
        pool = getattr(getattr(visual, "trunk", None), "attn_pool", None)  # open_clip TimmModel (SigLIP)
        if pool is not None and getattr(pool, "mlp", None) is not None and hasattr(pool.mlp, "fc2"):
            if getattr(pool, "latent_len", 1) != 1 or _has_layers(getattr(visual, "head", None)):
                raise ValueError(f"{type(model).__name__}: the attention pool has {pool.latent_len} latents or a "
                                 "head follows it; name the projection with ProjectionSite(module, name)")
            return ProjectionSite(pool.mlp, "fc2", residual_from=pool.norm)
        raise ValueError(f"{type(model).__name__}: no `visual.proj` projection found; name the image projection "
                         "with ProjectionSite(module, name)")
    if tower == "text":
        for holder in (model, getattr(model, "text", None)):
            if holder is not None and getattr(holder, "text_projection", None) is not None:
                return ProjectionSite(holder, "text_projection")
        raise ValueError(f"{type(model).__name__}: no `text_projection` found; name the text projection with "
                         "ProjectionSite(module, name)")
    raise ValueError(f"argument 'tower' must be 'image' or 'text', got {tower!r}")


@torch.no_grad()
def capture(
    encode: Callable[[Tensor], Tensor],  # the tower's forward, e.g. model.encode_image
    inputs: Tensor,  # what `encode` takes: [N, 3, H, W] pixels or [N, L] tokens
    site: ProjectionSite,
) -> Captured:
    """Runs `encode(inputs)` once and returns the projection's input and the tower's embeddings."""
    projection = site.projection  # validates the site before touching the model
    if isinstance(projection, nn.Linear):
        recorded: dict[str, list[Tensor]] = {"features": [], "residual": []}
        handles = [projection.register_forward_hook(
            lambda module, args, output: recorded["features"].append(args[0].detach()))]
        if site.residual_from is not None:
            handles.append(site.residual_from.register_forward_hook(
                lambda module, args, output: recorded["residual"].append(args[0].detach())))
        try:
            embeddings = encode(inputs)
        finally:
            for handle in handles:
                handle.remove()
        expected_calls = {"features": 1, "residual": 1 if site.residual_from is not None else 0}
        for what, tensors in recorded.items():
            if len(tensors) != expected_calls[what]:
                raise ValueError(f"{type(site.module).__name__}.{site.name}: the {what} hook ran {len(tensors)} "
                                 f"times in one forward; expected {expected_calls[what]}")
        features = recorded["features"][0].reshape(-1, recorded["features"][0].shape[-1])
        residual = recorded["residual"][0].reshape(embeddings.shape) if recorded["residual"] else None
        return Captured(features, embeddings, residual)
    with _attribute_removed(site.module, site.name):
        features = encode(inputs)
    return Captured(features, features @ projection)


def _hugging_face_site(model: nn.Module, tower: str) -> ProjectionSite | None:
    """Hugging Face CLIPModel (visual_projection / text_projection) and SiglipModel (vision head's
    mlp.fc2 inside its residual; text_model.head), recognised by their attribute names."""
    if tower not in ("image", "text"):
        return None
    if isinstance(getattr(model, "visual_projection", None), nn.Linear):  # CLIPModel
        return ProjectionSite(model, "visual_projection" if tower == "image" else "text_projection")
    vision, text = getattr(model, "vision_model", None), getattr(model, "text_model", None)
    head = getattr(vision, "head", None)
    if tower == "image" and head is not None and hasattr(getattr(head, "mlp", None), "fc2"):  # SiglipModel
        return ProjectionSite(head.mlp, "fc2", residual_from=head.layernorm)
    if tower == "text" and head is not None and isinstance(getattr(text, "head", None), nn.Linear):
        return ProjectionSite(text, "head")
    return None


def _has_layers(module: nn.Module | None) -> bool:
    """True when `module` does something (an empty nn.Sequential or nn.Identity does not)."""
    return module is not None and not isinstance(module, nn.Identity) and any(True for _ in module.parameters())


@contextlib.contextmanager
def _attribute_removed(module: nn.Module, name: str):
    """`module.<name>` is None inside; always restored (the same object) on the way out."""
    saved = getattr(module, name)
    setattr(module, name, None)
    try:
        yield saved
    finally:
        setattr(module, name, saved)
