"""Streaming the KFAC factors of both towers over a DataLoader of image-caption pairs (SPEC.md section 6).

`fit_factors(model, loader)` captures, per loader batch, the features entering each tower's projection
and both towers' embeddings, groups consecutive pairs into class batches of C, and adds each class
batch to one `FactorAccumulator` per tower (image tower: sources = image embeddings, targets = text
embeddings; text tower the other way round). Pairs are grouped exactly as `kfac_factors` would group
the concatenated tensors, so both give the same sums. With `checkpoint=PATH` the sums, the pairs
waiting for a full class batch and the number of loader batches consumed are saved every
`checkpoint_every` batches; a later call with the same path resumes and ends with the same factors as
an uninterrupted run (the loader must yield the same batches in the same order). The checkpoint records
what it was made from: the likelihood, class batch size, logit scale and bias, a digest of both
projections' weights, the loader's length and the caller's `fingerprint` (e.g. a digest of the data
file, the model's name and settings, the batch size); a checkpoint that differs in any of them is
refused with a ValueError naming what differs, and so is a damaged one.

Distributed (under `torchrun`, any backend): each rank passes a loader over its own share of the
class batches, built with `ClassBatchSampler` (class batches r, r + K, ... of K ranks, loader batches
that never straddle a class batch); the sums are all-reduced at the end and every rank returns the
single-process factors, up to float64 summation order. Checkpoints are then per rank.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import os
from typing import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .capture import ProjectionSite, capture, find_projection
from .curvature import DEFAULT_CLASS_BATCH_SIZE, FactorAccumulator, Likelihood
from .distributed import all_ranks, distributed_rank

__all__ = ["TowerFactors", "ClassBatchSampler", "fit_factors", "weights_digest", "model_logit_params",
           "unnormalised_encoder"]

TOWERS = ("image", "text")
CHECKPOINT_VERSION = 2  # 2: records its inputs (version 1 did not, so it cannot be checked)


@dataclass
class TowerFactors:
    """One tower's factors and what produced them."""

    A: Tensor  # [P, P] ([P+1, P+1] with a bias), float64
    B: Tensor  # [D, D] float64
    weight: Tensor  # [D, P] the MAP projection (nn.Linear convention)
    bias: Tensor | None  # [D]
    count: int  # pairs seen


@dataclass
class _Pending:
    """Pairs captured but not yet part of a full class batch, per tower: features, embeddings."""

    parts: dict[str, list[Tensor]] = field(default_factory=lambda: {name: [] for name in _PART_NAMES})

    def __len__(self) -> int:
        return sum(t.shape[0] for t in self.parts["image_features"])

    def add(self, **tensors: Tensor) -> None:
        for name, t in tensors.items():
            self.parts[name].append(t)

    def take(self, rows: int | None = None) -> dict[str, Tensor]:
        """The first `rows` pending pairs (all when None), removed from the buffer."""
        merged = {name: torch.cat(ts) for name, ts in self.parts.items()}
        rows = len(self) if rows is None else rows
        self.parts = {name: [t[rows:]] for name, t in merged.items()}
        return {name: t[:rows] for name, t in merged.items()}


_PART_NAMES = ("image_features", "image_embeddings", "text_features", "text_embeddings")


