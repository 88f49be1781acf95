"""Training ProbVLM's adapters on frozen embedding pairs (SPEC.md section 9): the loss (`LossWeights`,
`adapter_loss`, `probvlm_loss`) and `train_probvlm`, seeded, resumable from a checkpoint, finite or fail.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._files import replacing
from .._validation import accumulation_dtype, check_finite_rows, check_tensor
from .ggd import GGDParams, ggd_nll_unchecked
from .model import DEFAULT_DEPTH, DEFAULT_DROPOUT, DEFAULT_HIDDEN, ProbVLM

__all__ = ["LossWeights", "TrainingHistory", "adapter_loss", "probvlm_loss", "train_probvlm"]

CHECKPOINT_VERSION = 1
DEFAULT_LR = 8e-5  # the published learning rate (SPEC.md section 9)


# ---- the loss (SPEC.md section 9) ------------------------------------------------------------------------

@dataclass(frozen=True)
class LossWeights:
    """The published weights: T1 on the L1 term, T2 on the GGD negative log-likelihood, lambda_cross on
    the cross-modal terms."""

    l1: float = 1.0
    nll: float = 1e-4
    cross: float = 1e-4

    def __post_init__(self):
        for name in ("l1", "nll", "cross"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise ValueError(f"LossWeights: '{name}' must be a finite number >= 0, got {value!r}")


def adapter_loss(
    params: GGDParams,  # one adapter's output, [N, D] each
    target: Tensor,  # [N, D]
    weights: LossWeights = LossWeights(),
) -> Tensor:  # scalar
    """T1 * mean |mu - target| + T2 * mean NLL_GGD(target): means over the N x D elements."""
    mu, alpha, beta = params
    return weights.l1 * (mu - target).abs().mean() + weights.nll * ggd_nll_unchecked(target, mu, alpha, beta).mean()


def probvlm_loss(
    model: ProbVLM,
    image: Tensor,  # [N, D] frozen image embeddings
    text: Tensor,  # [N, D] their captions' frozen text embeddings (pair i = row i)
    weights: LossWeights = LossWeights(),
) -> Tensor:  # scalar
    """Each adapter against its own modality, plus lambda_cross times each against the paired embedding
    of the other modality (the cross-modal alignment term)."""
    image_params, text_params = model.image(image), model.text(text)
    own = adapter_loss(image_params, image, weights) + adapter_loss(text_params, text, weights)
    if weights.cross == 0:
        return own
    return own + weights.cross * (adapter_loss(image_params, text, weights) + adapter_loss(text_params, image, weights))


# ---- training --------------------------------------------------------------------------------------------

@dataclass
class TrainingHistory:
    """Per completed epoch: the mean training loss over its batches and the validation loss (dropout off)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1  # 0-based epoch whose weights were kept
    stopped_early: bool = False
    seconds: float = 0.0  # training time over all calls (resumed runs included)


