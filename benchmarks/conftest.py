"""Shared inputs for the benchmarks: seeded, built once per session, on the benchmark device.

The device is `cpu` unless BAYESVLM_BENCH_DEVICE names another (e.g. `cuda`); timings on CUDA
synchronise after every call (see `synchronize`).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor

from bayesvlm_ext import EmbeddingDistribution, KronPosterior

DEVICE_ENV = "BAYESVLM_BENCH_DEVICE"
SEED = 0

# Shapes (also written to the results JSON by benchmarks/report.py).
QUADFORM_SHAPE = {"N": 4096, "P": 768}
MOMENTS_SHAPE = {"N": 2048, "M": 2048, "D": 512, "P_img": 768, "P_txt": 512}
LOGIT_SCALE = math.log(100.0)  # log s, as stored in CLIP models


def bench_device() -> torch.device:
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{DEVICE_ENV}={device} but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a timed call covers its own work and nothing else."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_factor(
    size: int,
    generator: torch.Generator,
    samples: int = 4096,
) -> Tensor:  # [size, size] symmetric PSD, float32, eigenvalues decaying like 1/k
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    x = torch.randn(samples, size, generator=generator, dtype=torch.float64)
    x = (x * torch.arange(1, size + 1, dtype=torch.float64).rsqrt()) @ q.T  # [samples, size]
    return (x.T @ x / math.sqrt(samples)).float()


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def quadform_inputs(device) -> tuple[Tensor, Tensor]:  # phi [N, P], C [P, P] float32
    """Features and a damped-inverse factor C = (A + sqrt(lam) I)^-1, the matrix `embed` uses."""
    generator = torch.Generator().manual_seed(SEED)
    n, p = QUADFORM_SHAPE["N"], QUADFORM_SHAPE["P"]
    phi = torch.randn(n, p, generator=generator)
    damped = random_factor(p, generator).double() + 20.0 * torch.eye(p, dtype=torch.float64)
    C = torch.linalg.inv(damped)
    C = ((C + C.T) / 2).float()
    return phi.to(device), C.to(device)


@pytest.fixture(scope="session")
def moments_inputs(device) -> tuple[EmbeddingDistribution, EmbeddingDistribution]:  # N and M kron-form embeddings
    """Image and text embeddings from two KronPosteriors over synthetic factors, prior tuned."""
    generator = torch.Generator().manual_seed(SEED + 1)
    shape = MOMENTS_SHAPE
    distributions = []
    for rows, p in ((shape["N"], shape["P_img"]), (shape["M"], shape["P_txt"])):
        weight = torch.randn(shape["D"], p, generator=generator) / math.sqrt(p)  # [D, P]
        posterior = KronPosterior(random_factor(p, generator), random_factor(shape["D"], generator), weight)
        posterior.optimize_prior_precision()
        phi = torch.randn(rows, p, generator=generator)  # [rows, P]
        distributions.append(posterior.to(device).embed(phi.to(device)))
    return distributions[0], distributions[1]