class ClassBatchSampler(torch.utils.data.Sampler):
    """A DataLoader batch sampler over pairs 0..num_pairs-1 that keeps class batches whole.

    Class batch k holds the pairs [k C, (k + 1) C). This rank's loader batches cover the class
    batches rank, rank + K, rank + 2K, ... (K = world_size), in order, in loader batches of at most
    `batch_size` pairs that never straddle a class batch. With one rank it yields every pair in
    order. Use: `DataLoader(dataset, batch_sampler=ClassBatchSampler(len(dataset), C, 64))`.
    rank and world_size default to torch.distributed's when it is initialised, else 0 and 1.
    """

    def __init__(self, num_pairs: int, class_batch_size: int, batch_size: int, rank: int | None = None,
                 world_size: int | None = None):
        for name, value, low in (("num_pairs", num_pairs, 0), ("class_batch_size", class_batch_size, 1),
                                 ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"argument '{name}' must be an int >= {low}, got {value!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("arguments 'rank' and 'world_size' must be given together")
        if rank is None:
            rank, world_size = distributed_rank(None, None)
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"arguments 'rank' and 'world_size' must satisfy 0 <= rank < world_size, got "
                             f"{rank!r} and {world_size!r}")
        self.num_pairs, self.class_batch_size, self.batch_size = num_pairs, class_batch_size, batch_size
        self.rank, self.world_size = rank, world_size

    def _class_batches(self) -> range:
        return range(self.rank, math.ceil(self.num_pairs / self.class_batch_size), self.world_size)

    def __iter__(self):
        for k in self._class_batches():
            start, stop = k * self.class_batch_size, min((k + 1) * self.class_batch_size, self.num_pairs)
            for first in range(start, stop, self.batch_size):
                yield list(range(first, min(first + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(math.ceil((min((k + 1) * self.class_batch_size, self.num_pairs) - k * self.class_batch_size)
                             / self.batch_size) for k in self._class_batches())


def fit_factors(
    model: nn.Module,
    loader,  # iterable of (images [B, 3, H, W], tokens [B, L]) batches, pair i = (image i, caption i)
    likelihood: str | Likelihood = "infonce",
    class_batch_size: int = DEFAULT_CLASS_BATCH_SIZE,
    logit_scale: float | None = None,  # log s; default: the model's `logit_scale`
    logit_bias: float | None = None,  # default: the model's `logit_bias`, or 0
    sites: dict[str, ProjectionSite] | None = None,  # default: find_projection(model, tower)
    device: torch.device | str | None = None,  # where the batches go; default: the model's device
    checkpoint: str | os.PathLike | None = None,  # save / resume file
    checkpoint_every: int = 100,  # loader batches between checkpoints
    fingerprint: dict | None = None,  # JSON-able identity of the inputs, checked on resume (see below)
    max_batches: int | None = None,  # stop after this many loader batches in total (for resumable runs)
    progress: bool = True,
    distributed: bool | None = None,  # None: whenever torch.distributed is initialised with several ranks
    group=None,  # the torch.distributed process group (default: the world)
) -> dict[str, TowerFactors]:  # {"image": ..., "text": ...}
    """Both towers' KFAC factors from a stream of image-caption pairs (SPEC.md section 6).

    Runs the model under torch.no_grad in its current mode (call model.eval() first for the usual
    setting). The last, possibly smaller, class batch is added when the loader is exhausted; a run
    stopped by `max_batches` keeps its pending pairs in the checkpoint instead and returns {}.
    Distributed: `loader` is this rank's share (see `ClassBatchSampler` and the module docstring);
    `count` and the factors are global.

    Resuming from `checkpoint` needs the same inputs: the checkpoint stores this run's settings (likelihood,
    class_batch_size, logit scale and bias, a digest of both projections' weights and biases, the loader's
    length when it has one) and `fingerprint`, a JSON-serialisable dict the caller fills with what this
    function cannot see: the data (e.g. {"pairs_sha256": ...}), the model's name and weights
    (`weights_digest(model)`), the loader's batch size. A checkpoint written with any other value, or
    damaged, raises ValueError naming the file and what differs.
    """
    if isinstance(class_batch_size, bool) or not isinstance(class_batch_size, int) or class_batch_size < 1:
        raise ValueError(f"argument 'class_batch_size' must be a positive int, got {class_batch_size!r}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"argument 'checkpoint_every' must be a positive int, got {checkpoint_every!r}")
    if fingerprint is not None:
        _check_fingerprint(fingerprint)
    sites = sites or {tower: find_projection(model, tower) for tower in TOWERS}
    if set(sites) != set(TOWERS):
        raise ValueError(f"argument 'sites' must name both towers {TOWERS}, got {sorted(sites)}")
    layers = {tower: sites[tower].layer() for tower in TOWERS}
    log_scale = float(logit_scale) if logit_scale is not None else _model_scalar(model, "logit_scale")
    bias = float(logit_bias) if logit_bias is not None else _model_scalar(model, "logit_bias", 0.0)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, world = distributed_rank(distributed, group)
    if world > 1:
        _check_sharded(loader, class_batch_size, rank, world)
        if checkpoint is not None:
            checkpoint = f"{os.fspath(checkpoint)}.rank{rank}-of-{world}"
    encoders = {tower: unnormalised_encoder(model, tower) for tower in TOWERS}
    accumulators = {tower: FactorAccumulator(likelihood, log_scale, bias, bias=layers[tower][1] is not None)
                    for tower in TOWERS}
    pending, done, inputs = _Pending(), 0, None
    if checkpoint is not None:
        inputs = {"settings": {"likelihood": accumulators["image"].likelihood.value,
                               "class_batch_size": class_batch_size, "logit_scale": log_scale, "logit_bias": bias,
                               "projections": weights_digest([t for tower in TOWERS for t in layers[tower]]),
                               "loader_batches": _length(loader, None)},
                  "fingerprint": fingerprint or {}}
        inputs = json.loads(json.dumps(inputs))  # compared with the saved record as JSON reads it back (tuples: lists)
        refusal = None
        if os.path.exists(checkpoint):
            try:
                done = _load_checkpoint(checkpoint, inputs, accumulators, pending)
            except ValueError as error:
                refusal = error
        # Every rank must refuse together: one that went on alone would wait forever in the reductions.
        if world > 1 and not all_ranks(refusal is None, group) and refusal is None:
            refusal = ValueError(f"checkpoint {checkpoint}: another rank refused its checkpoint (see its error)")
        if refusal is not None:
            raise refusal

    bar = tqdm(total=_length(loader, max_batches), initial=done, disable=not progress or rank != 0, unit="batch",
               desc="KFAC factors" if world == 1 else f"KFAC factors (rank 0 of {world})")
    exhausted = True
    for index, batch in enumerate(loader):
        if index < done:  # already in the checkpoint
            continue
        if max_batches is not None and index >= max_batches:
            exhausted = False
            break
        images, tokens = batch[0].to(device), batch[1].to(device)
        captured = {"image": capture(encoders["image"], images, sites["image"]),
                    "text": capture(encoders["text"], tokens, sites["text"])}
        pending.add(**{f"{tower}_{kind}": getattr(captured[tower], kind).detach().to("cpu", torch.float64)
                       for tower in TOWERS for kind in ("features", "embeddings")})
        while len(pending) >= class_batch_size:
            _add_class_batch(accumulators, pending.take(class_batch_size))
        done = index + 1
        bar.update(1)
        bar.set_postfix({"pairs" if world == 1 else "pairs on rank 0": accumulators["image"].count + len(pending)})
        if checkpoint is not None and done % checkpoint_every == 0:
            _save_checkpoint(checkpoint, inputs, accumulators, pending, done)
    bar.close()
    if world > 1:  # a rank stopped by max_batches keeps every rank from reducing
        exhausted = all_ranks(exhausted, group)
    if exhausted and len(pending):
        _add_class_batch(accumulators, pending.take())
    if checkpoint is not None:
        _save_checkpoint(checkpoint, inputs, accumulators, pending, done)
    if not exhausted:
        return {}
    if world > 1:
        for tower in TOWERS:
            accumulators[tower].all_reduce(group)
    if accumulators["image"].count == 0:
        raise ValueError("argument 'loader' yielded no pairs: there is nothing to fit")
    result = {}
    for tower in TOWERS:
        A, B = accumulators[tower].factors()
        weight, layer_bias = layers[tower]
        result[tower] = TowerFactors(A, B, weight.double().cpu(), None if layer_bias is None else
                                     layer_bias.double().cpu(), accumulators[tower].count)
    return result


def unnormalised_encoder(model: nn.Module, tower: str) -> Callable[[Tensor], Tensor]:
    """The tower's forward returning the unnormalised embedding g [N, D] (SPEC.md section 6 needs ||g||).

    open_clip: encode_image / encode_text with normalize=False (CoCa normalises by default). Hugging
    Face: get_image_features(pixel_values=) / get_text_features(input_ids=), whose result may be a
    model output holding the embedding in `pooler_output`.
    """
    encode = getattr(model, f"encode_{tower}", None)
    if encode is not None:
        if "normalize" in inspect.signature(encode).parameters:
            return functools.partial(encode, normalize=False)
        return encode
    features = getattr(model, f"get_{tower}_features", None)
    if features is None:
        raise ValueError(f"{type(model).__name__} has neither encode_{tower} nor get_{tower}_features")
    keyword = "pixel_values" if tower == "image" else "input_ids"

    def encode_hf(inputs: Tensor) -> Tensor:
        output = features(**{keyword: inputs})
        return output if isinstance(output, Tensor) else output.pooler_output

    return encode_hf


def _check_sharded(loader, class_batch_size: int, rank: int, world: int) -> None:
    """Under torch.distributed a DataLoader must deal out the data: one whole copy per rank would be
    counted K times, and shards cut across class batches would not reproduce the single-process run."""
    if not isinstance(loader, torch.utils.data.DataLoader):
        return  # any other iterable: the caller's own sharding, as documented
    sampler = loader.batch_sampler
    if isinstance(sampler, ClassBatchSampler):
        if (sampler.class_batch_size, sampler.rank, sampler.world_size) != (class_batch_size, rank, world):
            raise ValueError(f"argument 'loader': its ClassBatchSampler has class_batch_size "
                             f"{sampler.class_batch_size}, rank {sampler.rank} of {sampler.world_size}; this run "
                             f"has class_batch_size {class_batch_size}, rank {rank} of {world}")
        return
    raise ValueError(f"argument 'loader': under torch.distributed ({world} ranks) each rank must load its own "
                     "share of the class batches: DataLoader(dataset, batch_sampler=ClassBatchSampler(len(dataset), "
                     "class_batch_size, batch_size))")


def _add_class_batch(accumulators: dict[str, FactorAccumulator], pairs: dict[str, Tensor]) -> None:
    accumulators["image"].update(pairs["image_features"], pairs["image_embeddings"], pairs["text_embeddings"])
    accumulators["text"].update(pairs["text_features"], pairs["text_embeddings"], pairs["image_embeddings"])


def model_logit_params(model: nn.Module) -> tuple[float, float]:
    """(log s, beta) as the model stores them: `logit_scale` (open_clip and Hugging Face keep log s) and
    `logit_bias` (SigLIP; 0 for a model without one). ValueError when the model has no `logit_scale`."""
    return _model_scalar(model, "logit_scale"), _model_scalar(model, "logit_bias", 0.0)


def _model_scalar(model: nn.Module, name: str, default: float | None = None) -> float:
    value = getattr(model, name, None)
    if value is None:
        if default is None:
            raise ValueError(f"{type(model).__name__} has no `{name}`: pass argument '{name}'")
        return default
    return float(value.detach().reshape(()).item()) if isinstance(value, Tensor) else float(value)


def _length(loader, max_batches: int | None) -> int | None:
    try:
        total = len(loader)
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def weights_digest(source: nn.Module | list[Tensor | None]) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes, bytes) or of a list of tensors (None allowed):
    the identity of the weights a fit ran with, for `fit_factors(fingerprint=...)`. Reads every byte once."""
    digest = hashlib.sha256()
    items = source.state_dict().items() if isinstance(source, nn.Module) else enumerate(source)
    for name, t in items:
        digest.update(f"{name}:{None if t is None else (str(t.dtype), tuple(t.shape))};".encode())
        if t is not None and t.numel():
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _check_fingerprint(fingerprint) -> None:
    """A fingerprint is compared after a JSON round trip, so it must survive one unchanged (no NaN: NaN != NaN)."""
    try:
        if not isinstance(fingerprint, dict) or not all(isinstance(key, str) for key in fingerprint):
            raise TypeError
        json.dumps(fingerprint, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError("argument 'fingerprint' must be a dict with str keys and JSON-serialisable, finite values, "
                         f"got {fingerprint!r:.200}") from None


def _save_checkpoint(path, inputs: dict, accumulators, pending: _Pending, done: int) -> None:
    from ._files import replacing

    state = {"version": CHECKPOINT_VERSION, "inputs": json.dumps(inputs, sort_keys=True), "batches_done": done,
             "pending": {name: torch.cat(ts) if ts else None for name, ts in pending.parts.items()}}
    for tower, acc in accumulators.items():
        state[tower] = {"A_sum": acc.A_sum, "B_sum": acc.B_sum, "count": acc.count}
    with replacing(path, "argument 'checkpoint'") as temporary:  # a crash mid-save keeps the previous checkpoint
        torch.save(state, temporary)


def _load_checkpoint(path, inputs: dict, accumulators, pending: _Pending) -> int:
    """Restores the sums, the pending pairs and the batch count saved in `path`; ValueError naming the file when
    it is damaged or was made from other inputs than `inputs` (the settings and fingerprint of this run)."""
    advice = "remove it (or use another path) to start afresh"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise RuntimeError, EOFError, UnpicklingError, ...
        raise ValueError(f"checkpoint {path}: cannot be read, damaged or not a fit_factors checkpoint "
                         f"({type(error).__name__}: {error}); {advice}") from None
    version = state.get("version") if isinstance(state, dict) else None
    if version == 1:
        raise ValueError(f"checkpoint {path} was written by an older bayesvlm_ext that did not record its inputs, "
                         f"so resuming could mix data; {advice}")
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path}: not a fit_factors checkpoint of version {CHECKPOINT_VERSION} (version "
                         f"{version!r}); {advice}")
    try:
        saved = json.loads(state["inputs"])
        differing = [f"{key} ({_shown(saved[part].get(key))} in the checkpoint, {_shown(inputs[part].get(key))} in "
                     f"this run)" for part in ("settings", "fingerprint")
                     for key in sorted(set(saved[part]) | set(inputs[part]))
                     if saved[part].get(key) != inputs[part].get(key)]
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ValueError(f"checkpoint {path}: damaged (no readable record of its inputs); {advice}") from None
    if differing:
        raise ValueError(f"checkpoint {path} was made from other inputs or settings than this run: differs in "
                         f"{'; '.join(differing)}; {advice}")
    try:
        for tower, acc in accumulators.items():
            saved_tower = state[tower]
            acc.A_sum, acc.B_sum, acc.count = saved_tower["A_sum"], saved_tower["B_sum"], int(saved_tower["count"])
        for name, t in state["pending"].items():
            if t is not None:
                pending.parts[name] = [t]
        return int(state["batches_done"])
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ValueError(f"checkpoint {path}: damaged (its sums or counts are missing); {advice}") from None


def _shown(value) -> str:
    """A recorded value for an error message: digests cut to 12 characters, None as 'none'."""
    if value is None:
        return "none"
    text = json.dumps(value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return text[:13] + '..."'
    return text if len(text) <= 80 else text[:77] + "..."