def train_probvlm(
    image: Tensor,  # [N, D] frozen image embeddings
    text: Tensor,  # [N, D] paired frozen text embeddings
    *,
    val_image: Tensor | None = None,  # [V, D] validation pairs; default: `val_fraction` of the pairs held out
    val_text: Tensor | None = None,  # [V, D]
    val_fraction: float = 0.1,
    hidden: int = DEFAULT_HIDDEN,
    depth: int = DEFAULT_DEPTH,
    dropout: float = DEFAULT_DROPOUT,
    weights: LossWeights = LossWeights(),
    epochs: int = 100,
    batch_size: int = 128,
    lr: float = DEFAULT_LR,
    patience: int = 10,  # epochs without a better validation loss before stopping
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,  # save after every epoch, resume from it when it exists
    progress: bool = True,
    device: torch.device | str | None = None,  # default: the embeddings' device
    adapter_config: dict | None = None,  # further ProbVLMAdapter arguments (alpha_range, beta_range)
) -> tuple[ProbVLM, TrainingHistory]:
    """Trains both adapters with Adam on `probvlm_loss` (SPEC.md section 9) and returns the weights of the
    epoch with the lowest validation loss, in eval mode, with the history.

    Deterministic for a seed on a given device: the initialisation, the validation split, every epoch's
    shuffle and dropout come from `seed` (the global RNG is restored afterwards). With `checkpoint` the
    state is saved after every epoch; a later call with the same arguments (`epochs` may grow) resumes
    and ends with the same weights as an uninterrupted run. Float64 embeddings train a float64 model;
    any other dtype trains in float32.

    Finite or fail: embeddings holding NaN or Inf are refused up front (ValueError naming the tensor and its
    rows), and a run whose loss or parameters leave the finite numbers (e.g. float32 embeddings of magnitude
    1e20, whose GGD term overflows) stops with a ValueError before that state reaches the best weights or
    the checkpoint; nothing non-finite is ever returned.
    """
    for name, t in (("image", image), ("text", text)):
        check_tensor(name, t, dim=2)
        check_finite_rows(name, t)
    if image.shape != text.shape:
        raise ValueError(f"arguments 'image' and 'text' must be paired [N, D] tensors of one shape, got "
                         f"{tuple(image.shape)} and {tuple(text.shape)}")
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"argument '{name}' must be an int >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"argument 'seed' must be an int, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"argument 'lr' must be a positive finite number, got {lr!r}")
    if not isinstance(weights, LossWeights):
        raise ValueError(f"argument 'weights' must be a LossWeights, got {type(weights).__name__}")
    if adapter_config is not None and not set(adapter_config) <= {"alpha_range", "beta_range"}:
        raise ValueError(f"argument 'adapter_config' takes alpha_range and beta_range (hidden, depth and dropout are "
                         f"arguments of their own), got {sorted(adapter_config)}")
    device = image.device if device is None else torch.device(device)
    dtype = accumulation_dtype(image.dtype)
    train_x, train_y, val_x, val_y = _split(image, text, val_image, val_text, val_fraction, seed)
    train_x, train_y, val_x, val_y = (t.to(device=device, dtype=dtype) for t in (train_x, train_y, val_x, val_y))
    settings = {"hidden": hidden, "depth": depth, "dropout": dropout, "weights": asdict(weights),
                "batch_size": batch_size, "lr": lr, "patience": patience, "seed": seed,
                "adapter_config": adapter_config or {}, "dtype": str(dtype),
                "data": _digest(train_x, train_y, val_x, val_y)}

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = ProbVLM(image.shape[1], hidden=hidden, depth=depth, dropout=dropout, **(adapter_config or {}))
        model = model.to(device=device, dtype=dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        history, best_state, bad_epochs = TrainingHistory(), None, 0
        if checkpoint is not None and os.path.exists(checkpoint):
            history, best_state, bad_epochs = _load_checkpoint(checkpoint, settings, model, optimizer)
        done = len(history.train_loss)
        bar = tqdm(total=epochs, initial=min(done, epochs), disable=not progress, unit="epoch", desc="ProbVLM")
        for epoch in range(done, epochs):
            if history.stopped_early:
                break
            start = time.perf_counter()
            train_loss = _train_epoch(model, optimizer, train_x, train_y, weights, batch_size, seed, epoch)
            val_loss = _evaluate(model, val_x, val_y, weights, batch_size)
            # Checked before the weights can become the best state or reach a checkpoint: finite or fail.
            broken = [name for name, t in model.named_parameters() if not bool(torch.isfinite(t).all())]
            if broken:
                raise _diverged(f"after epoch {epoch} the parameters {', '.join(broken[:3])} hold NaN or Inf",
                                train_x, train_y)
            if not math.isfinite(val_loss):
                raise _diverged(f"the validation loss of epoch {epoch} is {val_loss}", val_x, val_y)
            history.train_loss.append(train_loss)
            history.val_loss.append(val_loss)
            if best_state is None or val_loss < history.val_loss[history.best_epoch]:
                history.best_epoch, bad_epochs = epoch, 0
                best_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
            else:
                bad_epochs += 1
                history.stopped_early = bad_epochs >= patience
            history.seconds += time.perf_counter() - start
            if checkpoint is not None:
                _save_checkpoint(checkpoint, settings, model, optimizer, history, best_state, bad_epochs)
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=history.best_epoch)
        bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return model.eval(), history


