"""What the demo's steps share (`run` and the protocol modules): the features entering a tower's projection,
the model's normalised embeddings, the zero-shot metrics, the mean and spread of per-seed results, and the
worker processes that run its independent trainings side by side.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch
from torch import Tensor, nn

import bayesvlm_ext
from bayesvlm_ext import KronPosterior
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.demo import shapes
from bayesvlm_ext.fit import unnormalised_encoder


class PairsDataset(torch.utils.data.Dataset):
    """Generated pairs as the model takes them: (normalised pixels [3, S, S], tokens [L])."""

    def __init__(self, data: shapes.ShapesData):
        self.images, self.tokens = shapes.normalise_images(data.images), shapes.tokenize(data.captions)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.tokens[index]


def features(model: nn.Module, tower: str, inputs: Tensor, batch_size: int = 1024) -> Tensor:
    """[N, P] float64 features entering the tower's projection (bayesvlm_ext.capture)."""
    site, encode = find_projection(model, tower), unnormalised_encoder(model, tower)
    parts = [capture(encode, inputs[i:i + batch_size], site).features for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(parts).double()


def image_features(model: nn.Module, data: shapes.ShapesData) -> Tensor:  # [N, P_img] float64
    return features(model, "image", shapes.normalise_images(data.images))


def unit_embeddings(posterior: KronPosterior, phi: Tensor) -> Tensor:  # [N, D] float32
    """The model's normalised embeddings (the posterior's MAP mean W* phi + b, normalised): what ProbVLM reads."""
    return torch.nn.functional.normalize(posterior.embed(phi.float()).mean, dim=1)


def metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy, NLPD and ECE (SPEC.md section 5) of [N, C] probabilities against [N] labels."""
    return {"acc": bayesvlm_ext.accuracy(probs, labels), "nlpd": bayesvlm_ext.nlpd(probs, labels),
            "ece": bayesvlm_ext.ece(probs, labels)}


def mean_and_std(runs: list):
    """(mean, std) of per-seed results of one nested structure (dicts of floats, or lists of floats), leaf by leaf.

    The sample standard deviation (n - 1); None leaves (an undefined Spearman or AUROC) are left out of their
    leaf's statistics, and a leaf that is None in every run stays None.
    """
    first = runs[0]
    if isinstance(first, dict):
        pairs = {key: mean_and_std([run[key] for run in runs]) for key in first}
        return {key: pair[0] for key, pair in pairs.items()}, {key: pair[1] for key, pair in pairs.items()}
    if isinstance(first, (list, tuple)):
        pairs = [mean_and_std([run[i] for run in runs]) for i in range(len(first))]
        return [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    values = [float(v) for v in runs if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


@contextlib.contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Workers:
    """Processes for the demo's independent, seeded tasks (ProbVLM trainings, active-learning runs), one per core,
    each task on one thread: `map(fn, calls)` returns [fn(*args) for args in calls] in order.

    Their tensors are too small for several threads to help (a ProbVLM training step takes 12 ms on 2 threads
    and 10 ms on 1 here), so one single-threaded process per core is what uses the cores. A task's result does
    not depend on how many processes there are: with one (`Workers(1)`, or a single core) the tasks run here,
    in order, on one thread too. The processes are spawned (a forked copy of a process whose OpenMP threads
    have run can hang) on the first `map` and reused until `close`. Where no process can be started, or one
    dies, the tasks run here instead, with a warning (the results are the same).
    """

    def __init__(self, processes: int | None = None):
        self.processes = usable_cores() if processes is None else processes
        if isinstance(self.processes, bool) or not isinstance(self.processes, int) or self.processes < 1:
            raise ValueError(f"argument 'processes' must be a positive int, got {processes!r}")
        self._pool: ProcessPoolExecutor | None = None

    def map(self, fn, calls: list[tuple]) -> list:
        if self.processes > 1 and len(calls) > 1:
            try:
                if self._pool is None:
                    self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=torch.set_num_threads, initargs=(1,))
                futures = [self._pool.submit(fn, *args) for args in calls]
            except OSError as error:  # no process can be started here
                self._run_here(error)
            else:
                try:
                    return [future.result() for future in futures]  # a task's own exception propagates
                except BrokenProcessPool as error:  # a worker died (killed, out of memory)
                    self._run_here(error)
        with single_thread():
            return [fn(*args) for args in calls]

    def _run_here(self, error: BaseException) -> None:
        warnings.warn(f"demo worker processes unavailable ({error!r}); running the tasks in this process")
        self.close()
        self.processes = 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