def _split(image, text, val_image, val_text, val_fraction, seed):
    """(train image, train text, val image, val text): the given validation pairs or a seeded held-out part."""
    if (val_image is None) != (val_text is None):
        raise ValueError("arguments 'val_image' and 'val_text' must be given together")
    if val_image is not None:
        for name, t in (("val_image", val_image), ("val_text", val_text)):
            check_tensor(name, t, dim=2)
            check_finite_rows(name, t)
            if t.shape[1] != image.shape[1] or t.shape[0] == 0:
                raise ValueError(f"argument '{name}' must be [V, {image.shape[1]}] with V >= 1, got {tuple(t.shape)}")
        if val_image.shape != val_text.shape:
            raise ValueError(f"arguments 'val_image' and 'val_text' must have one shape, got "
                             f"{tuple(val_image.shape)} and {tuple(val_text.shape)}")
        if image.shape[0] == 0:
            raise ValueError("arguments 'image' and 'text' must hold at least one pair")
        return image, text, val_image, val_text
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ValueError(f"argument 'val_fraction' must be in (0, 1), got {val_fraction!r}")
    n = image.shape[0]
    held_out = max(1, round(val_fraction * n))
    if n - held_out < 1:
        raise ValueError(f"arguments 'image' and 'text' hold {n} pair(s): too few to hold out a validation part "
                         "and train on the rest (pass val_image and val_text)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(image.device)
    val, train = order[:held_out], order[held_out:]
    return image[train], text[train], image[val], text[val]


def _train_epoch(model, optimizer, image, text, weights, batch_size, seed, epoch) -> float:
    model.train()
    torch.manual_seed(seed * 1_000_003 + epoch + 1)  # this epoch's dropout, the same when resumed here
    order = torch.randperm(image.shape[0], generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    order = order.to(image.device)
    total, batches = 0.0, 0
    for b0 in range(0, image.shape[0], batch_size):
        rows = order[b0:b0 + batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = probvlm_loss(model, image[rows], text[rows], weights)
        value = loss.item()
        if not math.isfinite(value):  # before the step: a NaN gradient would poison every parameter
            raise _diverged(f"the training loss of epoch {epoch}, batch {b0 // batch_size} is {value}", image, text)
        loss.backward()
        optimizer.step()
        total, batches = total + value, batches + 1
    return total / batches


def _diverged(what: str, image: Tensor, text: Tensor) -> ValueError:
    """The error that stops a training run which left the finite numbers (no weights are returned or saved)."""
    magnitude = max(float(image.abs().max()), float(text.abs().max())) if image.numel() else 0.0
    return ValueError(f"train_probvlm: training diverged: {what} (the embeddings reach |x| = {magnitude:.3g}; the GGD "
                      "likelihood raises residuals to the power beta, which overflows for large embeddings). "
                      "Normalise the embeddings (as CLIP does, to unit norm) or train in float64")


def _evaluate(model, image, text, weights, batch_size) -> float:
    """The loss over all validation pairs with dropout off (batch losses weighted by their size)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for b0 in range(0, image.shape[0], batch_size):
            x, y = image[b0:b0 + batch_size], text[b0:b0 + batch_size]
            total += probvlm_loss(model, x, y, weights).item() * x.shape[0]
    return total / image.shape[0]


def _digest(*tensors: Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_checkpoint(path, settings, model, optimizer, history, best_state, bad_epochs) -> None:
    state = {"version": CHECKPOINT_VERSION, "settings": json.dumps(settings, sort_keys=True),
             "model": model.state_dict(), "optimizer": optimizer.state_dict(), "best_state": best_state,
             "bad_epochs": bad_epochs, "history": json.dumps(asdict(history))}
    with replacing(path, "argument 'checkpoint'") as temporary:  # a crash mid-save keeps the previous checkpoint
        torch.save(state, temporary)


def _load_checkpoint(path, settings, model, optimizer):
    state = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path}: unknown version {state.get('version')!r}")
    saved = json.loads(state["settings"])
    if saved != settings:
        differing = sorted(key for key in settings if saved.get(key) != settings[key])
        raise ValueError(f"checkpoint {path} was written by a run with other settings or data (differs in "
                         f"{', '.join(differing)}); remove it or use another path")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return TrainingHistory(**json.loads(state["history"])), state["best_state"], int(state["bad_epochs"])
